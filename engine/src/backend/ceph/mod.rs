//! Ceph RBD backstores through librbd (cargo feature `ceph`).
//!
//! Keys are `POOL/IMAGE` or `POOL/NAMESPACE/IMAGE`, and `...@SNAP` for a
//! snapshot, which is always served read-only and never created or
//! removed. `encryption=luks1|luks2` with `passphrase_file=PATH` serves an
//! image through librbd's own LUKS (formatted when the runner creates the
//! image, loaded otherwise), as `rbd-nbd --encryption-format` does.
//! Backstores with the same cluster settings share one rados connection
//! ([`rados::Cluster`]).
//!
//! Multi-conn and the exclusive lock: every shard and connection uses one
//! shared image handle. librbd handles are thread-safe, so this costs
//! nothing, and it is what makes CAN_MULTI_CONN honest and fast: one handle
//! owns the exclusive lock once (separate handles would bounce it between
//! themselves on every write), and one rbd_aio_flush on it covers the
//! writes acknowledged on every connection.
//!
//! IO is rbd_aio_* completed back onto the issuing shard ([`aio`]); the
//! blocking calls (connect, open, create, remove, resize, diff_iterate2)
//! run on control threads or glommio's blocking pool.

mod aio;
pub mod rados;

use super::*;
use crate::config::ceph_key::CephKey;
use rados::{Cluster, ClusterConfig, Image, ImageOptions, Luks};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Connect timeout unless `mount_timeout` says otherwise: a dead cluster
/// must fail a create or map quickly, not after librados' 300 s.
const DEFAULT_MOUNT_TIMEOUT: u32 = 10;
/// OSD/monitor op timeout unless `op_timeout` says otherwise: a stuck
/// cluster turns into EIO for the client instead of a hang.
const DEFAULT_OP_TIMEOUT: u32 = 60;

/// Where a backstore lives and how to create it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CephSpec {
    /// Pool, namespace, image, and a snapshot (served read-only).
    pub key: CephKey,
    pub cluster: ClusterConfig,
    pub create: ImageOptions,
    pub encryption: Option<Encryption>,
}

/// librbd LUKS: the format, and the file holding the passphrase (read at
/// open, byte for byte as `rbd encryption format` reads it; never logged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    pub luks: Luks,
    pub passphrase_file: PathBuf,
}

/// The longest passphrase file read.
const MAX_PASSPHRASE: u64 = 4096;

impl Encryption {
    /// The passphrase; the file must be the owner's alone (0600 or less).
    fn passphrase(&self) -> Result<Vec<u8>, String> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let path = &self.passphrase_file;
        let f = std::fs::File::open(path)
            .map_err(|e| format!("passphrase_file {}: {e}", path.display()))?;
        let meta = f.metadata().map_err(|e| e.to_string())?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "passphrase_file {} is readable by others (mode {:o}); chmod 600 it",
                path.display(),
                meta.mode() & 0o777
            ));
        }
        let mut pass = Vec::new();
        f.take(MAX_PASSPHRASE + 1)
            .read_to_end(&mut pass)
            .map_err(|e| format!("passphrase_file {}: {e}", path.display()))?;
        if pass.is_empty() || pass.len() as u64 > MAX_PASSPHRASE {
            return Err(format!(
                "passphrase_file {} must hold 1 to {MAX_PASSPHRASE} bytes",
                path.display()
            ));
        }
        Ok(pass)
    }
}

fn config_error(key: &str, msg: impl std::fmt::Display) -> BackendError {
    BackendError::Config(format!("ceph {key}: {msg}"))
}

