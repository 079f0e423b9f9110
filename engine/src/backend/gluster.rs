//! GlusterFS files through libgfapi, keyed `VOLUME/FILEPATH`.
//!
//! One `glfs_t` per (volfile server, volume) is shared by every backstore on
//! it ([`volume`]); each shard opens its own fd and does IO through gfapi's
//! async calls, completed back onto the shard ([`io`]). FUA and FLUSH are
//! fdatasync, which write-behind honours for writes from every fd of the
//! same mount, so one FLUSH covers all connections (multi-conn).

mod io;
mod volume;

pub use volume::{VolfileServer, DEFAULT_PORT};

use super::*;
use std::sync::Arc;
use std::time::Duration;
use volume::Volume;

/// How long IO waits for an unreachable volume (a brick restarting) before
/// failing; the kernel client waits longer by default.
pub const RETRY_FOR: Duration = Duration::from_secs(120);
/// Preallocation step, for progress reports.
const PREALLOC_STEP: u64 = 1 << 30;

pub struct GlusterBackend {
    volume: Arc<Volume>,
    key: Arc<str>,
    /// Path inside the volume, with a leading '/'.
    path: String,
    size: u64,
    read_only: bool,
}

/// Splits `VOLUME/FILEPATH` into the volume and an absolute path in it.
fn split_key(key: &str) -> Result<(&str, String), BackendError> {
    match key.split_once('/') {
        Some((vol, path)) if !vol.is_empty() && !path.is_empty() => Ok((vol, format!("/{path}"))),
        _ => Err(BackendError::Config(format!(
            "bad gluster key {key:?}: expected VOLUME/FILEPATH"
        ))),
    }
}

/// "gluster VOL/PATH at HOST:PORT: WHAT: ERROR", with a hint for the usual causes.
fn fail(key: &str, server: &VolfileServer, what: &str, e: std::io::Error) -> BackendError {
    let mounting = what == MOUNT;
    let hint = match e.raw_os_error() {
        Some(libc::ENOENT) if mounting => " (no such volume on that server?)",
        Some(libc::ENOTCONN | libc::ECONNREFUSED) if mounting => {
            " (is glusterd running there and the volume started?)"
        }
        Some(libc::ENOENT) => " (does its directory exist on the volume?)",
        Some(libc::ENOTCONN) => " (the volume's bricks are unreachable)",
        Some(libc::EACCES | libc::EPERM) => " (permission denied by the volume)",
        Some(libc::ENOSPC | libc::EDQUOT) => " (the volume is full)",
        _ => "",
    };
    BackendError::Config(format!("gluster {key} at {server}: {what}: {e}{hint}"))
}

const MOUNT: &str = "cannot mount the volume";

impl GlusterBackend {
    /// Opens `VOLUME/FILEPATH`; with `create = Some(size)` a missing file is
    /// created (sparse, or allocated with `prealloc`). Returns whether it was
    /// created. Blocking: call from the control plane, never on a shard.
    pub fn open(
        server: &VolfileServer,
        key: &str,
        create: Option<(u64, bool)>,
        read_only: bool,
        progress: Progress,
    ) -> Result<(Self, bool), BackendError> {
        let (vol_name, path) = split_key(key)?;
        let volume = volume::volume(server, vol_name).map_err(|e| fail(key, server, MOUNT, e))?;
        let existing = volume
            .stat(&path)
            .map_err(|e| fail(key, server, "cannot stat the file", e))?;
        let (size, created) = match (existing, create) {
            (Some(size), Some((want, _))) if size != want => {
                return Err(BackendError::Config(format!(
                    "gluster {key} exists with size {size}, not {want}; give its size to adopt it"
                )))
            }
            (Some(size), _) => (size, false),
            (None, None) => {
                return Err(BackendError::Config(format!(
                    "gluster {key} at {server}: the file is gone"
                )))
            }
            (None, Some(_)) if read_only => {
                return Err(BackendError::Config(format!(
                    "gluster {key}: does not exist and the export is read-only"
                )))
            }
            (None, Some((size, prealloc))) => {
                let fd = volume
                    .create(&path, size)
                    .map_err(|e| fail(key, server, "cannot create the file", e))?;
                if prealloc {
                    if let Err(e) = preallocate(key, &fd, size, progress) {
                        drop(fd);
                        let _ = volume.unlink(&path);
                        return Err(fail(key, server, "preallocation failed", e));
                    }
                }
                (size, true)
            }
        };
        Ok((
            GlusterBackend {
                volume,
                key: key.into(),
                path,
                size,
                read_only,
            },
            created,
        ))
    }

