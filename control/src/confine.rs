//! Where a control client may point a `file` backstore: beneath one of the
//! runner's `--file-root` directories, resolved by the kernel with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! so `..`, symlinks and absolute escapes are refused whatever a path's
//! components are swapped for meanwhile. Block devices need
//! `--allow-block-devices`. A refusal never says anything about a file the
//! caller could not have read (no size, and for paths outside the roots not
//! even whether it exists).

use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfineError {
    #[error("{key}: file keys may not contain '.' or '..' components")]
    DotComponent { key: String },
    #[error("{key} is not beneath a file root of this runner ({roots}); the operator adds roots with nbd-runner --file-root DIR")]
    Outside { key: String, roots: String },
    #[error("{key}: a component is a symbolic link, or leads out of its file root; file keys must name the real path")]
    Escape { key: String },
    #[error(
        "{key} is a block device; adopting block devices needs nbd-runner --allow-block-devices"
    )]
    BlockDevice { key: String },
    #[error("{key} is neither a regular file nor a block device")]
    NotAFile { key: String },
    #[error("{key}: the file does not exist")]
    Missing { key: String },
    #[error("{key}: {op}: {message}")]
    Io {
        key: String,
        op: &'static str,
        message: String,
    },
}

/// The directories control-route file keys must live beneath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRoots {
    pub roots: Vec<PathBuf>,
    pub allow_block_devices: bool,
}

/// What to do when the key names nothing yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfMissing {
    Fail,
    /// Create it, 0600, empty (the caller sizes it).
    Create,
}

/// An opened, confined file key.
#[derive(Debug)]
pub struct Confined {
    pub file: File,
    pub created: bool,
}

impl FileRoots {
    /// Opens `key` read-write (or read-only) beneath a root.
    pub fn open(
        &self,
        key: &str,
        read_only: bool,
        missing: IfMissing,
    ) -> Result<Confined, ConfineError> {
        let (root, rel) = match self.split(key) {
            Ok(v) => v,
            Err(e @ ConfineError::Outside { .. }) => {
                if self.allow_block_devices {
                    if let Some(c) = self.open_block_device(key, read_only)? {
                        return Ok(c);
                    }
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
        let errno = |op| errno(key, op);
        let dir = open_root(root, key)?;
        let resolve = Self::RESOLVE;
        let escape = errno("open");
        // Look before opening: opening a FIFO or a device has side effects.
        let probe = rustix::fs::openat2(
            &dir,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        );
        let probe = match probe {
            Ok(fd) => Some(fd),
            Err(rustix::io::Errno::NOENT) if missing == IfMissing::Create => None,
            Err(rustix::io::Errno::NOENT) => return Err(ConfineError::Missing { key: key.into() }),
            Err(e) => return Err(escape(e)),
        };
        let access = if read_only {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        let base = access | OFlags::CLOEXEC | OFlags::NOCTTY;
        let Some(probe) = probe else {
            let fd = rustix::fs::openat2(
                &dir,
                rel,
                base | OFlags::CREATE | OFlags::EXCL,
                Mode::from_raw_mode(0o600),
                resolve,
            )
            .map_err(escape)?;
            return Ok(Confined {
                file: File::from(fd),
                created: true,
            });
        };
        let seen = rustix::fs::fstat(&probe).map_err(errno("stat"))?;
        self.check_type(key, rustix::fs::FileType::from_raw_mode(seen.st_mode))?;
        let fd = rustix::fs::openat2(&dir, rel, base, Mode::empty(), resolve).map_err(escape)?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| ConfineError::Io {
            key: key.into(),
            op: "stat",
            message: e.to_string(),
        })?;
        // The name may have been swapped between the look and the open.
        if (meta.dev(), meta.ino()) != (seen.st_dev, seen.st_ino) {
            return Err(ConfineError::Escape { key: key.into() });
        }
        Ok(Confined {
            file,
            created: false,
        })
    }

    /// Removes a file key the runner created, resolving its directory the
    /// same confined way, so a swapped component cannot aim the unlink
    /// elsewhere. A missing file is already gone.
    pub fn remove(&self, key: &str) -> Result<(), ConfineError> {
        let (root, rel) = self.split(key)?;
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(ConfineError::Escape { key: key.into() });
        };
        let root = open_root(root, key)?;
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = rustix::fs::openat2(
            &root,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            Self::RESOLVE,
        )
        .map_err(errno(key, "open its directory"))?;
        match rustix::fs::unlinkat(&dir, name, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(errno(key, "remove")(e)),
        }
    }

    const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
        .union(ResolveFlags::NO_SYMLINKS)
        .union(ResolveFlags::NO_MAGICLINKS);

    /// The root `key` lies beneath and the path below it.
    fn split<'k>(&self, key: &'k str) -> Result<(&Path, &'k Path), ConfineError> {
        if key.split('/').any(|c| c == "." || c == "..") {
            return Err(ConfineError::DotComponent { key: key.into() });
        }
        self.roots
            .iter()
            .find_map(|root| Some((root.as_path(), Path::new(key).strip_prefix(root).ok()?)))
            .filter(|(_, rel)| rel.components().next().is_some())
            .ok_or_else(|| ConfineError::Outside {
                key: key.into(),
                roots: self.describe(),
            })
    }

    /// With `--allow-block-devices`, a block device anywhere (its usual
    /// names, /dev/disk/by-id/..., are symlinks). None: not a block device.
    fn open_block_device(
        &self,
        key: &str,
        read_only: bool,
    ) -> Result<Option<Confined>, ConfineError> {
        let Ok(meta) = std::fs::metadata(key) else {
            return Ok(None);
        };
        if !meta.file_type().is_block_device() {
            return Ok(None);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(key)
            .map_err(|e| ConfineError::Io {
                key: key.into(),
                op: "open",
                message: e.to_string(),
            })?;
        let same = file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == meta.rdev());
        if !same {
            return Err(ConfineError::Escape { key: key.into() });
        }
        Ok(Some(Confined {
            file,
            created: false,
        }))
    }

    fn check_type(&self, key: &str, t: rustix::fs::FileType) -> Result<(), ConfineError> {
        match t {
            rustix::fs::FileType::RegularFile => Ok(()),
            rustix::fs::FileType::BlockDevice if self.allow_block_devices => Ok(()),
            rustix::fs::FileType::BlockDevice => Err(ConfineError::BlockDevice { key: key.into() }),
            _ => Err(ConfineError::NotAFile { key: key.into() }),
        }
    }

    fn describe(&self) -> String {
        if self.roots.is_empty() {
            return "none configured".into();
        }
        let names: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        names.join(", ")
    }
}

/// What an errno from resolving `key` means: a symlink or a way out of
/// the root is an escape; anything else is reported as it is.
fn errno<'k>(key: &'k str, op: &'static str) -> impl Fn(rustix::io::Errno) -> ConfineError + 'k {
    move |e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            ConfineError::Escape { key: key.into() }
        }
        rustix::io::Errno::NOSYS => ConfineError::Io {
            key: key.into(),
            op: "openat2",
            message: "this kernel has no openat2 (Linux 5.6+), so file keys cannot be confined"
                .into(),
        },
        e => ConfineError::Io {
            key: key.into(),
            op,
            message: std::io::Error::from(e).to_string(),
        },
    }
}

