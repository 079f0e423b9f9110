# A direct (O_DIRECT) export advertises a 4 KiB minimum block size; with
# libnbd's client-side checks off, a write below it must get EINVAL, change
# nothing, and leave the connection usable for aligned IO.
import errno
import sys
import nbd

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096, h.get_block_size(nbd.SIZE_MINIMUM)
before = h.pread(8192, 0)
for buf, off in [(b"x" * 100, 0), (b"x" * 4096, 1), (b"x" * 4097, 4096)]:
    try:
        h.pwrite(buf, off)
    except nbd.Error as e:
        assert e.errno in (errno.EINVAL, "EINVAL"), e.errno
    else:
        raise AssertionError(f"a {len(buf)}-byte write at {off} succeeded")
assert h.pread(8192, 0) == before
h.pwrite(b"\xa5" * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == b"\xa5" * 4096
# Reads need no alignment.
assert h.pread(10, 4090) == before[4090:4096] + b"\xa5" * 4
print("ok")
