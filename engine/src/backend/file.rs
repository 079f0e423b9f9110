//! Local file or block device, through io_uring (glommio).
//!
//! IO is buffered: O_DIRECT would need every client request aligned, and
//! tmpfs/overlayfs (the VM's root, /dev/shm) refuse it outright. Durability
//! comes from fdatasync: FLUSH syncs, FUA syncs before the reply. Since all
//! shards write through the same page cache, one fdatasync covers writes
//! acknowledged on every connection, so multi-conn is safe.

use super::*;
use glommio::io::{BufferedFile, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Most extents one BLOCK_STATUS reply walks; the client asks again for more.
const MAX_EXTENTS: usize = 1024;
/// Chunk for writing explicit zeroes.
const ZERO_CHUNK: usize = 1 << 20;

pub struct FileBackend {
    path: PathBuf,
    size: u64,
    read_only: bool,
    block_device: bool,
}

impl FileBackend {
    /// Opens `path`, creating a sparse file of `size` bytes (mode 0600) when
    /// it is missing. An existing file keeps its own size.
    pub fn open_or_create(
        path: &Path,
        size: Option<u64>,
        read_only: bool,
    ) -> Result<Self, BackendError> {
        let cfg = |msg: String| BackendError::Config(format!("{}: {msg}", path.display()));
        if !path.is_absolute() {
            return Err(cfg("file exports need an absolute path".into()));
        }
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let size =
                    size.ok_or_else(|| cfg("does not exist; give size=SIZE to create it".into()))?;
                if read_only {
                    return Err(cfg("does not exist and the export is read-only".into()));
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| cfg(format!("cannot create: {e}")))?;
                f.set_len(size)
                    .map_err(|e| cfg(format!("cannot size to {size}: {e}")))?;
                f.metadata().map_err(|e| cfg(e.to_string()))?
            }
            Err(e) => return Err(cfg(e.to_string())),
        };
        let block_device = meta.file_type().is_block_device();
        let actual = if block_device {
            let f = std::fs::File::open(path).map_err(|e| cfg(e.to_string()))?;
            // SAFETY: lseek on a valid fd has no memory effects.
            let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(cfg(format!(
                    "cannot size: {}",
                    std::io::Error::last_os_error()
                )));
            }
            end as u64
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(cfg("is neither a regular file nor a block device".into()));
        };
        if let Some(want) = size.filter(|&s| s != actual) {
            tracing::warn!(path = %path.display(), actual, requested = want, "existing file keeps its own size");
        }
        Ok(FileBackend {
            path: path.to_owned(),
            size: actual,
            read_only,
            block_device,
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
        Capabilities {
            read_only: self.read_only,
            flush: true,
            fua: true,
            trim: !self.block_device,
            zero: true,
            fast_zero: !self.block_device,
            cache: true,
            block_status: true,
            multi_conn: true,
            rotational: false,
            block: BlockSizes::default(),
        }
    }

    fn mode(&self) -> String {
        "buffered io_uring, FLUSH/FUA = fdatasync".into()
    }

    fn attach(&self) -> IoFuture<'static, Rc<dyn BackendIo>> {
        let path = self.path.clone();
        let (size, read_only) = (self.size, self.read_only);
        Box::pin(async move {
            let file = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .buffered_open(&path)
                .await
                .map_err(|e| BackendError::io("open", e.into()))?;
            let io: Rc<dyn BackendIo> = Rc::new(FileIo { file, size });
            Ok(io)
        })
    }
}

struct FileIo {
    file: BufferedFile,
    size: u64,
}

fn gerr<T>(context: &'static str) -> impl FnOnce(glommio::GlommioError<T>) -> BackendError {
    move |e| BackendError::io(context, e.into())
}

impl FileIo {
    async fn sync(&self) -> Result<(), BackendError> {
        self.file.fdatasync().await.map_err(gerr("fdatasync"))
    }

    /// glommio takes the buffer by value, so a short write cannot be
    /// resumed; it only happens when the disk fills, and the client gets the error.
    async fn write_all(&self, offset: u64, data: Vec<u8>) -> Result<(), BackendError> {
        let len = data.len();
        let n = self
            .file
            .write_at(data, offset)
            .await
            .map_err(gerr("write"))?;
        if n < len {
            return Err(BackendError::io(
                "short write",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
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
    fn read(&self, offset: u64, len: usize, _buf: Vec<u8>) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            let first = self.file.read_at(offset, len).await.map_err(gerr("read"))?;
            if first.len() == len {
                return Ok(ReadBuf::Glommio(first));
            }
            // Short read: the file shrank under us or io_uring split it.
            let mut v = Vec::with_capacity(len);
            v.extend_from_slice(&first);
            while v.len() < len {
                let more = self
                    .file
                    .read_at(offset + v.len() as u64, len - v.len())
                    .await
                    .map_err(gerr("read"))?;
                if more.is_empty() {
                    v.resize(len, 0);
                    break;
                }
                v.extend_from_slice(&more);
            }
            Ok(ReadBuf::Vec(v))
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> IoFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            self.write_all(offset, data).await?;
            if fua {
                self.sync().await?;
            }
            Ok(None)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.sync())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            match self.file.deallocate(offset, len).await {
                Ok(()) => {}
                // TRIM is advisory: a filesystem without hole punching just keeps the data.
                Err(e) => {
                    let e: std::io::Error = e.into();
                    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                        return Err(BackendError::io("punch hole", e));
                    }
                }
            }
            if fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let punched = if flags.no_hole {
                false
            } else {
                match self.file.deallocate(offset, len).await {
                    Ok(()) => true,
                    Err(e) => {
                        let e: std::io::Error = e.into();
                        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                            return Err(BackendError::io("punch hole", e));
                        }
                        false
                    }
                }
            };
            if !punched {
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
