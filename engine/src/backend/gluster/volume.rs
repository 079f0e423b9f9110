//! Volumes (one `glfs_t` per volfile server and volume, shared by every
//! backstore on it and never finalised: `glfs_fini` takes ~10 s) and the
//! blocking gfapi calls around them. Nothing here may run on a shard.

use gfapi_sys as ffi;
use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};

/// glusterd's management port, where clients fetch the volfile.
pub const DEFAULT_PORT: u16 = 24007;
/// gfapi's log level for errors only (GF_LOG_ERROR).
const LOG_ERRORS: i32 = 4;

/// Where the volfile comes from: `HOST[:PORT]`, `[V6ADDR]:PORT` or a bare
/// IPv6 address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolfileServer {
    pub host: String,
    pub port: u16,
}

impl Default for VolfileServer {
    fn default() -> Self {
        VolfileServer {
            host: "localhost".into(),
            port: DEFAULT_PORT,
        }
    }
}

impl fmt::Display for VolfileServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for VolfileServer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("bad gluster server {s:?}: {why} (expected HOST[:PORT])");
        let (host, port) = crate::config::hostport::split_host_port(s).map_err(bad)?;
        if host.is_empty() || host.contains(['/', ' ', '\0']) {
            return Err(bad("empty or invalid host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("port must be 1-65535"))?,
        };
        Ok(VolfileServer {
            host: host.to_owned(),
            port,
        })
    }
}

/// An initialised virtual mount of one volume.
pub struct Volume {
    fs: *mut ffi::glfs_t,
    pub name: String,
    pub server: VolfileServer,
}

// SAFETY: a glfs_t is built for concurrent use from any thread.
unsafe impl Send for Volume {}
// SAFETY: as above.
unsafe impl Sync for Volume {}

type VolumeKey = (VolfileServer, String);
static VOLUMES: LazyLock<Mutex<HashMap<VolumeKey, Arc<Volume>>>> = LazyLock::new(Default::default);

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The last gfapi error of this thread.
fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Turns gfapi's `-1 + errno` convention into a Result.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(last_error())
    } else {
        Ok(())
    }
}

/// A raw pointer that may travel to a helper thread.
struct SendPtr<T>(*mut T);
// SAFETY: only used for gfapi objects, which are thread-safe.
unsafe impl<T> Send for SendPtr<T> {}

/// The shared mount of `name` at `server`, set up on first use. Blocking.
pub fn volume(server: &VolfileServer, name: &str) -> io::Result<Arc<Volume>> {
    let mut map = VOLUMES.lock().unwrap_or_else(|e| e.into_inner());
    let key = (server.clone(), name.to_owned());
    if let Some(v) = map.get(&key) {
        return Ok(v.clone());
    }
    let vol = Arc::new(Volume::init(server, name)?);
    map.insert(key, vol.clone());
    Ok(vol)
}

impl Volume {
    fn init(server: &VolfileServer, name: &str) -> io::Result<Volume> {
        let cname = cstr(name)?;
        let host = cstr(&server.host)?;
        // SAFETY: plain gfapi setup calls on a fresh glfs_t with valid C strings.
        unsafe {
            let fs = ffi::glfs_new(cname.as_ptr());
            if fs.is_null() {
                return Err(last_error());
            }
            let setup = (|| {
                check(ffi::glfs_set_volfile_server(
                    fs,
                    c"tcp".as_ptr(),
                    host.as_ptr(),
                    server.port.into(),
                ))?;
                // "-" is stderr, where the runner logs too; errors only.
                check(ffi::glfs_set_logging(fs, c"-".as_ptr(), LOG_ERRORS))?;
                // Cached writes whose sync failed (brick restarting) are kept
                // and retried by the next fsync, so a retried FLUSH that
                // succeeds really covers them (qemu sets the same).
                let _ = ffi::glfs_set_xlator_option(
                    fs,
                    c"*-write-behind".as_ptr(),
                    c"resync-failed-syncs-after-fsync".as_ptr(),
                    c"on".as_ptr(),
                );
                check(ffi::glfs_init(fs))
            })();
            if let Err(e) = setup {
                // fini is slow and this is a failure path: off to a thread.
                let p = SendPtr(fs);
                std::thread::spawn(move || {
                    let p = p;
                    ffi::glfs_fini(p.0)
                });
                return Err(e);
            }
            Ok(Volume {
                fs,
                name: name.to_owned(),
                server: server.clone(),
            })
        }
    }

