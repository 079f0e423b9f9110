//! Local file or block device, through io_uring (glommio).
//!
//! IO is buffered by default: tmpfs and overlayfs (the VM's root,
//! /dev/shm) refuse O_DIRECT outright. [`IoMode::Direct`] opens with
//! O_DIRECT: no page cache, so a write never allocates memory in the
//! kernel, which swap on the device needs (a buffered write under memory
//! pressure waits on reclaim that waits on the swap write: a deadlock).
//! Direct writes must be aligned, so the export advertises a 4 KiB minimum
//! block size and refuses misaligned writes with EINVAL.
//!
//! Durability comes from fdatasync: FLUSH syncs, FUA syncs before the
//! reply. All shards write the same inode (through one page cache, or
//! straight to the device), so one fdatasync covers writes acknowledged on
//! every connection, and multi-conn is safe.

use super::mapped::FileMap;
use super::*;
use glommio::io::{BufferedFile, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most extents one BLOCK_STATUS reply walks; the client asks again for more.
const MAX_EXTENTS: usize = 1024;
/// Chunk for writing explicit zeroes.
const ZERO_CHUNK: usize = 1 << 20;
/// Direct IO's alignment: a multiple of every logical block size (512 and
/// 4096) and of the page, so it holds on any device.
pub const DIRECT_ALIGN: u64 = 4096;

/// Whether IO goes through the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    #[default]
    Buffered,
    /// O_DIRECT: aligned IO straight to the storage.
    Direct,
}

pub struct FileBackend {
    size: u64,
    read_only: bool,
    io_mode: IoMode,
    storage: Probed,
    /// The inode opened (and, for control-route keys, confined) at open.
    file: Arc<std::fs::File>,
    /// The whole file mapped, for large cached reads (buffered mode only:
    /// O_DIRECT promised to bypass the cache).
    map: Option<Arc<FileMap>>,
}

/// What the filesystem under a file can do, asked at open rather than
/// assumed: tmpfs, overlayfs, NFS and old filesystems differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probed {
    /// fallocate(PUNCH_HOLE): TRIM frees space, and zeroes are fast.
    pub punch_hole: bool,
    /// lseek(SEEK_DATA/SEEK_HOLE): block status can tell holes from data.
    pub seek_data: bool,
}

impl Probed {
    /// Probes an open file. Punching past the end with KEEP_SIZE touches
    /// no data, so it is safe on a live image; read-only opens cannot punch.
    fn file(f: &std::fs::File, size: u64, writable: bool) -> Self {
        let fd = f.as_raw_fd();
        let punch_hole = writable && {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on an fd we own; the range lies past the end.
            unsafe { libc::fallocate(fd, mode, size as i64, 4096) == 0 }
        };
        // SAFETY: lseek only reads metadata (and moves this probe fd's offset).
        let seek_data = unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) } >= 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        Probed {
            punch_hole,
            seek_data,
        }
    }
}