impl CephSpec {
    /// Parses a key and the backstore's settings: `conf`, `id`, `keyring`,
    /// `mount_timeout`, `op_timeout` (seconds), `object_size`, `features`.
    pub fn parse(
        key: &str,
        setting: impl Fn(&str) -> Option<String>,
    ) -> Result<CephSpec, BackendError> {
        let bad = |m: String| config_error(key, m);
        let parsed = CephKey::parse(key).map_err(bad)?;
        let luks = match setting("encryption").as_deref() {
            None => None,
            Some("luks1") => Some(Luks::V1),
            Some("luks2") => Some(Luks::V2),
            Some(v) => return Err(bad(format!("encryption is luks1 or luks2, not {v:?}"))),
        };
        let encryption = match (luks, setting("passphrase_file")) {
            (Some(luks), Some(f)) => Some(Encryption {
                luks,
                passphrase_file: PathBuf::from(f),
            }),
            (None, None) => None,
            (Some(_), None) => return Err(bad("encryption needs passphrase_file=PATH".into())),
            (None, Some(_)) => {
                return Err(bad("passphrase_file needs encryption=luks1|luks2".into()))
            }
        };
        let secs = |name: &str, default: u32| -> Result<u32, BackendError> {
            setting(name).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| bad(format!("{name} must be whole seconds, not {v:?}")))
            })
        };
        let order = setting("object_size")
            .map(|v| object_order(&v).map_err(bad))
            .transpose()?;
        let features = setting("features")
            .map(|v| parse_features(&v).map_err(bad))
            .transpose()?;
        Ok(CephSpec {
            key: parsed,
            encryption,
            cluster: ClusterConfig {
                conf: setting("conf").map(PathBuf::from),
                id: setting("id").map(|s| s.trim_start_matches("client.").to_owned()),
                keyring: setting("keyring").map(PathBuf::from),
                mount_timeout: secs("mount_timeout", DEFAULT_MOUNT_TIMEOUT)?,
                op_timeout: secs("op_timeout", DEFAULT_OP_TIMEOUT)?,
                rbd_cache: match setting("rbd_cache").as_deref() {
                    None => None,
                    Some("false") => Some(false),
                    Some("true") => Some(true),
                    Some(v) => return Err(bad(format!("rbd_cache is true or false, not {v:?}"))),
                },
            },
            create: ImageOptions { order, features },
        })
    }

    pub fn key(&self) -> String {
        self.key.to_string()
    }

    fn pool(&self) -> Result<rados::Pool, BackendError> {
        let key = self.key();
        let cluster = Cluster::get(&self.cluster).map_err(|e| config_error(&key, e))?;
        cluster
            .pool(&self.key.pool, self.key.namespace.as_deref())
            .map_err(|e| config_error(&key, e))
    }

    /// Removes the image (blocking). A missing image is not an error; a
    /// snapshot backstore never removes anything (it is a view).
    pub fn remove(&self) -> Result<(), BackendError> {
        if self.key.snapshot.is_some() {
            return Ok(());
        }
        match self.pool()?.remove(&self.key.image) {
            Err(e) if e.errno == libc::ENOENT => Ok(()),
            r => r.map_err(|e| config_error(&self.key(), e)),
        }
    }
}

/// `object_size` (a power of two from 4 KiB to 32 MiB) as librbd's order.
fn object_order(v: &str) -> Result<u8, String> {
    let bytes = crate::config::size::parse_size(v).map_err(|e| e.to_string())?;
    if !bytes.is_power_of_two() || !(4096..=32 << 20).contains(&bytes) {
        return Err(format!(
            "object_size must be a power of two from 4K to 32M, not {v}"
        ));
    }
    Ok(bytes.trailing_zeros() as u8)
}

/// `features`: a number or `rbd`'s names joined by commas.
fn parse_features(v: &str) -> Result<u64, String> {
    if let Ok(n) = v.parse() {
        return Ok(n);
    }
    v.split(',').map(str::trim).try_fold(0u64, |acc, name| {
        rbd_sys::RBD_FEATURES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, bit)| acc | bit)
            .ok_or_else(|| format!("unknown rbd feature {name:?}"))
    })
}

struct Shared {
    image: Image,
    /// What requests are checked against; updated by resize before clients
    /// may address a grown range and before a shrink reaches librbd.
    size: AtomicU64,
}

