//! The single entry point to backstore storage (cloud-hypervisor's
//! `block/src/factory.rs` is the model): every handler's key and option
//! checks, opening, creating and removing, used by the runner's `--export`
//! flags and by the control plane alike. It is also the one place that
//! decides what a control client may name ([`Origin::Control`]): file keys
//! beneath the file roots, no host-file or host-address options unless the
//! operator allows them, mem sizes within `--mem-limit`.

use crate::confine::{FileRoots, IfMissing};
use crate::model::Handler;
use crate::saveconfig::SavedBackstore;
use nbd_engine::backend::file::IoMode;
use nbd_engine::backend::{Backend, BackendError, FileBackend, MemBackend, MemBudget, Progress};
use nbd_engine::config::export_spec;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "gluster")]
use nbd_engine::backend::gluster::{GlusterBackend, VolfileServer};

/// Runner-wide handler settings, keyed `HANDLER.NAME` (e.g. `gluster.server`,
/// `ceph.conf`), from the runner's flags.
pub type HandlerDefaults = BTreeMap<String, String>;

/// Options that name host files or other hosts: a control client could use
/// them to make the root daemon read any file (librados reads `conf` and
/// `keyring`) or connect anywhere.
const HOST_OPTIONS: [&str; 5] = ["conf", "keyring", "id", "server", "passphrase_file"];

/// Runner-wide settings every open follows.
#[derive(Clone)]
pub struct Settings {
    pub defaults: HandlerDefaults,
    /// Where control-route file keys may live.
    pub file_roots: FileRoots,
    /// Control clients may give [`HOST_OPTIONS`].
    pub allow_backstore_options: bool,
    /// Shared by every mem backstore.
    pub mem: Arc<MemBudget>,
}

impl Default for Settings {
    /// No defaults, no roots, no host options, no memory limit (tests).
    fn default() -> Self {
        Settings {
            defaults: HandlerDefaults::new(),
            file_roots: FileRoots::default(),
            allow_backstore_options: false,
            mem: MemBudget::unlimited(),
        }
    }
}

/// Who named a backstore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The operator, on the runner's command line: trusted as typed.
    Operator,
    /// A control client (and what it saved, reopened at restart): confined.
    Control,
}

/// What to open: one backstore's handler, key, size and options, whether
/// it came from `--export` or from the control plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackstoreSpec {
    pub handler: Handler,
    pub key: String,
    /// The size to create at; opening existing storage takes its own.
    pub size: Option<u64>,
    pub read_only: bool,
    pub options: BTreeMap<String, String>,
}

impl BackstoreSpec {
    pub fn of(b: &SavedBackstore) -> Self {
        BackstoreSpec {
            handler: b.handler,
            key: b.key.clone(),
            size: Some(b.size),
            read_only: false,
            options: b.options.clone(),
        }
    }

    /// The option `name`: the backstore's own, else the runner's
    /// `HANDLER.name` default.
    #[cfg(any(feature = "ceph", feature = "gluster"))]
    fn setting<'a>(&'a self, defaults: &'a HandlerDefaults, name: &str) -> Option<&'a str> {
        self.options
            .get(name)
            .or_else(|| defaults.get(&format!("{}.{name}", self.handler)))
            .map(String::as_str)
    }

    /// Key shape, option names, that this build has the handler, and what
    /// `origin` may ask for: one line saying what is wrong.
    pub fn validate(&self, origin: Origin, settings: &Settings) -> Result<(), String> {
        self.handler.check_key(&self.key)?;
        if origin == Origin::Control && !settings.allow_backstore_options {
            if let Some(bad) = self
                .options
                .keys()
                .find(|k| HOST_OPTIONS.contains(&k.as_str()))
            {
                return Err(format!(
                    "option {bad}= is refused: {} let a control client point the runner at \
                     host files or hosts; the operator allows them with \
                     nbd-runner --allow-backstore-options",
                    HOST_OPTIONS.join(", ")
                ));
            }
        }
        available(self.handler)?;
        let known = options(self.handler);
        if let Some(bad) = self.options.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(if known.is_empty() {
                format!("{} backstores take no options (got {bad:?})", self.handler)
            } else {
                format!(
                    "unknown {} option {bad:?} (known: {})",
                    self.handler,
                    known.join(", ")
                )
            });
        }
        if self.size == Some(0) {
            return Err("size must be more than 0".into());
        }
        Ok(())
    }
}

/// The options each handler takes.
pub fn options(h: Handler) -> &'static [&'static str] {
    match h {
        Handler::Gluster => &["server"],
        Handler::Ceph => &[
            "conf",
            "id",
            "keyring",
            "object_size",
            "features",
            "mount_timeout",
            "op_timeout",
            "rbd_cache",
            "encryption",
            "passphrase_file",
        ],
        Handler::File => &["direct"],
        Handler::Mem => &[],
    }
}