impl FileBackend {
    /// Opens `path`, creating a sparse file of `size` bytes (mode 0600) when
    /// it is missing. An existing file keeps its own size. The path is the
    /// operator's (`--export`); control-route keys are confined first and
    /// come in through [`FileBackend::from_file`].
    pub fn open_or_create(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
        io_mode: IoMode,
    ) -> Result<Self, BackendError> {
        let cfg = |msg: String| BackendError::Config(format!("{}: {msg}", path.display()));
        if !path.is_absolute() {
            return Err(cfg("file exports need an absolute path".into()));
        }
        let open = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path);
        let file = match open {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let size =
                    size.ok_or_else(|| cfg("does not exist; give size=SIZE to create it".into()))?;
                if read_only {
                    return Err(cfg("does not exist and the export is read-only".into()));
                }
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| cfg(format!("cannot create: {e}")))?;
                f.set_len(size)
                    .map_err(|e| cfg(format!("cannot size to {size}: {e}")))?;
                f
            }
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(cfg("is neither a regular file nor a block device".into()))
            }
            Err(e) => return Err(cfg(e.to_string())),
        };
        let backend = Self::from_file(path, file, read_only, io_mode)?;
        if let Some(want) = size.filter(|&s| s != backend.size) {
            tracing::warn!(path = %path.display(), actual = backend.size, requested = want, "existing file keeps its own size");
        }
        Ok(backend)
    }

    /// Serves a file or block device already opened (read-write unless
    /// `read_only`). Every connection reopens this very inode, so renaming
    /// or replacing the path later changes nothing.
    pub fn from_file(
        path: &Path,
        file: std::fs::File,
        read_only: bool,
        io_mode: IoMode,
    ) -> Result<Self, BackendError> {
        let cfg = |msg: String| BackendError::Config(format!("{}: {msg}", path.display()));
        let meta = file.metadata().map_err(|e| cfg(e.to_string()))?;
        if io_mode == IoMode::Direct {
            // Asked now, so a filesystem without it fails the open, not IO.
            let reopen = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            if let Err(e) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&reopen)
            {
                return Err(cfg(match e.raw_os_error() {
                    Some(libc::EINVAL) => "its filesystem refuses O_DIRECT (tmpfs and overlayfs \
                                           do); serve it without direct"
                        .into(),
                    _ => format!("cannot open with O_DIRECT: {e}"),
                }));
            }
        }
        let block_device = meta.file_type().is_block_device();
        let (size, storage) = if block_device {
            // SAFETY: lseek on a valid fd has no memory effects.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(cfg(format!(
                    "cannot size: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // Discard on devices is BLKDISCARD, which this backend does not
            // issue; a device's lseek reports it all as data.
            let storage = Probed {
                punch_hole: false,
                seek_data: true,
            };
            (end as u64, storage)
        } else if meta.is_file() {
            (meta.len(), Probed::file(&file, meta.len(), !read_only))
        } else {
            return Err(cfg("is neither a regular file nor a block device".into()));
        };
        let map = match io_mode {
            IoMode::Buffered => FileMap::new(file.as_fd(), size),
            IoMode::Direct => None,
        };
        Ok(FileBackend {
            size,
            read_only,
            io_mode,
            storage,
            file: Arc::new(file),
            map,
        })
    }
}

impl Backend for FileBackend {
    fn handler(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        let p = self.storage;
        let mut block = BlockSizes::default();
        if self.io_mode == IoMode::Direct {
            block.min = DIRECT_ALIGN as u32;
            block.preferred = block.preferred.max(block.min);
        }
        Capabilities {
            trim: p.punch_hole,
            fast_zero: p.punch_hole,
            block_status: p.seek_data,
            block,
            ..Capabilities::all(self.read_only)
        }
    }

    fn mode(&self) -> String {
        let mut m = String::from(match self.io_mode {
            IoMode::Buffered => "buffered io_uring, FLUSH/FUA = fdatasync",
            IoMode::Direct => {
                "direct (O_DIRECT, 4 KiB aligned; a shard's lone request inline, others on its IO threads), FLUSH/FUA = fdatasync"
            }
        });
        if !self.read_only && !self.storage.punch_hole {
            m.push_str(", no hole punching (TRIM not offered, zeroes are written)");
        }
        if !self.storage.seek_data {
            m.push_str(", no SEEK_DATA (block status not offered)");
        }
        m
    }

