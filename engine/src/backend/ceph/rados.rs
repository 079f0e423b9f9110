//! Safe, blocking wrappers over librados and librbd: one cluster
//! connection per (conf, id, keyring), pool contexts, and image handles.
//! Every call here blocks on the network: run it on a control thread or on
//! glommio's blocking pool, never on a shard's executor thread.

use rbd_sys::*;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::raw::{c_int, c_void};
use std::path::PathBuf;
use std::ptr;
use std::sync::{Arc, Mutex, Weak};
use thiserror::Error;

/// How to reach a cluster; equal settings share one rados connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClusterConfig {
    /// ceph.conf; None reads librados' default search path.
    pub conf: Option<PathBuf>,
    /// Client id without "client." (`admin`).
    pub id: Option<String>,
    /// Keyring file; the secret itself is never stored by nbd-runner.
    pub keyring: Option<PathBuf>,
    /// Seconds to wait for the monitors on connect.
    pub mount_timeout: u32,
    /// Seconds before an OSD op fails with ETIMEDOUT (0: wait for ever).
    pub op_timeout: u32,
    /// Overrides ceph.conf's `rbd cache`. librbd's default (writearound)
    /// acknowledges writes early and FLUSH waits for them, which NBD allows.
    pub rbd_cache: Option<bool>,
}

impl ClusterConfig {
    pub fn describe(&self) -> String {
        let conf = self
            .conf
            .as_ref()
            .map_or("the default ceph.conf".into(), |p| p.display().to_string());
        let who = format!("{conf} as client.{}", self.id.as_deref().unwrap_or("admin"));
        match &self.keyring {
            Some(k) => format!("{who} with keyring {}", k.display()),
            None => who,
        }
    }
}

/// A failed librados/librbd call: what we tried and the errno it gave.
#[derive(Debug, Error)]
#[error("{what}: {}{}", std::io::Error::from_raw_os_error(*.errno), hint(*.op, *.errno))]
pub struct CephError {
    pub what: String,
    pub op: Op,
    pub errno: i32,
}

/// Which call failed, for the operator hint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Connect,
    Pool,
    Open,
    Create,
    Remove,
    Encryption,
    Other,
}

fn hint(op: Op, errno: i32) -> &'static str {
    match (op, errno) {
        (Op::Connect, libc::ETIMEDOUT) => {
            " (no monitor answered; is the cluster up and is `mon host` in ceph.conf right?)"
        }
        (Op::Connect, libc::EACCES | libc::EPERM) => {
            " (authentication failed; check the client id and its keyring)"
        }
        (Op::Connect, libc::ENOENT) => " (ceph.conf or keyring not found or unreadable)",
        (Op::Encryption, libc::EPERM | libc::EACCES | libc::EINVAL) => {
            " (wrong passphrase, or not an encrypted image of that format)"
        }
        (Op::Encryption, libc::EEXIST) => " (already encrypted)",
        (_, libc::EACCES | libc::EPERM) => {
            " (the client's caps do not allow this; see `ceph auth get client.ID`)"
        }
        (Op::Pool, libc::ENOENT) => " (no such pool)",
        (Op::Open, libc::ENOENT) => " (no such image or snapshot)",
        (Op::Create, libc::EEXIST) => " (the image already exists)",
        (Op::Remove, libc::EBUSY) => " (the image is still open somewhere: watchers exist)",
        (_, libc::ETIMEDOUT) => " (the cluster did not answer in time)",
        _ => "",
    }
}

fn check(r: c_int, op: Op, what: impl FnOnce() -> String) -> Result<(), CephError> {
    if r < 0 {
        Err(CephError {
            what: what(),
            op,
            errno: -r,
        })
    } else {
        Ok(())
    }
}

fn cstr(s: &str) -> Result<CString, CephError> {
    CString::new(s).map_err(|_| CephError {
        what: format!("{s:?} contains a NUL byte"),
        op: Op::Other,
        errno: libc::EINVAL,
    })
}

/// A connected rados client.
pub struct Cluster {
    handle: rados_t,
    pub config: ClusterConfig,
}

// SAFETY: librados handles are thread-safe.
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: created by rados_create; every Pool and Image holds an Arc to us.
        unsafe { rados_shutdown(self.handle) };
    }
}