fn open_root(root: &Path, key: &str) -> Result<rustix::fd::OwnedFd, ConfineError> {
    rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno(key, "open its file root"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(dir: &Path) -> FileRoots {
        FileRoots {
            roots: vec![dir.to_owned()],
            allow_block_devices: false,
        }
    }

    fn key(p: &Path) -> String {
        p.to_str().unwrap().to_owned()
    }

    #[test]
    fn files_beneath_a_root_open_and_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let r = roots(dir.path());
        let k = key(&dir.path().join("a.raw"));
        assert_eq!(
            r.open(&k, false, IfMissing::Fail).unwrap_err(),
            ConfineError::Missing { key: k.clone() }
        );
        let c = r.open(&k, false, IfMissing::Create).unwrap();
        assert!(c.created);
        let c = r.open(&k, false, IfMissing::Create).unwrap();
        assert!(!c.created);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(
            r.open(
                &key(&dir.path().join("sub/b.raw")),
                false,
                IfMissing::Create
            )
            .unwrap()
            .created
        );
    }

    #[test]
    fn escapes_are_refused_without_touching_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "shadow").unwrap();
        let r = roots(dir.path());
        let root = key(dir.path());
        std::os::unix::fs::symlink(&secret, dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("dirlink")).unwrap();
        let cases = [
            (format!("{root}/../x"), "'.' or '..'"),
            (format!("{root}/./x"), "'.' or '..'"),
            (format!("{root}/link"), "symbolic link"),
            (format!("{root}/dirlink/secret"), "symbolic link"),
            (format!("{root}/dirlink/new"), "symbolic link"),
            (key(&secret), "not beneath a file root"),
            ("/etc/shadow".into(), "not beneath a file root"),
            (root.clone(), "not beneath a file root"),
            (format!("{root}x/y"), "not beneath a file root"),
        ];
        for (k, want) in cases {
            let e = r
                .open(&k, false, IfMissing::Create)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{k}: {e}");
            assert!(!e.contains("size"), "{k}: a size leaked: {e}");
        }
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "shadow");
        assert!(!outside.path().join("new").exists());
    }

    #[test]
    fn fifos_and_directories_are_refused_without_opening_them() {
        let dir = tempfile::tempdir().unwrap();
        let r = roots(dir.path());
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        for k in [key(&fifo), key(&dir.path().join("d"))] {
            let e = r.open(&k, false, IfMissing::Fail).unwrap_err();
            assert_eq!(e, ConfineError::NotAFile { key: k.clone() });
        }
    }

    #[test]
    fn remove_stays_beneath_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("a.raw");
        std::fs::write(&victim, "keep").unwrap();
        let r = roots(dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let k = key(&dir.path().join("sub/a.raw"));
        r.open(&k, false, IfMissing::Create).unwrap();
        r.remove(&k).unwrap();
        assert!(!dir.path().join("sub/a.raw").exists());
        r.remove(&k).unwrap(); // already gone
                               // The directory swapped for a link to elsewhere: nothing is removed there.
        std::fs::remove_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).unwrap();
        assert_eq!(
            r.remove(&k).unwrap_err(),
            ConfineError::Escape { key: k.clone() }
        );
        assert!(victim.exists());
    }

    #[test]
    fn no_roots_means_no_file_keys() {
        let r = FileRoots::default();
        let e = r
            .open("/var/lib/nbd-runner/a", false, IfMissing::Create)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none configured"), "{e}");
    }
}