    fn attach(&self) -> IoFuture<'static, Rc<dyn BackendIo>> {
        // Each connection gets its own open file (io_uring registers it per
        // shard) of the same inode: /proc/self/fd reopens what was checked
        // at open instead of resolving the path again.
        let held = self.file.clone();
        let (size, read_only, io_mode) = (self.size, self.read_only, self.io_mode);
        let map = self.map.clone();
        Box::pin(async move {
            let reopen = PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd()));
            let mut options = OpenOptions::new();
            options.read(true).write(!read_only);
            let open_err = |e: glommio::GlommioError<()>| BackendError::io("open", e.into());
            let buffered = options.buffered_open(&reopen).await.map_err(open_err)?;
            let file = match io_mode {
                IoMode::Buffered => Handle::Buffered(buffered),
                IoMode::Direct => {
                    let direct = std::fs::OpenOptions::new()
                        .read(true)
                        .write(!read_only)
                        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
                        .open(&reopen)
                        .map_err(|e| BackendError::io("open O_DIRECT", e))?;
                    Handle::Direct {
                        file: buffered,
                        direct: Arc::new(direct.into()),
                    }
                }
            };
            drop(held);
            // A second handle for the fallocate modes io_uring cannot take
            // from glommio; they run on glommio's blocking pool.
            let fd = file.as_raw_fd();
            // SAFETY: fd is open for as long as `file` lives, i.e. during this call.
            let blocking = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|e| BackendError::io("dup", e))?;
            let io: Rc<dyn BackendIo> = Rc::new(FileIo {
                file,
                blocking: Arc::new(blocking),
                size,
                map,
            });
            Ok(io)
        })
    }
}

struct FileIo {
    file: Handle,
    blocking: Arc<std::os::fd::OwnedFd>,
    size: u64,
    map: Option<Arc<FileMap>>,
}

/// One connection's open file: through the page cache or around it.
enum Handle {
    Buffered(BufferedFile),
    /// Reads and writes go to an O_DIRECT descriptor on glommio's blocking
    /// pool (glommio's own DmaFile probes io_uring polling with a read at
    /// offset 0, which a hole answers without IO, and then fails every
    /// read on devices that cannot poll); the buffered handle of the same
    /// inode does syncs, hole punching and seeks, which need no alignment.
    Direct {
        file: BufferedFile,
        direct: Arc<std::os::fd::OwnedFd>,
    },
}

fn align_down(v: u64) -> u64 {
    v & !(DIRECT_ALIGN - 1)
}

/// Runs a direct read or write on one of the shard's IO threads, or here
/// when it is the shard's only request: then nothing waits behind it, and
/// the hand-off (two cross-thread wakeups) would cost more than the IO.
async fn on_io_thread<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    if crate::backend::lone::alone() {
        return job();
    }
    glommio::executor().spawn_blocking(job).await
}

/// pread/pwrite until done, or end of file for reads.
pub(super) fn direct_io(
    fd: impl std::os::fd::AsFd,
    buf: &mut [u8],
    pos: u64,
    write: bool,
) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at = pos + done as u64;
        let n = if write {
            rustix::io::pwrite(&fd, &buf[done..], at)
        } else {
            rustix::io::pread(&fd, &mut buf[done..], at)
        };
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

impl Handle {
    fn as_raw_fd(&self) -> i32 {
        match self {
            Handle::Buffered(f) | Handle::Direct { file: f, .. } => f.as_raw_fd(),
        }
    }

    /// The page-cache file, when this request is its shard's only one: then
    /// a plain `pread`/`pwrite` here costs one syscall, where io_uring costs
    /// a submission, a completion and (for buffered writes, which it hands
    /// to its worker threads) a cross-thread wakeup; nothing waits behind it.
    fn lone_buffered(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self {
            Handle::Buffered(f) if crate::backend::lone::alone() => {
                // SAFETY: the descriptor lives as long as `f`, which `self` borrows.
                Some(unsafe { std::os::fd::BorrowedFd::borrow_raw(f.as_raw_fd()) })
            }
            _ => None,
        }
    }

    /// A large read spliced from the page cache into a pipe (page
    /// references, no copy), when its pages are cached or nothing else
    /// waits on the shard; None takes the copying path.
    fn splice(&self, offset: u64, len: usize) -> Option<std::io::Result<pipe::Spliced>> {
        let Handle::Buffered(f) = self else {
            return None; // O_DIRECT promised to bypass the cache
        };
        // SAFETY: the descriptor lives as long as `f`, which `self` borrows.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(f.as_raw_fd()) };
        pipe::fill_if_cached(fd, offset, len)
    }