pub struct CephBackend {
    shared: Arc<Shared>,
    read_only: bool,
    mode: String,
}

impl CephBackend {
    /// Opens the image (blocking), creating it with `size` bytes when asked
    /// and missing. Returns whether this call created it; an existing image
    /// is adopted only if it already has `size` bytes.
    pub fn open(
        spec: &CephSpec,
        size: u64,
        create: bool,
        read_only: bool,
    ) -> Result<(CephBackend, bool), BackendError> {
        let key = spec.key();
        let err = |e: rados::CephError| config_error(&key, e);
        let pool = spec.pool()?;
        // A snapshot is opened as it is: never created, never written.
        let read_only = read_only || spec.key.snapshot.is_some();
        let created = create
            && spec.key.snapshot.is_none()
            && match pool.create(&spec.key.image, size, spec.create) {
                Ok(()) => true,
                Err(e) if e.errno == libc::EEXIST => false,
                Err(e) => return Err(err(e)),
            };
        let opened = match &spec.key.snapshot {
            Some(snap) => pool.open_snapshot(&spec.key.image, snap),
            None => pool.open(&spec.key.image),
        };
        let image = match opened {
            Ok(i) => i,
            Err(e) => {
                if created {
                    let _ = spec.remove();
                }
                return Err(err(e));
            }
        };
        // Adopting checks the raw size, the one the image was created with.
        let raw = image.stat().map_err(err)?;
        if create && !created && raw.size != size {
            return Err(config_error(
                &key,
                format!(
                    "the image exists with size {}, not {size}; give its size to adopt it",
                    raw.size
                ),
            ));
        }
        if let Some(enc) = &spec.encryption {
            let pass = enc.passphrase().map_err(|m| config_error(&key, m))?;
            // Formatting loads the encryption on this handle too.
            let done = if created {
                image.encryption_format(enc.luks, &pass)
            } else {
                image.encryption_load(enc.luks, &pass)
            };
            if let Err(e) = done {
                drop(image);
                if created {
                    let _ = spec.remove();
                }
                return Err(err(e));
            }
        }
        let stat = image.stat().map_err(err)?;
        let mut mode = format!(
            "librbd aio, one image handle shared by all shards; FLUSH/FUA = rbd_aio_flush; \
             librbd cache {}; {}; object size {} KiB; block status from {}",
            match spec.cluster.rbd_cache {
                None => "per ceph.conf, writeback before the first FLUSH",
                Some(true) => "on",
                Some(false) => "off",
            },
            spec.cluster.describe(),
            stat.obj_size >> 10,
            if image.fast_diff_valid() {
                "the fast-diff object map"
            } else {
                "object listing (no fast-diff)"
            }
        );
        if let Some(snap) = &spec.key.snapshot {
            mode.push_str(&format!("; snapshot {snap}, read-only"));
        }
        if let Some(enc) = &spec.encryption {
            mode.push_str(&format!("; {} encryption by librbd", enc.luks));
        }
        let shared = Arc::new(Shared {
            size: AtomicU64::new(stat.size),
            image,
        });
        Ok((
            CephBackend {
                shared,
                read_only,
                mode,
            },
            created,
        ))
    }
}

impl Backend for CephBackend {
    fn handler(&self) -> &'static str {
        "ceph"
    }

    fn size(&self) -> u64 {
        self.shared.size.load(Ordering::Relaxed)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            cache: false,
            ..Capabilities::all(self.read_only)
        }
    }

    fn mode(&self) -> String {
        self.mode.clone()
    }

    fn attach(&self) -> IoFuture<'static, Rc<dyn BackendIo>> {
        let io: Rc<dyn BackendIo> = Rc::new(CephIo {
            shared: self.shared.clone(),
        });
        Box::pin(async move { Ok(io) })
    }

    fn resize(&self, size: u64) -> Result<(), BackendError> {
        let old = self.size();
        if size < old {
            // Refuse the vanishing range before librbd drops it.
            self.shared.size.store(size, Ordering::Relaxed);
        }
        if let Err(e) = self.shared.image.resize(size) {
            self.shared.size.store(old, Ordering::Relaxed);
            return Err(BackendError::Config(format!("ceph resize: {e}")));
        }
        // librbd rounds nothing, but read back what it really has.
        let now = self.shared.image.size().unwrap_or(size);
        self.shared.size.store(now, Ordering::Relaxed);
        Ok(())
    }
}