    /// Size of `path`, or None when it does not exist.
    pub fn stat(&self, path: &str) -> io::Result<Option<u64>> {
        let p = cstr(path)?;
        // SAFETY: zeroed stat is a valid out-buffer for glfs_stat.
        let mut st: ffi::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fs, C string and out-buffer.
        match check(unsafe { ffi::glfs_stat(self.fs, p.as_ptr(), &mut st) }) {
            Ok(()) if (st.st_mode & libc::S_IFMT) != libc::S_IFREG => {
                Err(io::Error::other("not a regular file"))
            }
            Ok(()) => Ok(Some(st.st_size as u64)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates `path` (mode 0600, sparse) of `size` bytes; fails if it exists.
    pub fn create(self: &Arc<Self>, path: &str, size: u64) -> io::Result<Fd> {
        let p = cstr(path)?;
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
        // SAFETY: valid fs and C string.
        let fd = self.wrap(unsafe { ffi::glfs_creat(self.fs, p.as_ptr(), flags, 0o600) })?;
        // SAFETY: fd is open; stat out-pointers may be null.
        let sized = check(unsafe {
            ffi::glfs_ftruncate(
                fd.raw(),
                size as i64,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        });
        if let Err(e) = sized {
            drop(fd);
            let _ = self.unlink(path);
            return Err(e);
        }
        Ok(fd)
    }

    pub fn open(self: &Arc<Self>, path: &str, read_only: bool) -> io::Result<Fd> {
        let p = cstr(path)?;
        let flags = if read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        // SAFETY: valid fs and C string.
        self.wrap(unsafe { ffi::glfs_open(self.fs, p.as_ptr(), flags) })
    }

    pub fn unlink(&self, path: &str) -> io::Result<()> {
        let p = cstr(path)?;
        // SAFETY: valid fs and C string.
        check(unsafe { ffi::glfs_unlink(self.fs, p.as_ptr()) })
    }

    fn wrap(self: &Arc<Self>, fd: *mut ffi::glfs_fd_t) -> io::Result<Fd> {
        if fd.is_null() {
            return Err(last_error());
        }
        Ok(Fd {
            fd,
            _volume: self.clone(),
        })
    }
}

/// An open file; closed on a helper thread when dropped, because
/// `glfs_close` waits on the network and the last holder may be a shard or
/// a gfapi callback thread (where waiting on gfapi would deadlock).
pub struct Fd {
    fd: *mut ffi::glfs_fd_t,
    _volume: Arc<Volume>,
}

// SAFETY: glfs_fd_t calls are thread-safe; gfapi refcounts the fd itself.
unsafe impl Send for Fd {}
// SAFETY: as above.
unsafe impl Sync for Fd {}

impl Drop for Fd {
    fn drop(&mut self) {
        let p = SendPtr(self.fd);
        std::thread::spawn(move || {
            let p = p;
            // SAFETY: nothing else uses the fd once the last holder is gone.
            unsafe { ffi::glfs_close(p.0) }
        });
    }
}

impl Fd {
    pub fn raw(&self) -> *mut ffi::glfs_fd_t {
        self.fd
    }

    /// `glfs_lseek` with SEEK_DATA/SEEK_HOLE; None past the last data (ENXIO).
    pub fn seek(&self, pos: u64, whence: i32) -> io::Result<Option<u64>> {
        // SAFETY: open fd; lseek passes no memory.
        let r = unsafe { ffi::glfs_lseek(self.fd, pos as i64, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = last_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Allocates `[offset, offset+len)` (fallocate mode 0); falls back to
    /// writing zeroes where the brick's filesystem cannot.
    pub fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: open fd; no memory passed.
        let r = unsafe { ffi::glfs_fallocate(self.fd, 0, offset as i64, len as usize) };
        match check(r) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // SAFETY: as above.
                check(unsafe { ffi::glfs_zerofill(self.fd, offset as i64, len as i64) })
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volfile_servers_parse() {
        let p = |s: &str| s.parse::<VolfileServer>();
        assert_eq!(p("gl1").unwrap().to_string(), "gl1:24007");
        assert_eq!(p("127.0.0.1:24010").unwrap().port, 24010);
        assert_eq!(p("::1").unwrap().to_string(), "[::1]:24007");
        assert_eq!(p("[fe80::1]:1").unwrap().host, "fe80::1");
        assert_eq!(VolfileServer::default().to_string(), "localhost:24007");
        for bad in ["", ":24007", "h:0", "h:x", "[::1", "a b"] {
            assert!(p(bad).is_err(), "{bad} accepted");
        }
    }
}
