# With libnbd's client-side checks off, the server itself must refuse bad
# requests with the errors the spec names, and keep the connection usable.
import errno
import sys
import nbd

rw_uri, ro_uri = sys.argv[1], sys.argv[2]


def expect(err, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        # libnbd reports the errno by name ("EINVAL").
        want = errno.errorcode[err]
        assert e.errno in (err, want), f"{fn.__name__}{args}: {e.errno}, want {want}"
        return
    raise AssertionError(f"{fn.__name__}{args} succeeded")


h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(rw_uri)
size = h.get_size()
expect(errno.EINVAL, h.pread, 4096, size)
expect(errno.EINVAL, h.pread, 4096, size - 100)
expect(errno.ENOSPC, h.pwrite, b"x" * 4096, size)
expect(errno.ENOSPC, h.zero, 4096, size - 1)
expect(errno.EINVAL, h.trim, 4096, size)
expect(errno.EINVAL, h.cache, 4096, size)
expect(errno.EINVAL, h.pread, 4096, (1 << 63) - 1)  # offset + length overflows
expect(errno.EINVAL, h.pread, 4096, 0, flags=nbd.CMD_FLAG_NO_HOLE)  # flag invalid for READ
h.pwrite(b"y" * 512, size - 512)  # the last bytes are fine
assert h.pread(512, size - 512) == b"y" * 512
h.shutdown()

r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
assert r.is_read_only()
assert not r.can_trim() and not r.can_zero()
expect(errno.EPERM, r.pwrite, b"z" * 4096, 0)
expect(errno.EPERM, r.trim, 4096, 0)
expect(errno.EPERM, r.zero, 4096, 0)
assert len(r.pread(4096, 0)) == 4096
r.shutdown()
print("ok")
