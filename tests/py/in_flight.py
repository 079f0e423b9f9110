# 64 requests in flight on one connection, completed in any order.
import sys
import nbd

uri = sys.argv[1]
N, BS = 64, 4096
h = nbd.NBD()
h.connect_uri(uri)


def run_all(cookies):
    peak = h.aio_in_flight()
    pending = set(cookies)
    while pending:
        h.poll(-1)
        pending = {c for c in pending if not h.aio_command_completed(c)}
    return peak


bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * BS) for i in range(N)]
peak = run_all([h.aio_pwrite(bufs[i], i * BS * 3) for i in range(N)])
assert peak == N, f"only {peak} writes in flight"

reads = [nbd.Buffer(BS) for _ in range(N)]
peak = run_all([h.aio_pread(reads[i], i * BS * 3) for i in range(N)])
assert peak == N, f"only {peak} reads in flight"
for i, b in enumerate(reads):
    assert b.to_bytearray() == bytearray([i + 1]) * BS, f"read {i} differs"
h.shutdown()
print("ok")