struct CephIo {
    shared: Arc<Shared>,
}

impl CephIo {
    fn image(&self) -> &Image {
        &self.shared.image
    }

    /// librbd must never see a range past the end (a shrink may have raced
    /// the protocol layer's check): EINVAL for reads, ENOSPC for writes.
    fn in_range(&self, offset: u64, len: u64, write: bool) -> Result<(), BackendError> {
        let size = self.shared.size.load(Ordering::Relaxed);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::io(
                "beyond the end of the image",
                std::io::Error::from_raw_os_error(if write { libc::ENOSPC } else { libc::EINVAL }),
            )),
        }
    }

    async fn flush_if(&self, fua: bool) -> Result<(), BackendError> {
        if fua {
            aio::flush(self.image()).await?;
        }
        Ok(())
    }
}

impl BackendIo for CephIo {
    fn read(&self, offset: u64, len: usize, buf: Vec<u8>) -> IoFuture<'_, ReadBuf> {
        Box::pin(async move {
            self.in_range(offset, len as u64, false)?;
            Ok(ReadBuf::Vec(
                aio::read(self.image(), offset, len, buf).await?,
            ))
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> IoFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            self.in_range(offset, data.len() as u64, true)?;
            let buf = aio::write(self.image(), offset, data).await?;
            self.flush_if(fua).await?;
            Ok(Some(buf))
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(aio::flush(self.image()))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.in_range(offset, len, true)?;
            // Advisory: librbd skips partial objects it cannot free.
            aio::discard(self.image(), offset, len).await?;
            self.flush_if(fua).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.in_range(offset, len, true)?;
            if flags.fast && flags.no_hole {
                // Thick zeroing writes every byte: not faster than a write.
                return Err(BackendError::Unsupported);
            }
            // Not rbd discard: it skips unaligned ranges, which would leave old data.
            aio::write_zeroes(self.image(), offset, len, flags.no_hole).await?;
            self.flush_if(flags.fua).await
        })
    }

    fn cache(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn extents(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            self.in_range(offset, len, false)?;
            // diff_iterate2 is synchronous and talks to the cluster.
            let found = glommio::executor()
                .spawn_blocking(move || shared.image.allocated(offset, len))
                .await
                .map_err(|e| BackendError::Config(format!("block status: {e}")))?;
            Ok(extents_of(offset, len, found))
        })
    }
}

