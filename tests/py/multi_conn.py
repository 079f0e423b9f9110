# CAN_MULTI_CONN: a write acknowledged on one connection is visible on the
# others, and a FLUSH on any connection covers it. With --threads 2 the
# round-robin placement puts the connections on different shards.
import sys
import nbd

uri = sys.argv[1]
hs = []
for _ in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn(), "CAN_MULTI_CONN not advertised"
    assert h.can_flush() and h.can_fua()
    hs.append(h)

for i, writer in enumerate(hs):
    data = bytes([0x40 + i]) * 65536
    flags = nbd.CMD_FLAG_FUA if i % 2 else 0
    writer.pwrite(data, i * 65536, flags=flags)
    other = hs[(i + 1) % len(hs)]
    other.flush()
    assert other.pread(65536, i * 65536) == data, f"write on conn {i} not seen"
for h in hs:
    h.shutdown()
print("ok")
