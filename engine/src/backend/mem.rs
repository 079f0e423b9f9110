//! RAM backend: sparse, chunked, shared by every shard.
//!
//! Unwritten chunks cost nothing and report as holes. Each chunk has its own
//! lock, so connections on different shards rarely meet; writes land in
//! shared memory at once, which makes every flush trivially multi-conn safe.

use super::*;
use crate::config::size::human_size;
use std::sync::{Arc, Mutex, RwLock};

/// Allocation and block-status granularity.
pub const CHUNK: usize = 64 * 1024;

/// A chunk's bytes. Boxed behind the Arc so that a payload received into
/// its own buffer becomes the chunk as it is, without a copy.
pub type ChunkBytes = Arc<Box<[u8]>>;

/// None until first written: a hole. Immutable while a read holds it (its
/// reply is sent straight from the chunk); a write then copies it first.
type Chunk = RwLock<Option<ChunkBytes>>;

fn zeroed_chunk() -> ChunkBytes {
    Arc::new(vec![0u8; CHUNK].into_boxed_slice())
}

/// The RAM every mem backstore may claim together (`--mem-limit`). Each
/// claims its whole size when it opens and gives it back when it goes, so
/// the runner never promises more memory than the operator granted, and a
/// control client cannot make it allocate (or abort on) a petabyte.
pub struct MemBudget {
    limit: u64,
    used: Mutex<u64>,
}

impl MemBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(MemBudget {
            limit,
            used: Mutex::new(0),
        })
    }

    /// No limit beyond what the allocator can give (tests, benches).
    pub fn unlimited() -> Arc<Self> {
        Self::new(u64::MAX)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn claim(self: &Arc<Self>, size: u64) -> Result<Claim, BackendError> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if size > self.limit.saturating_sub(*used) {
            return Err(BackendError::Config(format!(
                "a mem backstore of {} does not fit: --mem-limit is {}, with {} claimed by other mem backstores",
                human_size(size),
                human_size(self.limit),
                human_size(*used),
            )));
        }
        *used += size;
        Ok(Claim {
            budget: self.clone(),
            size,
        })
    }
}

/// One backstore's share of the budget, returned when it drops.
struct Claim {
    budget: Arc<MemBudget>,
    size: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        *self.budget.used.lock().unwrap_or_else(|e| e.into_inner()) -= self.size;
    }
}

pub struct MemBackend {
    size: u64,
    read_only: bool,
    chunks: Box<[Chunk]>,
    _claim: Claim,
}

impl MemBackend {
    pub fn new(
        size: u64,
        read_only: bool,
        budget: &Arc<MemBudget>,
    ) -> Result<Arc<Self>, BackendError> {
        let claim = budget.claim(size)?;
        let too_large = || {
            BackendError::Config(format!(
                "a mem backstore of {} needs more memory for its chunk table than there is",
                human_size(size)
            ))
        };
        let count = usize::try_from(size.div_ceil(CHUNK as u64)).map_err(|_| too_large())?;
        // The table is the one allocation sized by the request: fallible,
        // so an impossible size is an error, not an abort.
        let mut chunks = Vec::new();
        chunks.try_reserve_exact(count).map_err(|_| too_large())?;
        chunks.extend((0..count).map(|_| RwLock::new(None)));
        Ok(Arc::new(MemBackend {
            size,
            read_only,
            chunks: chunks.into_boxed_slice(),
            _claim: claim,
        }))
    }