static CLUSTERS: Mutex<Option<HashMap<ClusterConfig, Weak<Cluster>>>> = Mutex::new(None);

impl Cluster {
    /// The shared connection for `config`, connecting on first use.
    pub fn get(config: &ClusterConfig) -> Result<Arc<Cluster>, CephError> {
        let mut all = CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
        let all = all.get_or_insert_with(HashMap::new);
        if let Some(c) = all.get(config).and_then(Weak::upgrade) {
            return Ok(c);
        }
        let c = Arc::new(Cluster::connect(config)?);
        all.retain(|_, w| w.strong_count() > 0);
        all.insert(config.clone(), Arc::downgrade(&c));
        Ok(c)
    }

    fn connect(config: &ClusterConfig) -> Result<Cluster, CephError> {
        let who = || format!("connecting to ceph ({})", config.describe());
        let id = config.id.as_deref().map(cstr).transpose()?;
        let mut handle = ptr::null_mut();
        // SAFETY: out-pointer to a local; id is NUL-terminated or null.
        let r =
            unsafe { rados_create(&mut handle, id.as_ref().map_or(ptr::null(), |c| c.as_ptr())) };
        check(r, Op::Connect, who)?;
        // Owned from here: Drop shuts it down on any error below.
        let cluster = Cluster {
            handle,
            config: config.clone(),
        };
        let conf = config
            .conf
            .as_ref()
            .map(|p| cstr(&p.to_string_lossy()))
            .transpose()?;
        // SAFETY: valid handle; path NUL-terminated or null (default search).
        let r = unsafe {
            rados_conf_read_file(handle, conf.as_ref().map_or(ptr::null(), |c| c.as_ptr()))
        };
        check(r, Op::Connect, || format!("{}: reading ceph.conf", who()))?;
        let set = |k: &str, v: &str| -> Result<(), CephError> {
            let (k, v) = (cstr(k)?, cstr(v)?);
            // SAFETY: valid handle and strings.
            let r = unsafe { rados_conf_set(handle, k.as_ptr(), v.as_ptr()) };
            check(r, Op::Connect, || format!("{}: setting {k:?}", who()))
        };
        if let Some(k) = &config.keyring {
            set("keyring", &k.to_string_lossy())?;
        }
        set("client_mount_timeout", &config.mount_timeout.to_string())?;
        set("rados_osd_op_timeout", &config.op_timeout.to_string())?;
        set("rados_mon_op_timeout", &config.op_timeout.to_string())?;
        // NBD clients are told to FLUSH (we advertise SEND_FLUSH) and every
        // FLUSH and FUA waits for librbd, so the cache need not stay in
        // writethrough until the first flush: that default protects guests
        // that never flush, and costs a synchronous OSD round trip per write
        // until the client's first FLUSH.
        set("rbd_cache_writethrough_until_flush", "false")?;
        if let Some(on) = config.rbd_cache {
            set("rbd_cache", if on { "true" } else { "false" })?;
        }
        // SAFETY: valid, configured handle.
        let r = unsafe { rados_connect(handle) };
        check(r, Op::Connect, who)?;
        tracing::info!(cluster = %config.describe(), "connected to ceph");
        Ok(cluster)
    }

    /// A context on `pool` (and rados namespace `ns`).
    pub fn pool(self: &Arc<Self>, pool: &str, ns: Option<&str>) -> Result<Pool, CephError> {
        let name = cstr(pool)?;
        let mut io = ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated name, out-pointer to a local.
        let r = unsafe { rados_ioctx_create(self.handle, name.as_ptr(), &mut io) };
        check(r, Op::Pool, || format!("pool {pool:?}"))?;
        let p = Pool {
            io,
            _cluster: self.clone(),
        };
        if let Some(ns) = ns {
            let ns = cstr(ns)?;
            // SAFETY: valid ioctx; librados copies the string.
            unsafe { rados_ioctx_set_namespace(p.io, ns.as_ptr()) };
        }
        Ok(p)
    }
}

/// A rados IO context on one pool.
pub struct Pool {
    io: rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados IO contexts may be used from any thread.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; images opened on it hold us.
        unsafe { rados_ioctx_destroy(self.io) };
    }
}