    /// Deletes the file of `VOLUME/FILEPATH`; a missing file is fine. Blocking.
    pub fn remove(server: &VolfileServer, key: &str) -> Result<(), BackendError> {
        let (vol_name, path) = split_key(key)?;
        let volume = volume::volume(server, vol_name).map_err(|e| fail(key, server, MOUNT, e))?;
        match volume.unlink(&path) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                Err(fail(key, server, "cannot delete the file", e))
            }
            _ => Ok(()),
        }
    }
}

/// Allocates the whole file in steps, reporting progress after each.
fn preallocate(key: &str, fd: &volume::Fd, size: u64, progress: Progress) -> std::io::Result<()> {
    let mut done = 0;
    while done < size {
        let step = (size - done).min(PREALLOC_STEP);
        fd.preallocate(done, step)?;
        done += step;
        progress(done, size);
        if size > PREALLOC_STEP {
            tracing::info!(backstore = key, "preallocating: {}%", done * 100 / size);
        }
    }
    Ok(())
}

impl Backend for GlusterBackend {
    fn handler(&self) -> &'static str {
        "gluster"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // discard punches a hole on the brick; zeroes without a hole go
        // through zerofill, which may write, so those answer ENOTSUP to
        // FAST_ZERO. gfapi has no readahead hint.
        Capabilities {
            cache: false,
            ..Capabilities::all(self.read_only)
        }
    }

    fn mode(&self) -> String {
        format!(
            "libgfapi async on volume {} at {}, FLUSH/FUA = fdatasync",
            self.volume.name, self.volume.server
        )
    }

    fn attach(&self) -> IoFuture<'static, Rc<dyn BackendIo>> {
        let (volume, path, read_only) = (self.volume.clone(), self.path.clone(), self.read_only);
        let (size, key) = (self.size, self.key.clone());
        Box::pin(async move {
            let mut backoff = io::Backoff::new(RETRY_FOR);
            let fd = loop {
                let (volume, path) = (volume.clone(), path.clone());
                let opened = glommio::executor()
                    .spawn_blocking(move || volume.open(&path, read_only))
                    .await;
                match opened {
                    Ok(fd) => break fd,
                    Err(e) => {
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        if !backoff.wait(&key, "open", errno).await {
                            return Err(BackendError::io("gluster open", e));
                        }
                    }
                }
            };
            let io: Rc<dyn BackendIo> = Rc::new(io::GlusterIo {
                fd: Arc::new(fd),
                size,
                retry_for: RETRY_FOR,
                key,
            });
            Ok(io)
        })
    }
}

impl BackendIo for io::GlusterIo {
    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move { Ok(ReadBuf::Vec(self.read_into(offset, len, buf).await?)) })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> IoFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let data = self.write_all(offset, data).await?;
            if fua {
                self.datasync().await?;
            }
            Ok(Some(data))
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.datasync())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.discard(offset, len).await?;
            if fua {
                self.datasync().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let punched = if flags.no_hole {
                false
            } else {
                match self.discard(offset, len).await {
                    Ok(()) => true,
                    Err(e) if e.errno() == crate::protocol::Errno::NotSup => false,
                    Err(e) => return Err(e),
                }
            };
            if !punched {
                if flags.fast {
                    return Err(BackendError::Unsupported);
                }
                self.zerofill(offset, len).await?;
            }
            if flags.fua {
                self.datasync().await?;
            }
            Ok(())
        })
    }

    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Err(BackendError::Unsupported)))
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(self.map_extents(offset, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_volume_and_path() {
        assert_eq!(split_key("vol/a.img").unwrap(), ("vol", "/a.img".into()));
        assert_eq!(
            split_key("vol/d/a.img").unwrap(),
            ("vol", "/d/a.img".into())
        );
        for bad in ["vol", "/a.img", "vol/", ""] {
            assert!(split_key(bad).is_err(), "{bad} accepted");
        }
    }
}