    /// Splits `[offset, offset+len)` into (chunk index, offset in chunk, length).
    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let end = (offset + len).min(self.size);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = ((CHUNK - within) as u64).min(end - pos) as usize;
            pos += n as u64;
            Some((idx, within, n))
        })
    }

    pub fn read_into(&self, offset: u64, dst: &mut [u8]) {
        let mut at = 0;
        for (idx, within, n) in self.spans(offset, dst.len() as u64) {
            let chunk = self.chunks[idx].read().unwrap_or_else(|e| e.into_inner());
            match chunk.as_deref() {
                Some(data) => dst[at..at + n].copy_from_slice(&data[within..within + n]),
                None => dst[at..at + n].fill(0),
            }
            at += n;
        }
    }

    /// Replaces `buf`'s contents with `len` bytes at `offset`, writing each
    /// byte once: no zero-fill first, which costs as much as the copy.
    pub fn read_to_vec(&self, offset: u64, len: usize, buf: &mut Vec<u8>) {
        buf.clear();
        buf.reserve(len);
        let dst = buf.as_mut_ptr();
        let mut at = 0;
        for (idx, within, n) in self.spans(offset, len as u64) {
            let chunk = self.chunks[idx].read().unwrap_or_else(|e| e.into_inner());
            // SAFETY: at + n <= len <= capacity; source and destination are distinct allocations.
            unsafe {
                match chunk.as_deref() {
                    Some(data) => {
                        std::ptr::copy_nonoverlapping(data[within..].as_ptr(), dst.add(at), n)
                    }
                    None => std::ptr::write_bytes(dst.add(at), 0, n),
                }
            }
            at += n;
        }
        // Past the end of the store (not reachable through the protocol layer).
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(dst.add(at), 0, len - at) };
        // SAFETY: every byte in 0..len was written above.
        unsafe { buf.set_len(len) };
    }

    /// `len` bytes at `offset` where they are: the chunks themselves (kept
    /// alive by the slices) and holes as zeroes.
    pub fn read_shared(&self, offset: u64, len: usize) -> Vec<SharedSlice> {
        let mut out = Vec::with_capacity(len / CHUNK + 2);
        let mut at = 0;
        for (idx, within, n) in self.spans(offset, len as u64) {
            let chunk = self.chunks[idx].read().unwrap_or_else(|e| e.into_inner());
            out.push(SharedSlice {
                chunk: chunk.clone(),
                start: within,
                len: n,
            });
            at += n;
        }
        // Past the end of the store (not reachable through the protocol layer).
        if at < len {
            out.push(SharedSlice {
                chunk: None,
                start: 0,
                len: len - at,
            });
        }
        out
    }

    pub fn write_from(&self, offset: u64, src: &[u8]) {
        let mut at = 0;
        for (idx, within, n) in self.spans(offset, src.len() as u64) {
            let mut chunk = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            let data = Arc::make_mut(chunk.get_or_insert_with(zeroed_chunk));
            data[within..within + n].copy_from_slice(&src[at..at + n]);
            at += n;
        }
    }

    /// Writes a payload received in pieces (see [`BackendIo::write_pieces`]):
    /// a piece that is a whole chunk becomes that chunk, the rest is copied.
    pub fn write_pieces(&self, mut offset: u64, pieces: Vec<Vec<u8>>) {
        for piece in pieces {
            let n = piece.len() as u64;
            let whole = offset.is_multiple_of(CHUNK as u64)
                && piece.len() == CHUNK
                && offset + n <= self.size;
            if whole {
                let bytes = Arc::new(piece.into_boxed_slice());
                let idx = (offset / CHUNK as u64) as usize;
                // The old bytes go once no unsent reply holds them.
                *self.chunks[idx].write().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
            } else {
                self.write_from(offset, &piece);
            }
            offset += n;
        }
    }

    /// Zeroes a range: whole chunks become holes unless `keep_allocated`.
    pub fn zero(&self, offset: u64, len: u64, keep_allocated: bool) {
        for (idx, within, n) in self.spans(offset, len) {
            let mut chunk = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            if n == CHUNK && !keep_allocated {
                *chunk = None;
            } else if let Some(data) = chunk.as_mut() {
                Arc::make_mut(data)[within..within + n].fill(0);
            } else if keep_allocated {
                *chunk = Some(zeroed_chunk());
            }
        }
    }

    pub fn extents_of(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        for (idx, _, n) in self.spans(offset, len) {
            let allocated = self.chunks[idx]
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
            let flags = if allocated { DATA } else { HOLE };
            match out.last_mut() {
                Some(last) if last.flags == flags => last.len += n as u64,
                _ => out.push(Extent {
                    len: n as u64,
                    flags,
                }),
            }
        }
        out
    }

    /// Bytes of RAM in use.
    pub fn allocated_bytes(&self) -> u64 {
        let used = self
            .chunks
            .iter()
            .filter(|c| c.read().unwrap_or_else(|e| e.into_inner()).is_some())
            .count();
        used as u64 * CHUNK as u64
    }
}

impl Backend for Arc<MemBackend> {
    fn handler(&self) -> &'static str {
        "mem"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all(self.read_only)
    }

    fn mode(&self) -> String {
        "ram (sparse, 64 KiB chunks)".into()
    }

    fn attach(&self) -> IoFuture<'static, Rc<dyn BackendIo>> {
        let io: Rc<dyn BackendIo> = Rc::new(MemIo(self.clone()));
        Box::pin(std::future::ready(Ok(io)))
    }
}

struct MemIo(Arc<MemBackend>);

fn done<'a, T: 'a>(v: T) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(Ok(v)))
}