    fn buffered(&self) -> &BufferedFile {
        match self {
            Handle::Buffered(f) | Handle::Direct { file: f, .. } => f,
        }
    }

    async fn read_at(&self, pos: u64, len: usize) -> Result<ReadBuf, BackendError> {
        let Handle::Direct { direct, .. } = self else {
            let r = self.buffered().read_at(pos, len).await;
            return r.map(ReadBuf::Glommio).map_err(gerr("read"));
        };
        // Widened to the alignment; the bytes past the end read as short.
        let from = align_down(pos);
        let to = align_down(pos + len as u64 + DIRECT_ALIGN - 1);
        let fd = direct.clone();
        // Taken and given back on this thread, so the blocking pool allocates nothing.
        let mut buf = AlignedBuf::take((to - from) as usize);
        let (buf, got) = on_io_thread(move || {
            let r = direct_io(&fd, &mut buf, from, false);
            (buf, r)
        })
        .await;
        let got = got.map_err(|e| BackendError::io("read", e))?;
        let start = (pos - from) as usize;
        let len = len.min(got.saturating_sub(start));
        Ok(ReadBuf::Aligned { buf, start, len })
    }

    /// Writes `data` at `pos`; returns the bytes written and, for direct
    /// IO (which copies into an aligned buffer), the buffer for reuse.
    async fn write_at(
        &self,
        data: Vec<u8>,
        pos: u64,
    ) -> Result<(usize, Option<Vec<u8>>), BackendError> {
        let Handle::Direct { direct, .. } = self else {
            let r = self.buffered().write_at(data, pos).await;
            return r.map(|n| (n, None)).map_err(gerr("write"));
        };
        if !pos.is_multiple_of(DIRECT_ALIGN) || !(data.len() as u64).is_multiple_of(DIRECT_ALIGN) {
            // Below the advertised minimum block size.
            return Err(BackendError::io(
                "misaligned direct write",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let mut buf = AlignedBuf::copy_of(&data);
        let fd = direct.clone();
        let (buf, n) = on_io_thread(move || {
            let r = direct_io(&fd, &mut buf, pos, true);
            (buf, r)
        })
        .await;
        drop(buf); // back to this thread's pool
        let n = n.map_err(|e| BackendError::io("write", e))?;
        Ok((n, Some(data)))
    }

    async fn fdatasync(&self) -> glommio::Result<(), ()> {
        self.buffered().fdatasync().await
    }

    async fn deallocate(&self, offset: u64, len: u64) -> glommio::Result<(), ()> {
        self.buffered().deallocate(offset, len).await
    }
}

/// The filesystem (or device) lacks this fallocate mode.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

fn gerr<T>(context: &'static str) -> impl FnOnce(glommio::GlommioError<T>) -> BackendError {
    move |e| BackendError::io(context, e.into())
}

impl FileIo {
    /// Completes a read that has `v` of its `len` bytes: past the end of a
    /// file that shrank under us reads as zeroes.
    async fn read_rest(
        &self,
        offset: u64,
        len: usize,
        mut v: Vec<u8>,
    ) -> Result<ReadBuf, BackendError> {
        while v.len() < len {
            let more = self
                .file
                .read_at(offset + v.len() as u64, len - v.len())
                .await?;
            if more.is_empty() {
                v.resize(len, 0);
                break;
            }
            more.slices().for_each(|s| v.extend_from_slice(s));
        }
        Ok(ReadBuf::Vec(v))
    }

    async fn sync(&self) -> Result<(), BackendError> {
        self.file.fdatasync().await.map_err(gerr("fdatasync"))
    }

    /// glommio takes the buffer by value, so a short write cannot be
    /// resumed; it only happens when the disk fills, and the client gets the error.
    async fn write_all(
        &self,
        offset: u64,
        mut data: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, BackendError> {
        let len = data.len();
        let (n, spare) = match self.file.lone_buffered() {
            Some(fd) => {
                let n = direct_io(fd, &mut data, offset, true)
                    .map_err(|e| BackendError::io("write", e))?;
                (n, Some(data))
            }
            None => self.file.write_at(data, offset).await?,
        };
        if n < len {
            return Err(BackendError::io(
                "short write",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(spare)
    }

    async fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), BackendError> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.write_all(offset, vec![0u8; n]).await?;
            offset += n as u64;
        }
        Ok(())
    }

    /// fallocate(2) off the shard's thread; Ok(false) when the mode is unsupported.
    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<bool, BackendError> {
        let fd = self.blocking.clone();
        let result = glommio::executor()
            .spawn_blocking(move || {
                // SAFETY: fallocate on an fd we own; no memory is passed.
                let r = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => Ok(false),
            Err(e) => Err(BackendError::io("fallocate", e)),
        }
    }

    /// Deallocates a range (it then reads as zeroes); false if unsupported.
    async fn punch_hole(&self, offset: u64, len: u64) -> Result<bool, BackendError> {
        match self.file.deallocate(offset, len).await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e: std::io::Error = e.into();
                if unsupported(&e) {
                    Ok(false)
                } else {
                    Err(BackendError::io("punch hole", e))
                }
            }
        }
    }

    /// Zeroes a range and keeps it allocated, without writing data:
    /// ZERO_RANGE where the filesystem has it (ext4, xfs, block devices),
    /// else a punched hole re-allocated (tmpfs); false if neither works.
    async fn zero_allocated(&self, offset: u64, len: u64) -> Result<bool, BackendError> {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE | keep, offset, len)
            .await?
        {
            return Ok(true);
        }
        Ok(self.punch_hole(offset, len).await? && self.fallocate(keep, offset, len).await?)
    }

    fn seek(&self, pos: u64, whence: i32) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on our open fd; SEEK_DATA/SEEK_HOLE only read metadata.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(err)
        }
    }