/// What `create` may choose besides the size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// log2 of the object size (22 = 4 MiB).
    pub order: Option<u8>,
    pub features: Option<u64>,
}

impl Pool {
    pub fn create(&self, name: &str, size: u64, opts: ImageOptions) -> Result<(), CephError> {
        let cname = cstr(name)?;
        let mut o = ptr::null_mut();
        // SAFETY: out-pointer to a local; destroyed below.
        unsafe { rbd_image_options_create(&mut o) };
        let mut r = 0;
        // SAFETY: valid options handle.
        unsafe {
            if let Some(order) = opts.order {
                r = rbd_image_options_set_uint64(o, RBD_IMAGE_OPTION_ORDER, order.into());
            }
            if let (0, Some(f)) = (r, opts.features) {
                r = rbd_image_options_set_uint64(o, RBD_IMAGE_OPTION_FEATURES, f);
            }
            if r == 0 {
                r = rbd_create4(self.io, cname.as_ptr(), size, o);
            }
            rbd_image_options_destroy(o);
        }
        check(r, Op::Create, || format!("creating image {name:?}"))
    }

    pub fn remove(&self, name: &str) -> Result<(), CephError> {
        let cname = cstr(name)?;
        // SAFETY: valid ioctx and name.
        let r = unsafe { rbd_remove(self.io, cname.as_ptr()) };
        check(r, Op::Remove, || format!("removing image {name:?}"))
    }

    pub fn open(self, name: &str) -> Result<Image, CephError> {
        let cname = cstr(name)?;
        let mut handle = ptr::null_mut();
        // SAFETY: valid ioctx and name; no snapshot (the writable head).
        let r = unsafe { rbd_open(self.io, cname.as_ptr(), &mut handle, ptr::null()) };
        check(r, Op::Open, || format!("opening image {name:?}"))?;
        Ok(Image {
            handle,
            _pool: self,
        })
    }
}

impl Pool {
    /// Opens snapshot `snap` of image `name`, read-only.
    pub fn open_snapshot(self, name: &str, snap: &str) -> Result<Image, CephError> {
        let (cname, csnap) = (cstr(name)?, cstr(snap)?);
        let mut handle = ptr::null_mut();
        // SAFETY: valid ioctx, names and out pointer.
        let r = unsafe { rbd_open_read_only(self.io, cname.as_ptr(), &mut handle, csnap.as_ptr()) };
        check(r, Op::Open, || format!("opening snapshot {name}@{snap}"))?;
        Ok(Image {
            handle,
            _pool: self,
        })
    }
}

/// LUKS as librbd does it (`rbd encryption format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Luks {
    V1,
    V2,
}

impl std::fmt::Display for Luks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Luks::V1 => "LUKS1",
            Luks::V2 => "LUKS2",
        })
    }
}

impl Luks {
    fn format(self) -> std::os::raw::c_int {
        match self {
            Luks::V1 => RBD_ENCRYPTION_FORMAT_LUKS1,
            Luks::V2 => RBD_ENCRYPTION_FORMAT_LUKS2,
        }
    }
}

/// An open image. librbd image handles are thread-safe: one is shared by
/// every shard (see the backend's notes on the exclusive lock).
pub struct Image {
    handle: rbd_image_t,
    _pool: Pool,
}

// SAFETY: librbd image handles may be used from any thread concurrently.
unsafe impl Send for Image {}
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open; rbd_close waits for in-flight aio.
        let r = unsafe { rbd_close(self.handle) };
        if r < 0 {
            tracing::warn!(errno = -r, "rbd_close failed");
        }
    }
}

/// `rbd_stat`'s useful part.
#[derive(Clone, Copy, Debug)]
pub struct ImageStat {
    pub size: u64,
    pub obj_size: u64,
    pub features: u64,
}

impl Image {
    /// Writes a LUKS header with `passphrase` (AES-256): the image is
    /// encrypted from now on, and loaded ([`Image::encryption_load`]).
    pub fn encryption_format(&self, luks: Luks, passphrase: &[u8]) -> Result<(), CephError> {
        self.encryption(luks, passphrase, true)
    }