/// Turns librbd's allocated ranges into extents covering `[offset, offset+len)`:
/// gaps and ranges that do not exist are holes, the rest data.
fn extents_of(offset: u64, len: u64, mut found: Vec<(u64, u64, bool)>) -> Vec<Extent> {
    found.sort_unstable_by_key(|r| r.0);
    let end = offset + len;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |len: u64, flags: u32| match out.last_mut() {
        Some(last) if last.flags == flags => last.len += len,
        _ if len > 0 => out.push(Extent { len, flags }),
        _ => {}
    };
    let mut pos = offset;
    for (start, n, exists) in found {
        let (start, stop) = (start.max(pos), (start + n).min(end));
        if stop <= start {
            continue;
        }
        push(start - pos, HOLE);
        push(stop - start, if exists { DATA } else { HOLE });
        pos = stop;
    }
    push(end - pos, HOLE);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str, opts: &[(&str, &str)]) -> Result<CephSpec, BackendError> {
        let opts: std::collections::BTreeMap<String, String> = opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CephSpec::parse(key, |n| opts.get(n).cloned())
    }

    #[test]
    fn keys_and_settings() {
        let s = spec("rbd/disk0", &[]).unwrap();
        assert_eq!(
            (s.key.pool.as_str(), s.key.image.as_str()),
            ("rbd", "disk0")
        );
        assert_eq!(s.key.namespace, None);
        assert_eq!(s.cluster.mount_timeout, DEFAULT_MOUNT_TIMEOUT);
        let s = spec(
            "rbd/ns1/disk0",
            &[
                ("conf", "/etc/ceph/x.conf"),
                ("id", "client.nbd"),
                ("object_size", "1M"),
                ("features", "layering,exclusive-lock"),
                ("op_timeout", "5"),
            ],
        )
        .unwrap();
        assert_eq!(s.key.namespace.as_deref(), Some("ns1"));
        assert_eq!(s.key(), "rbd/ns1/disk0");
        assert_eq!(s.cluster.id.as_deref(), Some("nbd"));
        assert_eq!(s.create.order, Some(20));
        assert_eq!(s.create.features, Some(1 | 4));
        assert_eq!(s.cluster.op_timeout, 5);
        for bad in ["rbd", "rbd/", "/x", "a/b/c/d", "a//b"] {
            assert!(spec(bad, &[]).is_err(), "{bad}");
        }
        assert!(spec("rbd/x", &[("object_size", "3M")]).is_err());
        assert!(spec("rbd/x", &[("features", "turbo")]).is_err());
        assert!(spec("rbd/x", &[("mount_timeout", "soon")]).is_err());
    }

    #[test]
    fn snapshots_and_encryption_settings() {
        let s = spec("rbd/ns/img@s1", &[]).unwrap();
        assert_eq!(
            (s.key.image.as_str(), s.key.snapshot.as_deref()),
            ("img", Some("s1"))
        );
        assert_eq!(s.key(), "rbd/ns/img@s1");
        let s = spec(
            "rbd/img",
            &[("encryption", "luks1"), ("passphrase_file", "/etc/p")],
        )
        .unwrap();
        let enc = s.encryption.unwrap();
        assert_eq!(
            (enc.luks, enc.passphrase_file),
            (Luks::V1, PathBuf::from("/etc/p"))
        );
        let msg = |o: &[(&str, &str)]| spec("rbd/img", o).unwrap_err().to_string();
        assert!(msg(&[("encryption", "luks2")]).contains("needs passphrase_file"));
        assert!(msg(&[("passphrase_file", "/p")]).contains("needs encryption"));
        assert!(msg(&[("encryption", "aes"), ("passphrase_file", "/p")]).contains("luks1 or luks2"));
        assert!(spec("rbd/img@", &[]).is_err());
    }

    #[test]
    fn passphrase_files_must_be_private_and_small() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let enc = Encryption {
            luks: Luks::V2,
            passphrase_file: path.clone(),
        };
        std::fs::write(&path, b"secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(enc.passphrase().unwrap_err().contains("readable by others"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Byte for byte, newline included, as `rbd encryption format` reads it.
        assert_eq!(enc.passphrase().unwrap(), b"secret\n");
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        assert!(enc.passphrase().unwrap_err().contains("1 to 4096 bytes"));
        std::fs::write(&path, b"").unwrap();
        assert!(enc.passphrase().is_err());
    }

    #[test]
    fn extents_fill_gaps_and_clip() {
        let e = |v: &[(u64, u32)]| {
            v.iter()
                .map(|&(len, flags)| Extent { len, flags })
                .collect::<Vec<_>>()
        };
        // Nothing allocated: one hole.
        assert_eq!(extents_of(100, 50, vec![]), e(&[(50, HOLE)]));
        // Whole objects reported beyond the asked range are clipped, gaps and
        // non-existing ranges merge into holes, order does not matter.
        let found = vec![(4096, 4096, true), (0, 1024, true), (2048, 1024, false)];
        assert_eq!(
            extents_of(512, 6000, found),
            e(&[(512, DATA), (3072, HOLE), (2416, DATA)])
        );
    }
}
