//! `saveconfig.json`: every backstore the runner knows, kept across restarts.
//!
//! One JSON document with a schema version, replaced atomically (temp file,
//! fsync, rename, fsync of the directory) so a crash leaves either the old or
//! the new document, never a torn one. The file is 0600 and the state
//! directory is locked (flock) so two runners cannot share it. A file that
//! cannot be read is reported, naming it, and never overwritten. The
//! directory and its files must be the runner's own and writable by no one
//! else ([`crate::trust`]), and the temp file has an unpredictable name.

use crate::model::{Handler, State};
use crate::trust::{self, Privacy, TrustError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const FILE_NAME: &str = "saveconfig.json";
const LOCK_NAME: &str = "saveconfig.lock";
const TMP_PREFIX: &str = "saveconfig.json.tmp";
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum PersistError {
    // The io error is part of the message, not a `source`: anyhow's `{:#}`
    // would print it twice.
    #[error("{path}: {op}: {error}")]
    Io {
        path: PathBuf,
        op: &'static str,
        error: std::io::Error,
    },
    #[error(
        "{path} is unreadable: {reason}; fix or move it aside (nbd-runner will not overwrite it)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} has schema {found}, this nbd-runner reads schema {SCHEMA_VERSION}; refusing to touch it")]
    Schema { path: PathBuf, found: u32 },
    #[error("state directory {0} is in use by another nbd-runner")]
    Locked(PathBuf),
    #[error("refusing the state directory: {0}")]
    Untrusted(#[from] TrustError),
}

impl PersistError {
    /// The state directory or a file in it is not ours to write.
    pub fn permission_denied(&self) -> bool {
        match self {
            PersistError::Io { error, .. } => error.kind() == std::io::ErrorKind::PermissionDenied,
            PersistError::Untrusted(e) => e.permission_denied(),
            _ => false,
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> PersistError {
    let path = path.to_owned();
    move |error| PersistError::Io { path, op, error }
}

/// One backstore as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBackstore {
    pub key: String,
    pub handler: Handler,
    pub size: u64,
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Random, fixed at create: the kernel's BACKEND_IDENTIFIER cookie.
    pub id: String,
    /// Created by us (so `delete` may remove its storage), not adopted.
    pub owned: bool,
    #[serde(default)]
    pub prealloc: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// IO connections the kernel device was attached with: a reattach
    /// replaces exactly those (0: not mapped, or by an older runner).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub connections: u32,
    /// Times the device was reattached after its connections died, and
    /// when last (seconds since the epoch).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reattaches: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reattached_at: Option<u64>,
    /// The shards the device's connections were placed on (`map ...
    /// shards`), kept so a reattach places them the same way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Option<u32>>,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveConfig {
    pub schema: u32,
    pub backstores: Vec<SavedBackstore>,
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            schema: SCHEMA_VERSION,
            backstores: Vec::new(),
        }
    }
}

impl SaveConfig {
    /// The document in `text` (read from `path`, for messages), checked:
    /// the schema first, so a newer file is named as such, not as corrupt;
    /// then every key, and no key twice.
    pub fn parse(text: &[u8], path: &Path) -> Result<SaveConfig, PersistError> {
        let corrupt = |reason: String| PersistError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        #[derive(Deserialize)]
        struct Schema {
            schema: u32,
        }
        let schema: Schema = serde_json::from_slice(text).map_err(|e| corrupt(e.to_string()))?;
        if schema.schema != SCHEMA_VERSION {
            return Err(PersistError::Schema {
                path: path.to_owned(),
                found: schema.schema,
            });
        }
        let cfg: SaveConfig = serde_json::from_slice(text).map_err(|e| corrupt(e.to_string()))?;
        let mut seen = std::collections::HashSet::new();
        for b in &cfg.backstores {
            b.handler.check_key(&b.key).map_err(corrupt)?;
            if !seen.insert(&b.key) {
                return Err(corrupt(format!("backstore {:?} appears twice", b.key)));
            }
        }
        Ok(cfg)
    }

    /// What a restart means: a device the kernel may still hold has lost its
    /// server, so it is dead until reattached; an unfinished map never happened.
    pub fn after_restart(mut self) -> Self {
        for b in &mut self.backstores {
            b.state = crate::model::next(b.state, b.device.is_some(), crate::model::Event::Restart)
                .unwrap_or(State::Created);
        }
        self
    }
}

/// The locked state directory.
pub struct StateStore {
    dir: PathBuf,
    path: PathBuf,
    _lock: File,
}

