//! Opening, creating and removing each handler's storage.

use crate::model::Handler;
use crate::saveconfig::SavedBackstore;
use nbd_engine::backend::{Backend, BackendError, FileBackend, MemBackend, Progress};
use std::collections::BTreeMap;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "gluster")]
use nbd_engine::backend::gluster::{GlusterBackend, VolfileServer};

/// Runner-wide handler settings, keyed `HANDLER.NAME` (e.g. `gluster.server`,
/// `ceph.conf`), from the runner's flags.
pub type HandlerDefaults = BTreeMap<String, String>;

/// A backstore's setting `name`: its own option if set, else the runner's
/// `HANDLER.name` default.
pub fn setting<'a>(
    b: &'a SavedBackstore,
    defaults: &'a HandlerDefaults,
    name: &str,
) -> Option<&'a str> {
    b.options
        .get(name)
        .or_else(|| defaults.get(&format!("{}.{name}", b.handler)))
        .map(String::as_str)
}

/// Whether this build carries a handler.
pub fn available(h: Handler) -> Result<(), String> {
    match h {
        Handler::File | Handler::Mem => Ok(()),
        #[cfg(feature = "ceph")]
        Handler::Ceph => Ok(()),
        #[cfg(feature = "gluster")]
        Handler::Gluster => Ok(()),
        #[allow(unreachable_patterns)]
        Handler::Gluster | Handler::Ceph => Err(format!(
            "this nbd-runner was built without the {h} handler (cargo feature \"{h}\")"
        )),
    }
}

/// Opens a backstore's storage; `create` makes it if missing (and says
/// whether it did), reporting preallocation through `progress`.
pub fn open(
    b: &SavedBackstore,
    create: bool,
    _defaults: &HandlerDefaults,
    _progress: Progress,
) -> Result<(Arc<dyn Backend>, bool), BackendError> {
    available(b.handler).map_err(BackendError::Config)?;
    match b.handler {
        Handler::Mem => Ok((Arc::new(MemBackend::new(b.size, false)?), create)),
        Handler::File => {
            let path = Path::new(&b.key);
            let existed = path.exists();
            if !existed && !create {
                return Err(BackendError::Config(format!(
                    "{}: the file is gone",
                    path.display()
                )));
            }
            let backend = FileBackend::open_or_create(path, Some(b.size), false)?;
            if existed && create && backend.size() != b.size {
                return Err(BackendError::Config(format!(
                    "{} exists with size {}, not {}; give its size to adopt it",
                    path.display(),
                    backend.size(),
                    b.size
                )));
            }
            if create && !existed && b.prealloc {
                preallocate(path, b.size)?;
            }
            Ok((Arc::new(backend), create && !existed))
        }
        #[cfg(feature = "ceph")]
        Handler::Ceph => {
            let spec = ceph_spec(b, _defaults)?;
            let (backend, created) =
                nbd_engine::backend::ceph::CephBackend::open(&spec, b.size, create, false)?;
            Ok((Arc::new(backend), created))
        }
        #[cfg(feature = "gluster")]
        Handler::Gluster => {
            let server = gluster_server(b, _defaults)?;
            let create = create.then_some((b.size, b.prealloc));
            let (backend, created) =
                GlusterBackend::open(&server, &b.key, create, false, _progress)?;
            Ok((Arc::new(backend), created))
        }
        #[allow(unreachable_patterns)]
        _ => unreachable!("checked by available()"),
    }
}

/// A ceph backstore's key and settings (its own options over `ceph.*` defaults).
#[cfg(feature = "ceph")]
fn ceph_spec(
    b: &SavedBackstore,
    defaults: &HandlerDefaults,
) -> Result<nbd_engine::backend::ceph::CephSpec, BackendError> {
    nbd_engine::backend::ceph::CephSpec::parse(&b.key, |name| {
        setting(b, defaults, name).map(str::to_owned)
    })
}

/// A gluster backstore's volfile server: its own `server` option, else the
/// runner's `--gluster-server`, else localhost:24007.
#[cfg(feature = "gluster")]
fn gluster_server(
    b: &SavedBackstore,
    defaults: &HandlerDefaults,
) -> Result<VolfileServer, BackendError> {
    setting(b, defaults, "server").map_or(Ok(VolfileServer::default()), |s| {
        s.parse().map_err(BackendError::Config)
    })
}

fn preallocate(path: &Path, size: u64) -> Result<(), BackendError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| BackendError::io("open for preallocation", e))?;
    // SAFETY: fallocate on an fd we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as i64) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(BackendError::io("preallocate", e));
    }
    Ok(())
}

/// Removes the storage of a deleted backstore we created; adopted storage stays.
pub fn remove(b: &SavedBackstore, _defaults: &HandlerDefaults) -> Result<(), BackendError> {
    match b.handler {
        #[cfg(feature = "ceph")]
        Handler::Ceph if b.owned => ceph_spec(b, _defaults)?.remove(),
        #[cfg(feature = "gluster")]
        Handler::Gluster if b.owned => {
            GlusterBackend::remove(&gluster_server(b, _defaults)?, &b.key)
        }
        Handler::File if b.owned => match std::fs::remove_file(&b.key) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("remove", e)),
        },
        _ => Ok(()),
    }
}
