# Structured replies and base:allocation through libnbd: a written chunk is
# data, the rest of a fresh export reads as holes; DF reads come back whole.
import sys
import nbd

uri, chunk = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated(), "structured replies not negotiated"
assert h.can_meta_context("base:allocation"), "base:allocation not negotiated"
assert h.can_df(), "DF not advertised"

h.pwrite(b"\x11" * chunk, chunk)  # second chunk becomes data
extents = []


def on_extents(metacontext, offset, entries, err):
    assert metacontext == "base:allocation", metacontext
    extents.extend(zip(entries[0::2], entries[1::2]))
    return 0


h.block_status(4 * chunk, 0, on_extents)
assert extents[:3] == [(chunk, 3), (chunk, 0), (2 * chunk, 3)], extents

# REQ_ONE: exactly one descriptor, the first.
extents.clear()
h.block_status(4 * chunk, 0, on_extents, flags=nbd.CMD_FLAG_REQ_ONE)
assert extents == [(chunk, 3)], extents

# A structured read with DF arrives as one data chunk.
chunks = []


def on_chunk(buf, offset, status, err):
    chunks.append((offset, status, len(buf)))
    return 0


data = h.pread_structured(chunk, chunk, on_chunk, flags=nbd.CMD_FLAG_DF)
assert data == b"\x11" * chunk
assert chunks == [(chunk, nbd.READ_DATA, chunk)], chunks

# Trimming the chunk makes it a hole again.
h.trim(chunk, chunk)
extents.clear()
h.block_status(2 * chunk, 0, on_extents)
assert extents == [(2 * chunk, 3)], extents
h.shutdown()
print("ok")