/// A file backstore's IO mode: `direct=on` (or bare `direct` in `--export`)
/// opens it with O_DIRECT.
fn file_io_mode(spec: &BackstoreSpec) -> Result<IoMode, BackendError> {
    match spec.options.get("direct").map(String::as_str) {
        None | Some("off" | "false" | "no" | "0") => Ok(IoMode::Buffered),
        Some("on" | "true" | "yes" | "1") => Ok(IoMode::Direct),
        Some(v) => Err(BackendError::Config(format!(
            "direct takes on or off, not {v:?}"
        ))),
    }
}

/// How to open.
pub enum OpenMode<'p> {
    /// The storage must exist (a restart, an `--export` without `size=`).
    Open,
    /// Make it at the spec's size, or adopt existing storage of that size.
    Create {
        prealloc: bool,
        progress: Progress<'p>,
    },
}

/// An opened backstore.
pub struct Opened {
    pub backend: Arc<dyn Backend>,
    /// True when this call made the storage (so `delete` may remove it).
    pub created: bool,
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

/// Opens (or creates) a backstore's storage. The spec is validated first.
pub fn open(
    spec: &BackstoreSpec,
    mode: OpenMode,
    origin: Origin,
    settings: &Settings,
) -> Result<Opened, BackendError> {
    spec.validate(origin, settings)
        .map_err(BackendError::Config)?;
    #[cfg(any(feature = "ceph", feature = "gluster"))]
    let defaults = &settings.defaults;
    let (create, prealloc, _progress): (bool, bool, Progress) = match mode {
        OpenMode::Open => (false, false, &mut |_, _| {}),
        OpenMode::Create { prealloc, progress } => (true, prealloc, progress),
    };
    let size = match (create, spec.size) {
        (true, None) => return Err(BackendError::Config("give a size to create it".into())),
        (_, s) => s,
    };
    let opened = |backend: Arc<dyn Backend>, created| Ok(Opened { backend, created });
    match spec.handler {
        Handler::Mem => {
            let size =
                size.ok_or_else(|| BackendError::Config("mem backstores need a size".into()))?;
            opened(
                Arc::new(MemBackend::new(size, spec.read_only, &settings.mem)?),
                true,
            )
        }
        Handler::File => {
            let (backend, made) = match origin {
                Origin::Control => open_confined_file(spec, create, prealloc, settings)?,
                Origin::Operator => open_operator_file(spec, create, prealloc)?,
            };
            // Adopting needs the file's own size, so a typo cannot take a
            // disk. A confined file lies beneath a root the caller may use,
            // so its size is no secret.
            if let (false, true, Some(want)) = (made, create, size) {
                if backend.size() != want {
                    return Err(BackendError::Config(format!(
                        "{} exists with size {}, not {want}; give its size to adopt it",
                        spec.key,
                        backend.size(),
                    )));
                }
            }
            opened(Arc::new(backend), made)
        }
        #[cfg(feature = "ceph")]
        Handler::Ceph => {
            let ceph = ceph_spec(spec, defaults)?;
            let (backend, created) = nbd_engine::backend::ceph::CephBackend::open(
                &ceph,
                size.unwrap_or(0),
                create,
                spec.read_only,
            )?;
            opened(Arc::new(backend), created)
        }
        #[cfg(feature = "gluster")]
        Handler::Gluster => {
            let server = gluster_server(spec, defaults)?;
            let create = create.then(|| (size.unwrap_or(0), prealloc));
            let (backend, created) =
                GlusterBackend::open(&server, &spec.key, create, spec.read_only, _progress)?;
            opened(Arc::new(backend), created)
        }
        #[allow(unreachable_patterns)]
        _ => unreachable!("checked by validate()"),
    }
}

/// Removes the storage of a deleted backstore we created; adopted storage stays.
#[cfg_attr(
    not(any(feature = "ceph", feature = "gluster")),
    allow(unused_variables)
)]
pub fn remove(b: &SavedBackstore, settings: &Settings) -> Result<(), BackendError> {
    #[cfg(any(feature = "ceph", feature = "gluster"))]
    let defaults = &settings.defaults;
    match b.handler {
        #[cfg(feature = "ceph")]
        Handler::Ceph if b.owned => ceph_spec(&BackstoreSpec::of(b), defaults)?.remove(),
        #[cfg(feature = "gluster")]
        Handler::Gluster if b.owned => {
            GlusterBackend::remove(&gluster_server(&BackstoreSpec::of(b), defaults)?, &b.key)
        }
        // Saved backstores came through the control route: confined.
        Handler::File if b.owned => settings
            .file_roots
            .remove(&b.key)
            .map_err(|e| BackendError::Config(e.to_string())),
        _ => Ok(()),
    }
}

