//! Large cached reads sent from the page cache by `sendmsg`: the file is
//! mapped read-only once per export, and a reply's body is an iovec into
//! the mapping. The kernel makes the one copy there is (page cache into the
//! socket), on the shard, as the `mem` store's chunks are sent; the client
//! then copies bytes still warm in the cache. Splicing page references
//! instead left the cold copy to the client and cost the shard more
//! (tuning.md, "Large IO").
//!
//! The runner never reads the mapping itself. A file that shrinks under a
//! mapping faults past its new end: inside `sendmsg` the kernel turns that
//! into EFAULT (the connection closes), where a read from user space would
//! be SIGBUS. Reads are mapped only when every page is cached (cachestat),
//! so a truncation before the read sends it down the copying path; only one
//! racing the send can close a connection. TLS and tests copy with `pread`.
//!
//! As with any page-cache reference, a write landing before the reply
//! leaves can show through; only a read overlapping that write in flight
//! can see it, and NBD leaves that undefined.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// Reads from this size up are mapped; below it the io_uring read and its
/// copy cost less than the cachestat call (not measured as a win yet).
pub const MAP_MIN: usize = 128 * 1024;

/// A read-only shared mapping of a whole file, and a descriptor of it for
/// copies that must not touch the mapping.
pub struct FileMap {
    base: std::ptr::NonNull<core::ffi::c_void>,
    len: usize,
    file: OwnedFd,
}

// SAFETY: the mapping is read-only and shared; only its address and length
// travel between threads, and it is unmapped once, on drop.
unsafe impl Send for FileMap {}
// SAFETY: as above; nothing mutates a FileMap.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps `len` bytes of `file`; None when the file is empty or the
    /// address space refuses (a huge device): reads then copy.
    pub fn new(file: BorrowedFd<'_>, len: u64) -> Option<Arc<FileMap>> {
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        let file = file.try_clone_to_owned().ok()?;
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        // SAFETY: a fresh read-only shared mapping at an address the kernel
        // picks; nothing else refers to that range.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .ok()?;
        Some(Arc::new(FileMap {
            base: std::ptr::NonNull::new(base)?,
            len,
            file,
        }))
    }

    /// `len` bytes at `offset` as a reply body, when the mapping covers
    /// them and every page is cached (so the send does not wait for the disk).
    pub fn read(self: &Arc<Self>, offset: u64, len: usize) -> Option<MappedRead> {
        if !self.covers(offset, len) || !super::pipe::resident(self.file.as_fd(), offset, len) {
            return None;
        }
        Some(MappedRead {
            map: self.clone(),
            start: offset as usize, // fits: covers() checked it against len
            len,
        })
    }

    /// Whether a read of `len` at `offset` is large enough to map and lies
    /// inside the mapping.
    pub fn covers(&self, offset: u64, len: usize) -> bool {
        len >= MAP_MIN
            && usize::try_from(offset)
                .ok()
                .and_then(|s| s.checked_add(len))
                .is_some_and(|end| end <= self.len)
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: the range mapped in `new`, unmapped once; every MappedRead
        // holds an Arc, so none outlives it.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr(), self.len) };
    }
}

/// A range of a [`FileMap`], kept mapped while the reply is in flight.
pub struct MappedRead {
    map: Arc<FileMap>,
    start: usize,
    len: usize,
}

impl MappedRead {
    /// The range, for the kernel to read (an iovec): the runner itself must
    /// not read it (see the module's note on truncation).
    pub fn for_kernel(&self) -> &[u8] {
        // SAFETY: inside the live mapping (checked in `FileMap::read`); the
        // slice only carries an address and length to sendmsg.
        unsafe {
            std::slice::from_raw_parts(
                self.map.base.as_ptr().cast::<u8>().add(self.start),
                self.len,
            )
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes in memory, by `pread` (zeros past an end that moved).
    pub fn copy_out(&self) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        super::file::direct_io(&self.map.file, &mut v, self.start as u64, false)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn cached_ranges_are_mapped_and_read_back_exactly() {
        let data: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 % 251) as u8).collect();
        let f = file_of(&data);
        let map = FileMap::new(f.as_fd(), data.len() as u64).unwrap();
        let r = map.read(4096, MAP_MIN).expect("just written, so cached");
        assert_eq!(r.len(), MAP_MIN);
        assert_eq!(r.copy_out().unwrap(), &data[4096..4096 + MAP_MIN]);
        // Small reads, and ranges the mapping does not cover, copy instead.
        assert!(map.read(0, MAP_MIN - 1).is_none());
        assert!(map.read(data.len() as u64 - 4096, MAP_MIN).is_none());
        assert!(map.read(u64::MAX - 10, MAP_MIN).is_none());
    }

    #[test]
    fn a_truncated_file_is_not_mapped_and_reads_back_zeros() {
        let f = file_of(&vec![0xaa; 1 << 20]);
        let map = FileMap::new(f.as_fd(), 1 << 20).unwrap();
        let before = map.read(0, MAP_MIN).unwrap();
        f.set_len(0).unwrap();
        // Nothing cached past the new end: the read takes the copying path.
        assert!(map.read(0, MAP_MIN).is_none());
        // A read taken before the truncation copies zeros, never faults.
        assert!(before.copy_out().unwrap().iter().all(|&b| b == 0));
    }

    /// The safety claim itself: the kernel reading a page past a shrunk
    /// end fails the send with EFAULT; no SIGBUS reaches the process.
    #[test]
    fn a_send_from_a_truncated_mapping_fails_with_efault_not_sigbus() {
        let f = file_of(&vec![0x55; 1 << 20]);
        let map = FileMap::new(f.as_fd(), 1 << 20).unwrap();
        let r = map.read(0, 1 << 20).unwrap();
        f.set_len(0).unwrap();
        let (a, _b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        let sent = rustix::net::send(&a, r.for_kernel(), rustix::net::SendFlags::empty());
        assert_eq!(sent, Err(rustix::io::Errno::FAULT));
    }

    #[test]
    fn empty_files_are_not_mapped() {
        let f = file_of(&[]);
        assert!(FileMap::new(f.as_fd(), 0).is_none());
    }
}