    /// Unlocks an encrypted image: IO through this handle is decrypted and
    /// its size is what is left after the header.
    pub fn encryption_load(&self, luks: Luks, passphrase: &[u8]) -> Result<(), CephError> {
        self.encryption(luks, passphrase, false)
    }

    fn encryption(&self, luks: Luks, passphrase: &[u8], format: bool) -> Result<(), CephError> {
        let mut opts = rbd_encryption_luks_format_options_t {
            alg: RBD_ENCRYPTION_ALGORITHM_AES256,
            passphrase: passphrase.as_ptr().cast(),
            passphrase_size: passphrase.len(),
        };
        let size = std::mem::size_of_val(&opts);
        // SAFETY: an open image; opts points at the passphrase for the call only.
        let r = unsafe {
            if format {
                rbd_encryption_format(self.handle, luks.format(), &mut opts, size)
            } else {
                rbd_encryption_load(self.handle, luks.format(), &mut opts, size)
            }
        };
        let what = if format { "formatting" } else { "loading" };
        check(r, Op::Encryption, || format!("{what} {luks} encryption"))
    }

    pub fn raw(&self) -> rbd_image_t {
        self.handle
    }

    pub fn stat(&self) -> Result<ImageStat, CephError> {
        // SAFETY: plain-old-data out-struct of the size we pass.
        let mut info: rbd_image_info_t = unsafe { std::mem::zeroed() };
        let mut features = 0u64;
        let r = unsafe { rbd_stat(self.handle, &mut info, std::mem::size_of_val(&info)) };
        check(r, Op::Other, || "rbd_stat".into())?;
        // SAFETY: valid handle, out-pointer to a local.
        let r = unsafe { rbd_get_features(self.handle, &mut features) };
        check(r, Op::Other, || "rbd_get_features".into())?;
        // rbd_get_size is what IO may address: with encryption loaded, the
        // image less its header (rbd_stat keeps the raw size).
        let mut size = 0u64;
        // SAFETY: valid handle, out-pointer to a local.
        let r = unsafe { rbd_get_size(self.handle, &mut size) };
        check(r, Op::Other, || "rbd_get_size".into())?;
        Ok(ImageStat {
            size,
            obj_size: info.obj_size,
            features,
        })
    }

    pub fn size(&self) -> Result<u64, CephError> {
        let mut size = 0;
        // SAFETY: valid handle, out-pointer to a local.
        let r = unsafe { rbd_get_size(self.handle, &mut size) };
        check(r, Op::Other, || "rbd_get_size".into())?;
        Ok(size)
    }

    pub fn resize(&self, size: u64) -> Result<(), CephError> {
        // SAFETY: valid handle.
        let r = unsafe { rbd_resize(self.handle, size) };
        check(r, Op::Other, || format!("resizing to {size} bytes"))
    }

    /// Whether fast-diff can answer allocation queries from the object map.
    pub fn fast_diff_valid(&self) -> bool {
        let (mut features, mut flags) = (0u64, 0u64);
        // SAFETY: valid handle, out-pointers to locals.
        let ok = unsafe {
            rbd_get_features(self.handle, &mut features) == 0
                && rbd_get_flags(self.handle, &mut flags) == 0
        };
        ok && features & RBD_FEATURE_FAST_DIFF != 0
            && flags & (RBD_FLAG_FAST_DIFF_INVALID | RBD_FLAG_OBJECT_MAP_INVALID) == 0
    }

    /// Allocated ranges in `[offset, offset+len)`: `(offset, len, exists)`
    /// as librbd reports them, whole objects at a time.
    pub fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>, CephError> {
        unsafe extern "C" fn each(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: arg is the Vec below, alive for the synchronous call.
            let out = unsafe { &mut *(arg as *mut Vec<(u64, u64, bool)>) };
            out.push((off, len as u64, exists != 0));
            0
        }
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        // SAFETY: valid handle; the callback only runs during this call.
        let r = unsafe {
            rbd_diff_iterate2(
                self.handle,
                ptr::null(),
                offset,
                len,
                1,
                1,
                Some(each),
                (&mut out as *mut Vec<(u64, u64, bool)>).cast(),
            )
        };
        check(r, Op::Other, || "rbd_diff_iterate2".into())?;
        Ok(out)
    }
}