/// A ceph backstore's key and settings (its own options over `ceph.*` defaults).
#[cfg(feature = "ceph")]
fn ceph_spec(
    spec: &BackstoreSpec,
    defaults: &HandlerDefaults,
) -> Result<nbd_engine::backend::ceph::CephSpec, BackendError> {
    nbd_engine::backend::ceph::CephSpec::parse(&spec.key, |name| {
        spec.setting(defaults, name).map(str::to_owned)
    })
}

/// A gluster backstore's volfile server: its own `server` option, else the
/// runner's `--gluster-server`, else localhost:24007.
#[cfg(feature = "gluster")]
fn gluster_server(
    spec: &BackstoreSpec,
    defaults: &HandlerDefaults,
) -> Result<VolfileServer, BackendError> {
    spec.setting(defaults, "server")
        .map_or(Ok(VolfileServer::default()), |s| {
            s.parse().map_err(BackendError::Config)
        })
}

fn preallocate(f: &std::fs::File, size: u64) -> Result<(), BackendError> {
    rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, size)
        .map_err(|e| BackendError::io("preallocate", e.into()))
}

/// A control client's file key, beneath the roots; true if made here.
fn open_confined_file(
    spec: &BackstoreSpec,
    create: bool,
    prealloc: bool,
    settings: &Settings,
) -> Result<(FileBackend, bool), BackendError> {
    let missing = if create {
        IfMissing::Create
    } else {
        IfMissing::Fail
    };
    let confined = settings
        .file_roots
        .open(&spec.key, spec.read_only, missing)
        .map_err(|e| BackendError::Config(e.to_string()))?;
    let made = confined.created;
    let file = confined.file;
    let result = (|| {
        if let (true, Some(size)) = (made, spec.size) {
            file.set_len(size).map_err(|e| {
                BackendError::Config(format!("{}: cannot size to {size}: {e}", spec.key))
            })?;
            if prealloc {
                preallocate(&file, size)?;
            }
        }
        FileBackend::from_file(
            Path::new(&spec.key),
            file,
            spec.read_only,
            file_io_mode(spec)?,
        )
    })();
    if result.is_err() && made {
        let _ = settings.file_roots.remove(&spec.key);
    }
    result.map(|b| (b, made))
}

/// The operator's `--export` path, as typed; true if made here.
fn open_operator_file(
    spec: &BackstoreSpec,
    create: bool,
    prealloc: bool,
) -> Result<(FileBackend, bool), BackendError> {
    let path = Path::new(&spec.key);
    let existed = path.exists();
    if !existed && !create {
        return Err(BackendError::Config(format!(
            "{}: the file is gone",
            path.display()
        )));
    }
    let backend =
        FileBackend::open_or_create(path, spec.size, spec.read_only, file_io_mode(spec)?)?;
    let made = create && !existed;
    if made && prealloc {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| BackendError::io("open for preallocation", e))?;
        if let Err(e) = preallocate(&f, backend.size()) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    Ok((backend, made))
}

/// A parsed `--export HANDLER:KEY[,size=SIZE][,readonly][,OPTION=VALUE]...`.
/// With `size=` the storage is created (or adopted at that size) if it is
/// missing; without, it must exist (mem always needs a size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec(pub BackstoreSpec);

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let bad = |reason: &str| format!("bad export spec {spec:?}: {reason}");
        let raw = export_spec::parse(spec)?;
        let handler: Handler = raw.handler.parse().map_err(|e: String| bad(&e))?;
        if handler == Handler::Mem && raw.size.is_none() {
            return Err(bad("mem exports need size=SIZE"));
        }
        let out = BackstoreSpec {
            handler,
            key: raw.key,
            size: raw.size,
            read_only: raw.read_only,
            options: raw.options,
        };
        out.validate(Origin::Operator, &Settings::default())
            .map_err(|e| bad(&e))?;
        Ok(ExportSpec(out))
    }
}

impl ExportSpec {
    /// Opens what the flag names, creating it when a size was given.
    pub fn open(&self, settings: &Settings) -> Result<Opened, BackendError> {
        let spec = &self.0;
        let mode = match (spec.size, spec.read_only) {
            (Some(_), false) => OpenMode::Create {
                prealloc: false,
                progress: &mut |_, _| {},
            },
            _ => OpenMode::Open,
        };
        open(spec, mode, Origin::Operator, settings)
    }
}

#[cfg(test)]
#[path = "factory_tests.rs"]
mod tests;