    fn map_extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        let end = (offset + len).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent {
                    len: data - pos,
                    flags: HOLE,
                });
                pos = data;
                continue;
            }
            let hole = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            out.push(Extent {
                len: hole.max(pos + 1) - pos,
                flags: DATA,
            });
            pos = hole.max(pos + 1);
        }
        Ok(out)
    }
}

impl BackendIo for FileIo {
    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            // A range the mapping covers is sent from it when cached and
            // copied when not; splicing is for ranges past it (a grown export).
            let mapped = self.map.as_ref().filter(|m| m.covers(offset, len));
            if let Some(read) = mapped.and_then(|m| m.read(offset, len)) {
                return Ok(ReadBuf::Mapped { read, spare: buf });
            }
            if let Some(pipe) = mapped
                .is_none()
                .then(|| self.file.splice(offset, len))
                .flatten()
            {
                let pipe = pipe.map_err(|e| BackendError::io("read", e))?;
                if pipe.len() == len {
                    return Ok(ReadBuf::Spliced { pipe, spare: buf });
                }
                // Short (end of file, or pages that did not fit the pipe):
                // the rest is copied.
                let v = pipe.into_vec().map_err(|e| BackendError::io("read", e))?;
                return self.read_rest(offset, len, v).await;
            }
            if let Some(fd) = self.file.lone_buffered() {
                let mut v = buf;
                v.resize(len, 0);
                let got = direct_io(fd, &mut v, offset, false)
                    .map_err(|e| BackendError::io("read", e))?;
                // Past the end of a file that shrank under us reads as zeros.
                v[got..].fill(0);
                return Ok(ReadBuf::Vec(v));
            }
            let first = self.file.read_at(offset, len).await?;
            if first.len() == len {
                return Ok(first);
            }
            // Short read: the file shrank under us or io_uring split it.
            let mut v = Vec::with_capacity(len);
            first.slices().for_each(|s| v.extend_from_slice(s));
            self.read_rest(offset, len, v).await
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> IoFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let spare = self.write_all(offset, data).await?;
            if fua {
                self.sync().await?;
            }
            Ok(spare)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.sync())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            // TRIM is advisory: without hole punching the data just stays.
            self.punch_hole(offset, len).await?;
            if fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let zeroed = if flags.no_hole {
                self.zero_allocated(offset, len).await?
            } else {
                self.punch_hole(offset, len).await? || self.zero_allocated(offset, len).await?
            };
            if !zeroed {
                if flags.fast {
                    return Err(BackendError::Unsupported);
                }
                self.write_zero_bytes(offset, len).await?;
            }
            if flags.fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        // SAFETY: advisory call on our fd.
        let r = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        let res = if r == 0 {
            Ok(())
        } else {
            Err(BackendError::io(
                "fadvise",
                std::io::Error::from_raw_os_error(r),
            ))
        };
        Box::pin(std::future::ready(res))
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        let res = match self.map_extents(offset, len) {
            Ok(v) => Ok(v),
            // No SEEK_DATA support: everything is data, which is always true.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Ok(vec![Extent { len, flags: DATA }])
            }
            Err(e) => Err(BackendError::io("seek data", e)),
        };
        Box::pin(std::future::ready(res))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;

    /// Runs `f` on a glommio executor against a fresh sparse file of `size`.
    fn with_file<F, Fut>(dir: &Path, size: u64, f: F)
    where
        F: FnOnce(Rc<dyn BackendIo>, PathBuf) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        with_file_in(dir, size, IoMode::Buffered, f)
    }

    fn with_file_in<F, Fut>(dir: &Path, size: u64, mode: IoMode, f: F)
    where
        F: FnOnce(Rc<dyn BackendIo>, PathBuf) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let path = dir.join("disk.raw");
        LocalExecutorBuilder::default()
            .spawn(move || async move {
                let backend = FileBackend::open_or_create(&path, Some(size), false, mode).unwrap();
                let io = backend.attach().await.unwrap();
                f(io, path).await
            })
            .unwrap()
            .join()
            .unwrap();
    }

    fn blocks(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks()
    }

    const MIB: u64 = 1 << 20;

    fn test_dirs() -> Vec<tempfile::TempDir> {
        // The disk-backed temp dir and tmpfs take different fallocate paths.
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        dirs
    }

    #[test]
    fn write_read_flush_and_fua() {
        for dir in test_dirs() {
            with_file(dir.path(), 4 * MIB, |io, path| async move {
                let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
                io.write(4095, data.clone(), true).await.unwrap();
                io.flush().await.unwrap();
                let back = io.read(4095, data.len(), Vec::new()).await.unwrap();
                assert_eq!(&back.to_vec()[..], &data[..]);
                let on_disk = std::fs::read(&path).unwrap();
                assert_eq!(&on_disk[4095..4095 + 8192], &data[..]);
                assert_eq!(on_disk.len() as u64, 4 * MIB);
            });
        }
    }

    /// A lone request takes plain `pread`/`pwrite`, one with company goes
    /// through io_uring: each must see what the other wrote, and both read
    /// zeros past the end of a file that shrank under them.
    #[test]
    fn lone_and_queued_requests_share_one_view_of_the_file() {
        use crate::backend::lone;
        for dir in test_dirs() {
            with_file(dir.path(), 4 * MIB, |io, path| async move {
                let a: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
                let b: Vec<u8> = (0..7000u32).map(|i| (i % 241) as u8).collect();
                assert!(lone::alone());
                io.write(100, a.clone(), false).await.unwrap();
                lone::started();
                lone::started(); // now two in flight: the io_uring path
                assert_eq!(
                    &io.read(100, a.len(), Vec::new()).await.unwrap().to_vec()[..],
                    &a[..]
                );
                io.write(MIB + 3, b.clone(), false).await.unwrap();
                lone::finished();
                lone::finished();
                assert_eq!(
                    &io.read(MIB + 3, b.len(), Vec::new())
                        .await
                        .unwrap()
                        .to_vec()[..],
                    &b[..]
                );
                // Shrink behind the server's back: both paths pad with zeros.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(MIB + 1003)
                    .unwrap();
                let mut want = b[..1000].to_vec();
                want.resize(b.len(), 0);
                // A reused buffer may hold stale bytes: none may leak past the end.
                let lone_read = io
                    .read(MIB + 3, b.len(), vec![0xff; b.len()])
                    .await
                    .unwrap();
                assert_eq!(&lone_read.to_vec()[..], &want[..]);
                lone::started();
                lone::started();
                let queued_read = io.read(MIB + 3, b.len(), Vec::new()).await.unwrap();
                lone::finished();
                lone::finished();
                assert_eq!(&queued_read.to_vec()[..], &want[..]);
            });
        }
    }

    #[test]
    fn direct_io_is_aligned_and_bypasses_nothing_it_promises() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let b = FileBackend::open_or_create(&path, Some(MIB), false, IoMode::Direct).unwrap();
        let caps = b.capabilities();
        assert_eq!((caps.block.min, caps.block.preferred), (4096, 4096));
        assert!(caps.multi_conn && caps.flush && caps.fua);
        assert!(b.mode().contains("O_DIRECT"), "{}", b.mode());
        drop(b);
        std::fs::remove_file(&path).unwrap();
        with_file_in(dir.path(), 4 * MIB, IoMode::Direct, |io, path| async move {
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            let spare = io.write(4096, data.clone(), true).await.unwrap();
            assert_eq!(spare.as_deref(), Some(&data[..]), "the buffer comes back");
            // Reads need no alignment.
            let back = io.read(4096 + 7, 100, Vec::new()).await.unwrap();
            assert_eq!(&back.to_vec()[..], &data[7..107]);
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(&on_disk[4096..4096 + 8192], &data[..]);
            // Below the advertised minimum block size: EINVAL, nothing written.
            for (off, len) in [(4095, 4096), (0, 100), (8192, 4097)] {
                let e = io.write(off, vec![9; len], false).await.unwrap_err();
                assert_eq!(e.errno(), Errno::Inval, "{off}+{len}");
            }
            assert_eq!(std::fs::read(&path).unwrap(), on_disk);
            // TRIM and zeroes take the fallocate paths, aligned or not.
            io.write_zeroes(4096, 4096, ZeroFlags::default())
                .await
                .unwrap();
            io.trim(8192, 4096, true).await.unwrap();
            let back = io.read(0, 3 * 4096, Vec::new()).await.unwrap();
            assert!(back.to_vec().iter().all(|&b| b == 0));
            io.flush().await.unwrap();
            // With other requests in flight, on the IO threads: the same bytes.
            crate::backend::lone::started();
            crate::backend::lone::started();
            let more: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
            io.write(3 * 4096, more.clone(), false).await.unwrap();
            let back = io.read(3 * 4096 + 5, 4000, Vec::new()).await.unwrap();
            assert_eq!(&back.to_vec()[..], &more[5..4005]);
            crate::backend::lone::finished();
            crate::backend::lone::finished();
        });
    }

    #[test]
    fn storage_abilities_are_probed_at_open_without_touching_the_file() {
        for dir in test_dirs() {
            let path = dir.path().join("probe.raw");
            let b = FileBackend::open_or_create(&path, Some(MIB), false, IoMode::Buffered).unwrap();
            // tmpfs and the local disk both punch holes and seek data.
            assert_eq!(
                b.storage,
                Probed {
                    punch_hole: true,
                    seek_data: true
                },
                "{}",
                dir.path().display()
            );
            let caps = b.capabilities();
            assert!(caps.trim && caps.fast_zero && caps.block_status);
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), MIB, "the probe kept the size");
            assert_eq!(blocks(&path), 0, "the probe allocated nothing");
            // A read-only open cannot punch, so it offers no TRIM.
            let ro = FileBackend::open_or_create(&path, None, true, IoMode::Buffered).unwrap();
            assert!(!ro.storage.punch_hole && ro.storage.seek_data);
            assert!(!ro.capabilities().trim);
        }
    }

    #[test]
    fn trim_and_write_zeroes_deallocate_or_keep_allocation() {
        for dir in test_dirs() {
            with_file(dir.path(), 8 * MIB, |io, path| async move {
                io.write(0, vec![0xaa; 4 * MIB as usize], false)
                    .await
                    .unwrap();
                let full = blocks(&path);
                assert_eq!(io.extents(0, 4 * MIB).await.unwrap()[0].flags, DATA);

                // Punching: the range reads zero and becomes a hole.
                io.trim(0, MIB, false).await.unwrap();
                let z = ZeroFlags::default();
                io.write_zeroes(MIB, MIB, z).await.unwrap();
                assert!(blocks(&path) < full, "nothing deallocated");
                let ext = io.extents(0, 4 * MIB).await.unwrap();
                assert_eq!(
                    ext[0],
                    Extent {
                        len: 2 * MIB,
                        flags: HOLE
                    }
                );

                // NO_HOLE: zeroes that are allocated again, data or not
                // (ext4 reports unwritten extents as holes to SEEK_DATA).
                let punched = blocks(&path);
                let no_hole = ZeroFlags {
                    no_hole: true,
                    fast: true,
                    fua: true,
                };
                io.write_zeroes(0, MIB, no_hole).await.unwrap();
                assert!(blocks(&path) >= punched + MIB / 512, "NO_HOLE left a hole");
                io.write_zeroes(2 * MIB, MIB, no_hole).await.unwrap();

                let back = io.read(0, 3 * MIB as usize, Vec::new()).await.unwrap();
                assert!(back.to_vec().iter().all(|&b| b == 0));
                let tail = io.read(3 * MIB, MIB as usize, Vec::new()).await.unwrap();
                assert!(tail.to_vec().iter().all(|&b| b == 0xaa));
            });
        }
    }

    #[test]
    fn extents_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        with_file(dir.path(), 4 * MIB, |io, _| async move {
            io.write(MIB, vec![1; 4096], false).await.unwrap();
            let ext = io.extents(0, 4 * MIB).await.unwrap();
            assert_eq!(
                ext[0],
                Extent {
                    len: MIB,
                    flags: HOLE
                }
            );
            assert_eq!(ext[1].flags, DATA);
            assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 4 * MIB);
            // Asked from inside the hole, the answer starts there.
            let ext = io.extents(4096, 8192).await.unwrap();
            assert_eq!(
                ext,
                vec![Extent {
                    len: 8192,
                    flags: HOLE
                }]
            );
        });
    }

    #[test]
    fn open_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        let err = |r: Result<FileBackend, BackendError>| r.err().unwrap().to_string();
        assert!(err(FileBackend::open_or_create(
            Path::new("rel.raw"),
            Some(1),
            false,
            IoMode::Buffered
        ))
        .contains("absolute"));
        assert!(err(FileBackend::open_or_create(
            &p,
            None,
            false,
            IoMode::Buffered
        ))
        .contains("size=SIZE"));
        assert!(err(FileBackend::open_or_create(
            &p,
            Some(MIB),
            true,
            IoMode::Buffered
        ))
        .contains("read-only"));
        assert!(err(FileBackend::open_or_create(
            dir.path(),
            None,
            false,
            IoMode::Buffered
        ))
        .contains("neither"));

        let b = FileBackend::open_or_create(&p, Some(MIB), false, IoMode::Buffered).unwrap();
        assert_eq!(b.size(), MIB);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "new images are private");
        // An existing file keeps its own size whatever size= says.
        let again = FileBackend::open_or_create(&p, Some(8 * MIB), true, IoMode::Buffered).unwrap();
        assert_eq!(again.size(), MIB);
        let caps = again.capabilities();
        assert!(caps.read_only && caps.flush && caps.multi_conn);
    }
}