impl BackendIo for MemIo {
    fn read(&self, offset: u64, len: usize, spare: Vec<u8>) -> IoFuture<'_, ReadBuf> {
        // Sent from the chunks: a 1 MiB read spent a third of the shard's
        // CPU copying them into a buffer (tuning.md, "Large reads").
        let slices = self.0.read_shared(offset, len);
        done(ReadBuf::Shared { slices, spare })
    }

    fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> IoFuture<'_, Option<Vec<u8>>> {
        self.0.write_from(offset, &data);
        done(Some(data))
    }

    fn write_piece_size(&self) -> Option<usize> {
        Some(CHUNK)
    }

    fn write_pieces(&self, offset: u64, pieces: Vec<Vec<u8>>, _fua: bool) -> IoFuture<'_, ()> {
        self.0.write_pieces(offset, pieces);
        done(())
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        done(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        self.0.zero(offset, len, false);
        done(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.0.zero(offset, len, flags.no_hole);
        done(())
    }

    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        done(())
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        done(self.0.extents_of(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_space_reads_zero_and_costs_nothing() {
        let m = MemBackend::new(1 << 30, false, &MemBudget::unlimited()).unwrap();
        let mut buf = vec![0xffu8; 4096];
        m.read_into(12345, &mut buf);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(m.allocated_bytes(), 0);
        assert_eq!(
            m.extents_of(0, 1 << 20),
            vec![Extent {
                len: 1 << 20,
                flags: HOLE
            }]
        );
    }

    fn bytes_of(slices: &[SharedSlice]) -> Vec<u8> {
        slices.iter().flat_map(|s| s.bytes().to_vec()).collect()
    }

    #[test]
    fn a_shared_read_keeps_what_it_read_while_writes_and_trims_land() {
        let m = MemBackend::new(4 * CHUNK as u64, false, &MemBudget::unlimited()).unwrap();
        let old: Vec<u8> = (0..2 * CHUNK).map(|i| (i % 251) as u8).collect();
        m.write_from(CHUNK as u64 / 2, &old);
        // Spans three chunks, the last one partly a hole's worth of zeroes.
        let off = CHUNK as u64 / 2 - 100;
        let len = 2 * CHUNK + 300;
        let read = m.read_shared(off, len);
        assert_eq!(read.len(), 3, "one slice per chunk");
        let mut want = vec![0u8; 100];
        want.extend_from_slice(&old);
        want.resize(len, 0);
        assert_eq!(bytes_of(&read), want);
        // The reply is still on its way: a write copies the chunk first, a
        // trim drops the store's reference only.
        m.write_from(off, &vec![0xee; len]);
        m.zero(CHUNK as u64, CHUNK as u64, false);
        assert_eq!(bytes_of(&read), want, "an in-flight read changed under it");
        let mut now = vec![0u8; len];
        m.read_into(off, &mut now);
        let mut expect = vec![0xeeu8; len];
        expect[CHUNK / 2 + 100..CHUNK / 2 + 100 + CHUNK].fill(0);
        assert_eq!(now, expect, "the store has the new bytes");
        // Reads past the end come back as zeroes (not reachable through the
        // protocol layer, which range-checks first).
        let tail = m.read_shared(4 * CHUNK as u64 - 10, 30);
        assert_eq!(tail.len(), 2);
        assert_eq!(bytes_of(&tail), vec![0u8; 30]);
    }

    #[test]
    fn pieces_become_chunks_without_changing_what_an_in_flight_read_holds() {
        let size = 4 * CHUNK as u64 - 1000; // the last chunk is short
        let m = MemBackend::new(size, false, &MemBudget::unlimited()).unwrap();
        m.write_from(0, &vec![0x11; size as usize]);
        let held = m.read_shared(0, size as usize);
        // A head piece, two whole chunks, a tail into the short last chunk.
        let off = CHUNK as u64 - 10;
        let pieces = vec![
            vec![0xa1; 10],
            vec![0xa2; CHUNK],
            vec![0xa3; CHUNK],
            vec![0xa4; 500],
        ];
        let total: usize = pieces.iter().map(Vec::len).sum();
        let whole_ptr = pieces[1].as_ptr();
        m.write_pieces(off, pieces);
        assert_eq!(
            bytes_of(&held),
            vec![0x11; size as usize],
            "an in-flight read changed"
        );
        let mut want = vec![0x11u8; size as usize];
        let o = off as usize;
        want[o..o + 10].fill(0xa1);
        want[o + 10..o + 10 + CHUNK].fill(0xa2);
        want[o + 10 + CHUNK..o + 10 + 2 * CHUNK].fill(0xa3);
        want[o + 10 + 2 * CHUNK..o + total].fill(0xa4);
        let mut now = vec![0u8; size as usize];
        m.read_into(0, &mut now);
        assert_eq!(now, want);
        // The whole piece is the chunk itself: received once, never copied.
        let chunk = m.chunks[1].read().unwrap();
        assert_eq!(chunk.as_ref().unwrap().as_ptr(), whole_ptr);
    }

    #[test]
    fn the_budget_refuses_what_does_not_fit_and_returns_what_drops() {
        let budget = MemBudget::new(3 << 20);
        let a = MemBackend::new(2 << 20, false, &budget).unwrap();
        let err = MemBackend::new(2 << 20, false, &budget)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("does not fit") && err.contains("3 MiB") && err.contains("2 MiB claimed"),
            "{err}"
        );
        assert_eq!(budget.used(), 2 << 20);
        drop(a);
        assert_eq!(budget.used(), 0);
        let _b = MemBackend::new(3 << 20, false, &budget).unwrap();
    }

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        let unlimited = MemBudget::unlimited();
        // Tables larger than the address space: refused whatever the overcommit mode.
        for size in [1u64 << 62, u64::MAX] {
            let err = MemBackend::new(size, false, &unlimited)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("chunk table"), "{err}");
        }
        assert_eq!(unlimited.used(), 0);
    }

    #[test]
    fn write_spanning_chunks_reads_back() {
        let m = MemBackend::new(1 << 20, false, &MemBudget::unlimited()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        m.write_from(CHUNK as u64 - 7, &data);
        let mut back = vec![0u8; data.len()];
        m.read_into(CHUNK as u64 - 7, &mut back);
        assert_eq!(back, data);
        // [CHUNK-7, CHUNK-7+200000) touches chunks 0..=4.
        assert_eq!(m.allocated_bytes(), 5 * CHUNK as u64);
    }

    #[test]
    fn trim_makes_whole_chunks_holes_and_zeroes_partials() {
        let m = MemBackend::new(4 * CHUNK as u64, false, &MemBudget::unlimited()).unwrap();
        m.write_from(0, &vec![7u8; 4 * CHUNK]);
        m.zero(100, 2 * CHUNK as u64, false);
        let ext = m.extents_of(0, 4 * CHUNK as u64);
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: CHUNK as u64,
                    flags: DATA
                },
                Extent {
                    len: CHUNK as u64,
                    flags: HOLE
                },
                Extent {
                    len: 2 * CHUNK as u64,
                    flags: DATA
                },
            ]
        );
        let mut b = vec![1u8; 3 * CHUNK];
        m.read_into(0, &mut b);
        assert!(b[..100].iter().all(|&x| x == 7));
        assert!(b[100..2 * CHUNK + 100].iter().all(|&x| x == 0));
        assert!(b[2 * CHUNK + 100..].iter().all(|&x| x == 7));
    }

    #[test]
    fn read_to_vec_matches_read_into_over_holes_and_data() {
        let m = MemBackend::new(4 * CHUNK as u64, false, &MemBudget::unlimited()).unwrap();
        m.write_from(CHUNK as u64 + 5, &[3u8; 1000]);
        let mut a = vec![0xeeu8; 3 * CHUNK];
        m.read_into(100, &mut a);
        let mut b = vec![0xeeu8; 7]; // reused buffer with stale bytes
        m.read_to_vec(100, 3 * CHUNK, &mut b);
        assert_eq!(a, b);
        m.read_to_vec(4 * CHUNK as u64 - 10, 10, &mut b);
        assert_eq!(b, vec![0u8; 10]);
    }

    #[test]
    fn no_hole_zeroing_allocates() {
        let m = MemBackend::new(2 * CHUNK as u64, false, &MemBudget::unlimited()).unwrap();
        m.zero(0, CHUNK as u64, true);
        assert_eq!(m.extents_of(0, CHUNK as u64)[0].flags, DATA);
    }

    #[test]
    fn size_not_multiple_of_chunk_is_clipped() {
        let m = MemBackend::new(CHUNK as u64 + 10, false, &MemBudget::unlimited()).unwrap();
        m.write_from(CHUNK as u64, &[9u8; 10]);
        let ext = m.extents_of(0, CHUNK as u64 + 10);
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), CHUNK as u64 + 10);
    }

    #[test]
    fn concurrent_writers_on_threads_do_not_tear() {
        let m = MemBackend::new(1 << 20, false, &MemBudget::unlimited()).unwrap();
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        m.write_from((t as u64 * 64 + i % 64) * 4096, &[t + 1; 4096]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        for t in 0..4u8 {
            let mut b = vec![0u8; 64 * 4096];
            m.read_into(t as u64 * 64 * 4096, &mut b);
            assert!(b.iter().all(|&x| x == t + 1));
        }
    }
}