impl StateStore {
    /// Locks `dir` (creating it 0700 if missing) and loads its document.
    pub fn open(dir: &Path) -> Result<(StateStore, SaveConfig), PersistError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir, "create state directory"))?;
        }
        trust::check_dir(dir)?;
        let lock_path = dir.join(LOCK_NAME);
        let lock = trust::open(
            &lock_path,
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600),
            &[trust::euid()],
            Privacy::NoOtherWriters,
        )?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(PersistError::Locked(dir.to_owned()));
        }
        let store = StateStore {
            dir: dir.to_owned(),
            path: dir.join(FILE_NAME),
            _lock: lock,
        };
        store.remove_stale_temps();
        let cfg = store.load()?;
        Ok((store, cfg))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn load(&self) -> Result<SaveConfig, PersistError> {
        let opened = trust::open(
            &self.path,
            OpenOptions::new().read(true),
            &[trust::euid()],
            Privacy::NoOtherWriters,
        );
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.not_found() => return Ok(SaveConfig::default()),
            Err(e) => return Err(e.into()),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text)
            .map_err(io_err(&self.path, "read"))?;
        SaveConfig::parse(&text, &self.path)
    }

    /// Replaces the document atomically.
    pub fn save(&self, cfg: &SaveConfig) -> Result<(), PersistError> {
        let mut body = serde_json::to_vec_pretty(cfg).expect("state serialises");
        body.push(b'\n');
        // A fresh, unpredictable name opened O_EXCL|O_NOFOLLOW: nothing
        // planted in the directory can stand in for it.
        let (tmp, mut f) = trust::create_unique(&self.dir, TMP_PREFIX)?;
        let result = (|| {
            f.write_all(&body).map_err(io_err(&tmp, "write"))?;
            f.sync_all().map_err(io_err(&tmp, "fsync"))?;
            fs::rename(&tmp, &self.path).map_err(io_err(&self.path, "rename"))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir, "fsync directory"))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Temp files left by a crash mid-save; the lock says they are ours.
    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample(key: &str, state: State, device: Option<&str>) -> SavedBackstore {
        SavedBackstore {
            key: key.into(),
            handler: Handler::Mem,
            size: 1 << 20,
            state,
            device: device.map(Into::into),
            id: "0123abcd".into(),
            owned: true,
            prealloc: false,
            options: BTreeMap::new(),
            connections: 0,
            reattaches: 0,
            reattached_at: None,
            placement: Vec::new(),
        }
    }

    #[test]
    fn save_then_load_round_trips_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SaveConfig {
            schema: SCHEMA_VERSION,
            backstores: vec![sample("a", State::Created, None)],
        };
        {
            let (store, loaded) = StateStore::open(dir.path()).unwrap();
            assert_eq!(loaded, SaveConfig::default());
            store.save(&cfg).unwrap();
            let mode = fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (_, loaded) = StateStore::open(dir.path()).unwrap();
        assert_eq!(loaded, cfg);
    }

    #[test]
    fn a_second_runner_cannot_take_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = StateStore::open(dir.path()).unwrap();
        assert!(matches!(
            StateStore::open(dir.path()),
            Err(PersistError::Locked(_))
        ));
    }

    #[test]
    fn corrupt_truncated_and_future_files_are_named_and_kept() {
        let cases: [(&str, &str); 4] = [
            ("{\"schema\":1,\"backstores\":[{\"key\":", "unreadable"),
            ("not json at all", "unreadable"),
            ("{\"schema\":9,\"backstores\":[]}", "schema 9"),
            (
                "{\"schema\":1,\"backstores\":[{\"key\":\"rel\",\"handler\":\"file\",\"size\":1,\"state\":\"created\",\"id\":\"x\",\"owned\":true}]}",
                "absolute path",
            ),
        ];
        for (text, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(FILE_NAME);
            fs::write(&path, text).unwrap();
            let err = StateStore::open(dir.path()).err().expect(text).to_string();
            assert!(err.contains(path.to_str().unwrap()), "{err}");
            assert!(err.contains(want), "{err}");
            assert_eq!(fs::read_to_string(&path).unwrap(), text, "file was touched");
        }
    }

    #[test]
    fn stale_temp_files_from_a_crash_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!("{TMP_PREFIX}.12345"));
        fs::write(&stale, "{half").unwrap();
        let _store = StateStore::open(dir.path()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn a_directory_others_can_write_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        // Planted links at every name the runner writes, as another user would.
        for name in [FILE_NAME, LOCK_NAME, &format!("{TMP_PREFIX}.1")] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        let err = StateStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        // Even in a private directory a linked state or lock file is refused.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let err = StateStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        fs::remove_file(dir.path().join(LOCK_NAME)).unwrap();
        let err = StateStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[test]
    fn files_of_another_user_are_refused() {
        if trust::euid() != 0 {
            return; // needs chown; the suite runs as root in CI
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        fs::write(&path, "{\"schema\":1,\"backstores\":[]}").unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let err = StateStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
    }

    #[test]
    fn saves_use_a_fresh_temp_name_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cfg) = StateStore::open(dir.path()).unwrap();
        store.save(&cfg).unwrap();
        store.save(&cfg).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with(TMP_PREFIX)),
            "{names:?}"
        );
    }

    #[test]
    fn restart_marks_mapped_devices_dead() {
        let cfg = SaveConfig {
            schema: SCHEMA_VERSION,
            backstores: vec![
                sample("a", State::Created, None),
                sample("b", State::Mapped, Some("/dev/nbd0")),
                sample("c", State::Mapping, None),
                sample("d", State::Unmapping, Some("/dev/nbd1")),
            ],
        }
        .after_restart();
        let states: Vec<State> = cfg.backstores.iter().map(|b| b.state).collect();
        assert_eq!(
            states,
            [State::Created, State::Dead, State::Created, State::Dead]
        );
    }
}
