//! Page-aligned buffers for O_DIRECT, reused through a small pool per
//! thread. A direct read or write would otherwise allocate (and, past
//! glibc's mmap threshold, map and unmap) a buffer per request: page faults
//! on the IO path, which under memory pressure wait for the reclaim that is
//! waiting for this very IO (swap on a device this runner serves).

use aligned_vec::{AVec, ConstAlign};
use std::cell::RefCell;

/// The alignment every device accepts for O_DIRECT.
pub const ALIGN: usize = 4096;

type Inner = AVec<u8, ConstAlign<ALIGN>>;

/// Buffers kept per thread, and the largest kept: a bounded pool.
const POOL_MAX_BUFFERS: usize = 64;
const POOL_MAX_CAPACITY: usize = 4 << 20;

thread_local! {
    static POOL: RefCell<Vec<Inner>> = const { RefCell::new(Vec::new()) };
}

/// An aligned buffer of a fixed length; back to its thread's pool on drop.
pub struct AlignedBuf {
    inner: Option<Inner>,
}

impl AlignedBuf {
    /// `len` bytes, from the pool when it holds a buffer big enough. The
    /// contents are whatever the last user left (callers overwrite them).
    pub fn take(len: usize) -> AlignedBuf {
        let reused = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let at = p.iter().rposition(|b| b.capacity() >= len)?;
            Some(p.swap_remove(at))
        });
        let mut inner = reused.unwrap_or_else(|| AVec::with_capacity(ALIGN, len));
        // Growing zero-fills only the new tail; shrinking drops nothing.
        inner.resize(len, 0);
        AlignedBuf { inner: Some(inner) }
    }

    /// A copy of `data`, aligned.
    pub fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::take(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Buffers in this thread's pool (for tests).
    pub fn pooled() -> usize {
        POOL.with(|p| p.borrow().len())
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if inner.capacity() <= POOL_MAX_CAPACITY {
            // A thread that is exiting has no pool left: the buffer is freed.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX_BUFFERS {
                    p.push(inner);
                }
            });
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.inner.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.inner.as_deref_mut().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_sized_and_reused() {
        let a = AlignedBuf::take(8192);
        assert_eq!(a.len(), 8192);
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        let first = a.as_ptr();
        drop(a);
        let before = AlignedBuf::pooled();
        // A smaller request reuses the same memory: no new allocation.
        let b = AlignedBuf::copy_of(&[7u8; 4096]);
        assert_eq!(b.as_ptr(), first);
        assert_eq!(&b[..], &[7u8; 4096][..]);
        assert_eq!(AlignedBuf::pooled(), before - 1);
        drop(b);
        // A bigger one grows past it and is aligned too.
        let c = AlignedBuf::take(3 * 4096 + 5);
        assert_eq!((c.len(), c.as_ptr() as usize % ALIGN), (3 * 4096 + 5, 0));
    }

    #[test]
    fn the_pool_is_bounded() {
        let many: Vec<_> = (0..POOL_MAX_BUFFERS + 10)
            .map(|_| AlignedBuf::take(4096))
            .collect();
        drop(many);
        assert_eq!(AlignedBuf::pooled(), POOL_MAX_BUFFERS);
        drop(AlignedBuf::take(POOL_MAX_CAPACITY + 1));
        assert_eq!(AlignedBuf::pooled(), POOL_MAX_BUFFERS);
    }
}
