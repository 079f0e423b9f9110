//! The backstores a runner knows, their state machine, and the link to the
//! IO route's export table. Every change is saved before it is answered.

use crate::factory::{self, BackstoreSpec, OpenMode, Opened, Origin, Settings};
use crate::model::{
    next, BackstoreInfo, Event, Handler, LinkInfo, ListFilter, OpReport, Refused, ShardConnections,
    State, StatsReport,
};
use crate::saveconfig::{SaveConfig, SavedBackstore, StateStore};
use crate::wire::{ConnPeer, CreateRequest, ErrorCode, MapTarget, UnmapTarget};
use nbd_engine::backend::{BackendError, Progress};
use nbd_engine::config::cpulist::format_cpu_list;
use nbd_engine::export::{Export, ExportTable};
use nbd_engine::server::directory::{PeerKey, ReserveError, ShardDirectory};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A map that never finished (the CLI died) may be retried after this.
const STALE_MAPPING: Duration = Duration::from_secs(60);
/// How long `delete` waits for closing NBD connections before refusing.
const DELETE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct CtlError {
    pub code: ErrorCode,
    pub message: String,
}

fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, CtlError> {
    Err(CtlError {
        code,
        message: message.into(),
    })
}

/// Where clients reach the IO route.
#[derive(Clone, Debug)]
pub struct IoRoute {
    /// Empty when the runner listens on every address.
    pub host: String,
    pub port: u16,
    pub shards: u32,
    /// The IO route's unix socket, for maps on this host.
    pub unix: Option<std::path::PathBuf>,
    /// Where the shards run, and the placements of maps in progress.
    pub directory: Arc<ShardDirectory>,
}

struct Entry {
    saved: SavedBackstore,
    export: Option<Arc<Export>>,
    /// Why the storage could not be opened.
    error: Option<String>,
    mapping_since: Option<Instant>,
    /// The placement of the map in progress, saved when it is done.
    placing: Vec<Option<u32>>,
}

pub struct Registry {
    store: StateStore,
    settings: Settings,
    entries: BTreeMap<String, Entry>,
    /// The runner's `--export` exports, there before the registry.
    statics: BTreeMap<String, Arc<Export>>,
    table: Arc<ExportTable>,
    io: IoRoute,
    /// Keys being created or deleted: their storage work runs outside the
    /// registry lock, and other requests for them are told to wait.
    busy: BTreeSet<String>,
}

/// A create that passed every check and holds its key: the storage work
/// ([`PendingCreate::open`]) runs without the registry lock, then
/// [`Registry::create_commit`] records it.
pub struct PendingCreate {
    spec: BackstoreSpec,
    saved: SavedBackstore,
    settings: Settings,
}

impl PendingCreate {
    pub fn key(&self) -> &str {
        &self.saved.key
    }

    /// Opens or makes the storage: cluster connects, preallocation and
    /// progress reports happen here, with no lock held.
    pub fn open(&self, progress: Progress) -> Result<Opened, BackendError> {
        let mode = OpenMode::Create {
            prealloc: self.saved.prealloc,
            progress,
        };
        factory::open(&self.spec, mode, Origin::Control, &self.settings)
    }
}

/// A delete that took the export out of the table and holds its key:
/// waiting for closing connections runs without the registry lock.
pub struct PendingDelete {
    key: String,
    export: Option<Arc<Export>>,
}

impl PendingDelete {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Waits a moment for connections that are going away; true once none is left.
    pub fn wait_idle(&self) -> bool {
        self.export
            .as_ref()
            .is_none_or(|x| x.stats.wait_idle(DELETE_GRACE))
    }
}

/// Storage to remove after a delete was recorded (outside the lock).
pub struct Removal {
    saved: SavedBackstore,
    settings: Settings,
}

impl Removal {
    pub fn run(self) {
        let key = self.saved.key.clone();
        if let Err(e) = factory::remove(&self.saved, &self.settings) {
            tracing::warn!(backstore = %key, error = %e, "deleted, but its storage was not removed");
        }
    }
}

impl Registry {
    /// Takes over a loaded state file: every backstore is opened and served
    /// again; ones the kernel held are dead until reattached.
    pub fn load(
        store: StateStore,
        cfg: SaveConfig,
        table: Arc<ExportTable>,
        io: IoRoute,
        settings: Settings,
    ) -> Result<Registry, CtlError> {
        let statics = table
            .all()
            .into_iter()
            .map(|x| (x.name.clone(), x))
            .collect();
        let mut reg = Registry {
            store,
            settings,
            entries: BTreeMap::new(),
            statics,
            table,
            io,
            busy: BTreeSet::new(),
        };
        for saved in cfg.after_restart().backstores {
            let key = saved.key.clone();
            let mut entry = Entry {
                saved,
                export: None,
                error: None,
                mapping_since: None,
                placing: Vec::new(),
            };
            reg.open(&mut entry);
            if let Some(e) = &entry.error {
                tracing::error!(backstore = %key, error = %e, "cannot open backstore; it stays listed");
            }
            reg.entries.insert(key, entry);
        }
        reg.save()?;
        Ok(reg)
    }

    /// Opens a saved backstore's storage again and serves it.
    fn open(&self, entry: &mut Entry) -> bool {
        let spec = BackstoreSpec::of(&entry.saved);
        match factory::open(&spec, OpenMode::Open, Origin::Control, &self.settings) {
            Ok(Opened { backend, .. }) => match self.table.add(&entry.saved.key, backend) {
                Ok(export) => {
                    entry.export = Some(export);
                    entry.error = None;
                    true
                }
                Err(e) => {
                    entry.error = Some(e.to_string());
                    false
                }
            },
            Err(e) => {
                entry.error = Some(e.to_string());
                false
            }
        }
    }

    fn snapshot(&self) -> SaveConfig {
        SaveConfig {
            backstores: self.entries.values().map(|e| e.saved.clone()).collect(),
            ..SaveConfig::default()
        }
    }

    fn save(&self) -> Result<(), CtlError> {
        self.store.save(&self.snapshot()).map_err(|e| CtlError {
            code: ErrorCode::Persistence,
            message: e.to_string(),
        })
    }

    /// Applies a state change to `key`, saves, and undoes it if saving fails.
    fn transition(
        &mut self,
        key: &str,
        change: impl FnOnce(&mut SavedBackstore),
    ) -> Result<(), CtlError> {
        let entry = self.entries.get_mut(key).expect("caller checked");
        let before = entry.saved.clone();
        change(&mut entry.saved);
        if let Err(e) = self.save() {
            self.entries.get_mut(key).expect("still there").saved = before;
            return Err(e);
        }
        Ok(())
    }

    fn entry(&self, handler: Option<Handler>, key: &str) -> Result<&Entry, CtlError> {
        let Some(e) = self.entries.get(key) else {
            if self.statics.contains_key(key) {
                return fail(
                    ErrorCode::InvalidArgument,
                    format!(
                        "{key:?} is served from the runner's --export flag: nbd-cli lists it \
                         but does not map, delete or resize it (attach it with any NBD client, \
                         or create it as a backstore instead)"
                    ),
                );
            }
            return fail(ErrorCode::NotFound, format!("no backstore {key:?}"));
        };
        match handler {
            Some(h) if h != e.saved.handler => fail(
                ErrorCode::InvalidArgument,
                format!("{key:?} is a {} backstore, not {h}", e.saved.handler),
            ),
            _ => Ok(e),
        }
    }

    /// Creates a backstore in one go (the three steps below, holding
    /// `&mut self` throughout; the control server runs the middle step
    /// without the lock).
    pub fn create(
        &mut self,
        req: CreateRequest,
        progress: Progress,
    ) -> Result<BackstoreInfo, CtlError> {
        let pending = self.create_begin(req)?;
        let opened = pending.open(progress);
        self.create_commit(pending, opened)
    }

    /// Checks a create and reserves its key.
    pub fn create_begin(&mut self, req: CreateRequest) -> Result<PendingCreate, CtlError> {
        let spec = BackstoreSpec {
            handler: req.handler,
            key: req.key.clone(),
            size: Some(req.size),
            read_only: false,
            options: req.options.clone(),
        };
        if let Err(m) = spec.validate(Origin::Control, &self.settings) {
            let code = if factory::available(req.handler).is_err() {
                ErrorCode::Unsupported
            } else {
                ErrorCode::InvalidArgument
            };
            return fail(code, m);
        }
        self.check_not_busy(&req.key)?;
        if let Some(e) = self.entries.get(&req.key) {
            return fail(
                ErrorCode::Exists,
                format!(
                    "backstore {:?} already exists ({})",
                    req.key, e.saved.handler
                ),
            );
        }
        if self.table.get(&req.key).is_some() {
            return fail(
                ErrorCode::Exists,
                format!(
                    "{:?} is already served (an --export of this runner)",
                    req.key
                ),
            );
        }
        self.busy.insert(req.key.clone());
        Ok(PendingCreate {
            spec,
            saved: SavedBackstore {
                key: req.key,
                handler: req.handler,
                size: req.size,
                state: State::Created,
                device: None,
                id: crate::trust::random_hex(16),
                owned: false,
                prealloc: req.prealloc,
                options: req.options,
                connections: 0,
                reattaches: 0,
                reattached_at: None,
                placement: Vec::new(),
            },
            settings: self.settings.clone(),
        })
    }

    /// Records a create whose storage work is done (or failed), and frees
    /// its key. Storage it made is removed again if it cannot be recorded.
    pub fn create_commit(
        &mut self,
        pending: PendingCreate,
        opened: Result<Opened, BackendError>,
    ) -> Result<BackstoreInfo, CtlError> {
        let PendingCreate { mut saved, .. } = pending;
        let key = saved.key.clone();
        self.busy.remove(&key);
        let Opened { backend, created } = match opened {
            Ok(v) => v,
            Err(e) => return fail(ErrorCode::Backend, e.to_string()),
        };
        saved.owned = created;
        let export = match self.table.add(&key, backend) {
            Ok(e) => e,
            Err(e) => return fail(ErrorCode::Exists, e.to_string()),
        };
        let (handler, size) = (saved.handler, saved.size);
        self.entries.insert(
            key.clone(),
            Entry {
                saved,
                export: Some(export),
                error: None,
                mapping_since: None,
                placing: Vec::new(),
            },
        );
        if let Err(e) = self.save() {
            let entry = self.entries.remove(&key).expect("just inserted");
            self.table.remove(&key);
            let _ = factory::remove(&entry.saved, &self.settings);
            return Err(e);
        }
        tracing::info!(backstore = %key, %handler, size, "created");
        self.info(&key)
    }

    /// Frees a key whose create or delete never reached its commit; a
    /// delete's export is served again.
    pub fn release(&mut self, key: &str) {
        self.busy.remove(key);
        if let Some(x) = self.entries.get(key).and_then(|e| e.export.clone()) {
            self.table.restore(x);
        }
    }

    fn check_not_busy(&self, key: &str) -> Result<(), CtlError> {
        if self.busy.contains(key) {
            return fail(
                ErrorCode::WrongState,
                format!("{key:?} is being created or deleted; try again shortly"),
            );
        }
        Ok(())
    }

    /// Deletes a backstore in one go (see [`Registry::create`]).
    pub fn delete(&mut self, handler: Handler, key: &str) -> Result<(), CtlError> {
        let pending = self.delete_begin(handler, key)?;
        let idle = pending.wait_idle();
        self.delete_commit(pending, idle)?.run();
        Ok(())
    }

    /// Checks a delete, reserves the key and takes the export out of the
    /// table, so no new connection can reach it.
    pub fn delete_begin(&mut self, handler: Handler, key: &str) -> Result<PendingDelete, CtlError> {
        self.check_not_busy(key)?;
        let entry = self.entry(Some(handler), key)?;
        self.step(entry, Event::Delete)?;
        let export = entry.export.clone();
        if export.is_some() {
            self.table.remove(key);
        }
        self.busy.insert(key.to_owned());
        Ok(PendingDelete {
            key: key.to_owned(),
            export,
        })
    }

    /// Records a delete once its connections are gone (`idle`), or puts
    /// the export back and refuses; frees the key either way. The storage
    /// is removed by the returned [`Removal`], outside the lock.
    pub fn delete_commit(
        &mut self,
        pending: PendingDelete,
        idle: bool,
    ) -> Result<Removal, CtlError> {
        let PendingDelete { key, export } = pending;
        self.busy.remove(&key);
        if !idle {
            let clients = export.as_ref().map_or(0, |x| x.stats.connections());
            if let Some(x) = export {
                self.table.restore(x);
            }
            return fail(
                ErrorCode::WrongState,
                format!("{key:?} has {clients} open NBD connection(s)"),
            );
        }
        let entry = self.entries.remove(&key).expect("reserved keys stay");
        if let Err(e) = self.save() {
            if let Some(x) = export {
                self.table.restore(x);
            }
            self.entries.insert(key, entry);
            return Err(e);
        }
        tracing::info!(backstore = %key, "deleted");
        // The storage closes with the last handle, before it is removed
        // (an open rbd image has a watcher).
        Ok(Removal {
            saved: entry.saved,
            settings: self.settings.clone(),
        })
    }

    /// What `event` does to an entry now, as the one state machine says.
    fn step(&self, entry: &Entry, event: Event) -> Result<State, CtlError> {
        let s = &entry.saved;
        next(s.state, s.device.is_some(), event).map_err(|r| {
            let (key, state) = (&s.key, s.state);
            let device = s.device.as_deref().unwrap_or("a device");
            let message = match r {
                Refused::AlreadyMapped => format!("{key:?} is already mapped to {device}"),
                Refused::Busy => format!("{key:?} is {state}; try again shortly"),
                Refused::NotMapping => format!("{key:?} is {state}, not mapping"),
                Refused::NotUnmapping => format!("{key:?} is {state}, not unmapping"),
                Refused::NotMapped => format!("{key:?} is {state}, not mapped"),
                Refused::StillMapped => format!("{key:?} is {state} ({device}); unmap it first"),
                Refused::Static => format!("{key:?} is served from the runner's --export flag"),
            };
            CtlError {
                code: ErrorCode::WrongState,
                message,
            }
        })
    }

    /// Resizes a backstore's storage. Shrinking throws away what lies past
    /// the new end, so it needs `shrink` (nbd-cli's `allow-shrink`).
    /// Returns the backstore and its kernel cookie, for a mapped device.
    pub fn resize(
        &mut self,
        handler: Handler,
        key: &str,
        size: u64,
        shrink: bool,
    ) -> Result<(BackstoreInfo, String), CtlError> {
        self.check_not_busy(key)?;
        let entry = self.entry(Some(handler), key)?;
        if size == 0 {
            return fail(ErrorCode::InvalidArgument, "size must be more than 0");
        }
        self.step(entry, Event::Resize)?;
        let Some(export) = entry.export.clone() else {
            let why = entry.error.clone().unwrap_or_default();
            return fail(ErrorCode::Backend, format!("{key:?} is not open: {why}"));
        };
        let current = export.backend.size();
        if size < current && !shrink {
            return fail(
                ErrorCode::InvalidArgument,
                format!(
                    "{key:?} has {current} bytes; shrinking to {size} discards everything \
                     past the new end (give allow-shrink to do it anyway)"
                ),
            );
        }
        if size != current {
            export.backend.resize(size).map_err(|e| match e {
                nbd_engine::backend::BackendError::Unsupported => CtlError {
                    code: ErrorCode::Unsupported,
                    message: format!("{handler} backstores cannot be resized"),
                },
                e => CtlError {
                    code: ErrorCode::Backend,
                    message: e.to_string(),
                },
            })?;
        }
        let now = export.backend.size();
        self.transition(key, |s| s.size = now)?;
        tracing::info!(backstore = %key, from = current, to = now, "resized");
        let cookie = cookie(&self.entries[key].saved);
        Ok((self.info(key)?, cookie))
    }

    /// The most connections one map may place (the kernel takes far fewer);
    /// the same bound as a `shards` list.
    pub const MAX_MAP_CONNECTIONS: usize = nbd_engine::config::shardlist::MAX_ENTRIES;

    pub fn map_begin(
        &mut self,
        handler: Handler,
        key: &str,
        shards: &[Option<u32>],
    ) -> Result<MapTarget, CtlError> {
        self.check_not_busy(key)?;
        within_map_limit(shards.len(), "shards listed")?;
        self.io
            .directory
            .check(shards.iter().flatten().map(|&s| s as usize))
            .map_err(placement_error)?;
        let entry = self.entry(Some(handler), key)?;
        let (state, device) = (entry.saved.state, entry.saved.device.clone());
        let stale = entry
            .mapping_since
            .is_some_and(|t| t.elapsed() > STALE_MAPPING);
        let to = self.step(entry, Event::MapBegin { stale })?;
        if entry.export.is_none() {
            let mut e = self.entries.remove(key).expect("checked");
            let ok = self.open(&mut e);
            let err = e.error.clone();
            self.entries.insert(key.to_owned(), e);
            if !ok {
                return fail(
                    ErrorCode::Backend,
                    format!("cannot open {key:?}: {}", err.unwrap_or_default()),
                );
            }
        }
        self.transition(key, |s| s.state = to)?;
        let entry = self.entries.get_mut(key).expect("checked");
        entry.mapping_since = Some(Instant::now());
        // Asked for, or a reattach keeps what the device had: on the shards
        // this runner has (it may have restarted with fewer).
        entry.placing = if !shards.is_empty() {
            shards.to_vec()
        } else if state == State::Dead {
            let have = self.io.shards;
            let saved = &entry.saved.placement;
            let kept: Vec<_> = saved.iter().map(|s| s.filter(|&s| s < have)).collect();
            if kept != *saved {
                tracing::warn!(backstore = %key, shards = have, "the saved placement names shards this runner does not have; those connections go to the least-loaded shard");
            }
            kept
        } else {
            Vec::new()
        };
        if entry.placing.iter().all(Option::is_none) {
            entry.placing.clear();
        }
        Ok(MapTarget {
            key: key.to_owned(),
            io_host: self.io.host.clone(),
            io_port: self.io.port,
            io_unix: self
                .io
                .unix
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            shards: self.io.shards,
            cookie: cookie(&entry.saved),
            connections: entry.saved.connections,
            reattach: if state == State::Dead { device } else { None },
            placement: entry.placing.clone(),
        })
    }

    /// Reserves the shards of the map in progress for the peers its
    /// connections will come from (connection i takes placement i, round
    /// robin when there are more connections).
    pub fn map_peers(&mut self, key: &str, peers: &[ConnPeer]) -> Result<(), CtlError> {
        let entry = self.entry(None, key)?;
        if entry.saved.state != State::Mapping {
            return fail(
                ErrorCode::WrongState,
                format!("{key:?} is not being mapped"),
            );
        }
        within_map_limit(peers.len(), "connections")?;
        let placing = &entry.placing;
        let wanted: Vec<(PeerKey, usize)> = if placing.is_empty() {
            Vec::new()
        } else {
            peers
                .iter()
                .enumerate()
                .filter_map(|(i, p)| {
                    let shard = placing[i % placing.len()]?;
                    let key = match *p {
                        ConnPeer::Tcp(a) => PeerKey::Tcp(a),
                        ConnPeer::Unix { pid } => PeerKey::Unix { pid },
                    };
                    Some((key, shard as usize))
                })
                .collect()
        };
        self.io
            .directory
            .reserve(key, &wanted, Instant::now())
            .map_err(placement_error)
    }

    /// Records the device and its connection count; the same device again
    /// (a dead one reattached) counts as a reattach.
    pub fn map_done(&mut self, key: &str, device: &str, connections: u32) -> Result<(), CtlError> {
        let entry = self.entry(None, key)?;
        let to = self.step(entry, Event::MapDone)?;
        if let Some(other) = self
            .entries
            .values()
            .find(|e| e.saved.key != key && e.saved.device.as_deref() == Some(device))
        {
            return fail(
                ErrorCode::Exists,
                format!("{device} already belongs to {:?}", other.saved.key),
            );
        }
        let reattach = entry.saved.device.as_deref() == Some(device);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let device = device.to_owned();
        let placement = entry.placing.clone();
        self.io.directory.release(key);
        self.transition(key, |s| {
            s.state = to;
            s.device = Some(device);
            s.connections = connections;
            s.placement = placement;
            if reattach {
                s.reattaches += 1;
                s.reattached_at = Some(now);
            }
        })?;
        self.entries.get_mut(key).expect("checked").mapping_since = None;
        tracing::info!(backstore = %key, connections, reattach, "mapped");
        Ok(())
    }

    pub fn map_abort(&mut self, key: &str, reason: &str) -> Result<(), CtlError> {
        let entry = self.entry(None, key)?;
        let to = self.step(entry, Event::MapAbort)?;
        if to == entry.saved.state {
            return Ok(()); // nothing was being mapped
        }
        self.io.directory.release(key);
        tracing::warn!(backstore = %key, %reason, "map failed");
        self.transition(key, |s| s.state = to)?;
        self.entries.get_mut(key).expect("checked").mapping_since = None;
        Ok(())
    }

    pub fn unmap_begin(&mut self, handler: Handler, target: &str) -> Result<UnmapTarget, CtlError> {
        let key = if target.starts_with("/dev/") {
            match self
                .entries
                .values()
                .find(|e| e.saved.device.as_deref() == Some(target))
            {
                Some(e) => e.saved.key.clone(),
                None => {
                    return fail(
                        ErrorCode::NotFound,
                        format!("no backstore is mapped to {target}"),
                    )
                }
            }
        } else {
            target.to_owned()
        };
        self.check_not_busy(&key)?;
        let entry = self.entry(Some(handler), &key)?;
        let to = self.step(entry, Event::UnmapBegin)?;
        self.transition(&key, |s| s.state = to)?;
        let saved = &self.entries[&key].saved;
        let (device, cookie) = (saved.device.clone(), cookie(saved));
        Ok(UnmapTarget {
            key,
            device,
            cookie,
        })
    }

    pub fn unmap_done(&mut self, key: &str) -> Result<(), CtlError> {
        let entry = self.entry(None, key)?;
        let to = self.step(entry, Event::UnmapDone)?;
        self.transition(key, |s| {
            s.state = to;
            s.device = None;
        })?;
        tracing::info!(backstore = %key, "unmapped");
        Ok(())
    }

    /// Drops every open backstore; the state file keeps them for the next start.
    pub fn close_all(&mut self) {
        for (key, e) in &mut self.entries {
            if e.export.take().is_some() {
                self.table.remove(key);
            }
        }
    }

    /// Mapped backstores whose IO connections have all gone are dead: the
    /// kernel still holds the device but nothing serves it.
    pub fn reap_dead(&mut self) {
        let dead: Vec<String> = self
            .entries
            .values()
            .filter(|e| e.saved.state == State::Mapped)
            .filter(|e| {
                e.export
                    .as_ref()
                    .is_some_and(|x| total(&connections(x)) == 0)
            })
            .map(|e| e.saved.key.clone())
            .collect();
        for key in dead {
            tracing::warn!(backstore = %key, "all IO connections dropped while mapped; now dead");
            let Ok(to) = self.step(&self.entries[&key], Event::IoLost) else {
                continue;
            };
            if let Err(e) = self.transition(&key, |s| s.state = to) {
                tracing::error!(error = %e, "cannot record dead backstore");
            }
        }
    }

    pub fn list(&self, handler: Option<Handler>, filter: ListFilter) -> Vec<BackstoreInfo> {
        let mut all: Vec<BackstoreInfo> = self
            .entries
            .values()
            .map(|e| self.describe(e))
            .chain(self.statics.values().map(|x| self.describe_static(x)))
            .filter(|b| handler.is_none_or(|h| h == b.handler))
            .filter(|b| filter.matches(b.state))
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    pub fn info(&self, key: &str) -> Result<BackstoreInfo, CtlError> {
        if let Some(x) = self.statics.get(key) {
            return Ok(self.describe_static(x));
        }
        Ok(self.describe(self.entry(None, key)?))
    }

    pub fn stats(&self, key: &str) -> Result<StatsReport, CtlError> {
        let export = match self.statics.get(key) {
            Some(x) => x,
            None => match &self.entry(None, key)?.export {
                Some(x) => x,
                None => return fail(ErrorCode::Backend, format!("{key:?} is not open")),
            },
        };
        let uptime = export.opened.elapsed().as_secs_f64().max(1e-9);
        let snap = export.stats.snapshot();
        let ops = snap
            .ops
            .iter()
            .filter(|(_, s)| s.count() > 0)
            .map(|(op, s)| {
                let us = |q: f64| s.latency_ns.value_at_quantile(q) as f64 / 1000.0;
                OpReport {
                    op: op.name().to_owned(),
                    count: s.count(),
                    errors: s.errors,
                    bytes: s.bytes,
                    iops: s.count() as f64 / uptime,
                    p50_us: us(0.5),
                    p90_us: us(0.9),
                    p99_us: us(0.99),
                    p999_us: us(0.999),
                    max_us: s.latency_ns.max() as f64 / 1000.0,
                }
            })
            .collect();
        Ok(StatsReport {
            key: key.to_owned(),
            uptime_secs: uptime,
            ops,
            connections: connections(export),
        })
    }
}

fn placement_error(e: ReserveError) -> CtlError {
    CtlError {
        code: ErrorCode::InvalidArgument,
        message: e.to_string(),
    }
}

/// One map's connections (or their shards) are at most a bounded few.
fn within_map_limit(n: usize, what: &str) -> Result<(), CtlError> {
    if n > Registry::MAX_MAP_CONNECTIONS {
        return fail(
            ErrorCode::InvalidArgument,
            format!(
                "{n} {what}; a map has at most {} connections",
                Registry::MAX_MAP_CONNECTIONS
            ),
        );
    }
    Ok(())
}

fn connections(export: &Export) -> Vec<ShardConnections> {
    export
        .stats
        .snapshot_connections()
        .into_iter()
        .enumerate()
        .map(|(shard, connections)| ShardConnections {
            shard: shard as u32,
            connections,
        })
        .collect()
}

fn total(c: &[ShardConnections]) -> u64 {
    c.iter().map(|s| s.connections).sum()
}

impl Registry {
    fn describe(&self, e: &Entry) -> BackstoreInfo {
        let (flags, mode, read_only) = match &e.export {
            Some(x) => {
                let caps = x.backend.capabilities();
                (caps.transmission_flags(), x.backend.mode(), caps.read_only)
            }
            None => (0, String::new(), false),
        };
        BackstoreInfo {
            key: e.saved.key.clone(),
            handler: e.saved.handler,
            size: e.saved.size,
            state: e.saved.state,
            device: e.saved.device.clone(),
            read_only,
            flags,
            mode,
            error: e.error.clone(),
            connections: e.export.as_deref().map(connections).unwrap_or_default(),
            links: e
                .export
                .as_deref()
                .map(|x| self.links(x))
                .unwrap_or_default(),
            placement: e.saved.placement.clone(),
            options: e.saved.options.clone(),
            reattaches: e.saved.reattaches,
            reattached_at: e.saved.reattached_at,
            cookie: cookie(&e.saved),
        }
    }

    fn describe_static(&self, x: &Export) -> BackstoreInfo {
        let caps = x.backend.capabilities();
        BackstoreInfo {
            key: x.name.clone(),
            // Startup exports come from the handlers the control plane knows.
            handler: x.backend.handler().parse().unwrap_or(Handler::File),
            size: x.backend.size(),
            state: State::Static,
            device: None,
            read_only: caps.read_only,
            flags: caps.transmission_flags(),
            mode: x.backend.mode(),
            error: None,
            connections: connections(x),
            links: self.links(x),
            placement: Vec::new(),
            options: BTreeMap::new(),
            reattaches: 0,
            reattached_at: None,
            cookie: String::new(),
        }
    }

    fn links(&self, x: &Export) -> Vec<LinkInfo> {
        x.stats
            .links()
            .into_iter()
            .map(|l| {
                let thread = self.io.directory.thread(l.shard);
                LinkInfo {
                    shard: l.shard as u32,
                    peer: l.peer,
                    thread: thread.as_ref().map_or(0, |t| t.tid),
                    cpus: thread.map_or_else(String::new, |t| format_cpu_list(&t.cpus)),
                }
            })
            .collect()
    }
}

/// The kernel's BACKEND_IDENTIFIER for a backstore.
fn cookie(s: &SavedBackstore) -> String {
    format!("nbd-runner:{}", s.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::CreateRequest;

    fn registry(dir: &std::path::Path) -> Registry {
        registry_with_shards(dir, 2)
    }

    fn registry_with_shards(dir: &std::path::Path, shards: usize) -> Registry {
        let (store, cfg) = StateStore::open(dir).unwrap();
        let io = IoRoute {
            host: String::new(),
            port: 24111,
            shards: shards as u32,
            unix: None,
            directory: Arc::new(ShardDirectory::new(shards)),
        };
        // File keys in these tests live beside the state directory.
        let settings = Settings {
            file_roots: crate::confine::FileRoots {
                roots: dir.parent().into_iter().map(Into::into).collect(),
                allow_block_devices: false,
            },
            ..Settings::default()
        };
        Registry::load(store, cfg, Arc::new(ExportTable::new(shards)), io, settings).unwrap()
    }

    #[test]
    fn startup_exports_are_listed_as_static_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cfg) = StateStore::open(dir.path()).unwrap();
        let table = Arc::new(ExportTable::new(2));
        let mem = nbd_engine::backend::MemBackend::new(
            1 << 20,
            false,
            &nbd_engine::backend::MemBudget::unlimited(),
        )
        .unwrap();
        table.add("boot", Arc::new(mem)).unwrap();
        let io = IoRoute {
            host: String::new(),
            port: 24111,
            shards: 2,
            unix: None,
            directory: Arc::new(ShardDirectory::new(2)),
        };
        let mut reg = Registry::load(store, cfg, table, io, Default::default()).unwrap();
        create(&mut reg, Handler::Mem, "made", 4096).unwrap();
        let list = reg.list(None, ListFilter::All);
        let keys: Vec<_> = list.iter().map(|b| (b.key.as_str(), b.state)).collect();
        assert_eq!(keys, [("boot", State::Static), ("made", State::Created)]);
        assert_eq!(list[0].handler, Handler::Mem);
        assert_eq!(list[0].size, 1 << 20);
        assert!(reg.list(None, ListFilter::Map).is_empty());
        assert_eq!(reg.info("boot").unwrap().state, State::Static);
        assert!(reg.stats("boot").is_ok());
        let refused = reg.map_begin(Handler::Mem, "boot", &[]).unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidArgument);
        assert!(refused.message.contains("--export"), "{}", refused.message);
        assert!(reg.delete(Handler::Mem, "boot").is_err());
        // Never saved: the flag brings it back, not the state file.
        let saved = std::fs::read_to_string(dir.path().join("saveconfig.json")).unwrap();
        assert!(!saved.contains("boot"), "{saved}");
    }

    fn mem_request(key: &str) -> CreateRequest {
        CreateRequest {
            handler: Handler::Mem,
            key: key.into(),
            size: 4096,
            prealloc: false,
            options: BTreeMap::new(),
        }
    }

    /// While a create or delete does its storage work (no lock held in the
    /// server), its key is reserved: other requests for it wait, the rest
    /// of the registry answers, and a failed or dropped one frees the key.
    #[test]
    fn reserved_keys_during_storage_work() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = registry(dir.path());
        let pending = reg.create_begin(mem_request("slow")).unwrap();
        let busy = reg.create_begin(mem_request("slow")).err().unwrap();
        assert!(
            busy.message.contains("being created or deleted"),
            "{}",
            busy.message
        );
        assert!(reg.map_begin(Handler::Mem, "slow", &[]).is_err());
        // Others go on meanwhile.
        create(&mut reg, Handler::Mem, "other", 4096).unwrap();
        assert_eq!(
            reg.list(None, ListFilter::All).len(),
            1,
            "slow is not listed yet"
        );
        let opened = pending.open(&mut |_, _| {});
        reg.create_commit(pending, opened).unwrap();
        assert_eq!(state(&reg, "slow"), State::Created);

        // A failed storage step frees the key and records nothing.
        let pending = reg.create_begin(mem_request("fails")).unwrap();
        let e = reg
            .create_commit(pending, Err(BackendError::Config("cluster down".into())))
            .err()
            .unwrap();
        assert!(e.message.contains("cluster down"));
        assert!(reg.info("fails").is_err());
        create(&mut reg, Handler::Mem, "fails", 4096).unwrap();

        // A delete takes the export out of the table before it waits...
        let pending = reg.delete_begin(Handler::Mem, "slow").unwrap();
        assert!(reg.table.get("slow").is_none());
        assert!(reg
            .map_begin(Handler::Mem, "slow", &[])
            .err()
            .unwrap()
            .message
            .contains("being"));
        // ...and puts it back if connections stayed.
        let e = reg.delete_commit(pending, false).err().unwrap();
        assert!(e.message.contains("open NBD connection"), "{}", e.message);
        assert!(reg.table.get("slow").is_some());
        assert_eq!(state(&reg, "slow"), State::Created);
        // A reservation dropped without its commit is released.
        let pending = reg.delete_begin(Handler::Mem, "slow").unwrap();
        let key = pending.key().to_owned();
        drop(pending);
        reg.release(&key);
        assert!(reg.table.get("slow").is_some(), "served again");
        if let Err(e) = reg.delete(Handler::Mem, "slow") {
            panic!("{}", e.message);
        }
        assert!(reg.info("slow").is_err());
    }

    fn create(
        reg: &mut Registry,
        handler: Handler,
        key: &str,
        size: u64,
    ) -> Result<BackstoreInfo, CtlError> {
        reg.create(
            CreateRequest {
                handler,
                key: key.into(),
                size,
                prealloc: false,
                options: BTreeMap::new(),
            },
            &mut |_, _| {},
        )
    }

    fn state(reg: &Registry, key: &str) -> State {
        reg.info(key).unwrap().state
    }

    #[test]
    fn full_life_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = registry(dir.path());
        let info = create(&mut reg, Handler::Mem, "disk0", 1 << 20).unwrap();
        assert_eq!((info.state, info.size), (State::Created, 1 << 20));
        assert_eq!(
            create(&mut reg, Handler::File, "disk0", 1)
                .unwrap_err()
                .code,
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            create(&mut reg, Handler::Mem, "disk0", 1).unwrap_err().code,
            ErrorCode::Exists
        );

        let wrong = reg.map_begin(Handler::File, "disk0", &[]).unwrap_err();
        assert!(wrong.message.contains("mem backstore"), "{wrong}");
        let target = reg.map_begin(Handler::Mem, "disk0", &[]).unwrap();
        assert!(target.cookie.starts_with("nbd-runner:"));
        assert_eq!(
            (target.io_port, target.shards, target.reattach),
            (24111, 2, None)
        );
        assert_eq!(state(&reg, "disk0"), State::Mapping);
        assert_eq!(
            reg.map_begin(Handler::Mem, "disk0", &[]).unwrap_err().code,
            ErrorCode::WrongState
        );
        reg.map_done("disk0", "/dev/nbd3", 2).unwrap();
        assert_eq!(state(&reg, "disk0"), State::Mapped);
        assert_eq!(reg.list(None, ListFilter::Live).len(), 1);
        assert_eq!(reg.list(None, ListFilter::Create).len(), 0);

        let refused = reg.delete(Handler::Mem, "disk0").unwrap_err();
        assert!(refused.message.contains("/dev/nbd3"), "{refused}");
        let u = reg.unmap_begin(Handler::Mem, "/dev/nbd3").unwrap();
        assert_eq!(
            (u.key.as_str(), u.device.as_deref()),
            ("disk0", Some("/dev/nbd3"))
        );
        reg.unmap_done("disk0").unwrap();
        assert_eq!(reg.info("disk0").unwrap().device, None);
        assert_eq!(
            reg.unmap_begin(Handler::Mem, "disk0").unwrap_err().code,
            ErrorCode::WrongState
        );
        reg.delete(Handler::Mem, "disk0").unwrap();
        assert_eq!(reg.info("disk0").unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn restart_brings_everything_back_and_mapped_ones_dead() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.raw");
        let img = img.to_str().unwrap();
        let state_dir = dir.path().join("state");
        let cookie = {
            let mut reg = registry(&state_dir);
            create(&mut reg, Handler::File, img, 4 << 20).unwrap();
            create(&mut reg, Handler::Mem, "scratch", 1 << 20).unwrap();
            let t = reg.map_begin(Handler::File, img, &[]).unwrap();
            reg.map_done(img, "/dev/nbd0", 1).unwrap();
            t.cookie
        };
        let mut reg = registry(&state_dir);
        assert_eq!(state(&reg, img), State::Dead);
        assert_eq!(state(&reg, "scratch"), State::Created);
        assert_eq!(reg.list(None, ListFilter::Dead).len(), 1);
        assert!(reg.info(img).unwrap().error.is_none());
        let again = reg.map_begin(Handler::File, img, &[]).unwrap();
        assert_eq!(again.cookie, cookie, "the cookie must survive restarts");
        assert_eq!(again.reattach.as_deref(), Some("/dev/nbd0"));
        assert_eq!(again.connections, 1, "a reattach replaces every connection");
        // An aborted reattach leaves it dead, not forgotten.
        reg.map_abort(img, "test").unwrap();
        assert_eq!(state(&reg, img), State::Dead);
        assert_eq!(reg.info(img).unwrap().reattaches, 0);
        // A reattach is counted, and the count survives a restart.
        reg.map_begin(Handler::File, img, &[]).unwrap();
        reg.map_done(img, "/dev/nbd0", 1).unwrap();
        let info = reg.info(img).unwrap();
        assert_eq!((info.state, info.reattaches), (State::Mapped, 1));
        assert!(info.reattached_at.is_some());
        drop(reg);
        let reg = registry(&state_dir);
        assert_eq!(reg.info(img).unwrap().reattaches, 1);
    }

    #[test]
    fn a_placement_is_checked_reserved_saved_and_kept_for_a_reattach() {
        use nbd_engine::server::directory::PeerKey;
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        let peer = |port| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        {
            let mut reg = registry(&state_dir);
            create(&mut reg, Handler::Mem, "d", 1 << 20).unwrap();
            // Hostile lists: a shard past the last, or more than a map may have.
            let e = reg
                .map_begin(Handler::Mem, "d", &[Some(0), Some(2)])
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert_eq!(e.message, "shard 2 does not exist: the runner has 2 (0-1)");
            let long = vec![None; Registry::MAX_MAP_CONNECTIONS + 1];
            let e = reg.map_begin(Handler::Mem, "d", &long).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert_eq!(
                state(&reg, "d"),
                State::Created,
                "a refused map changes nothing"
            );
            // Peers before MapBegin: refused.
            let e = reg.map_peers("d", &[ConnPeer::Tcp(peer(1))]).unwrap_err();
            assert_eq!(e.code, ErrorCode::WrongState);

            let t = reg.map_begin(Handler::Mem, "d", &[Some(1), None]).unwrap();
            assert_eq!(t.placement, [Some(1), None]);
            let peers: Vec<_> = (1..=3).map(|p| ConnPeer::Tcp(peer(p))).collect();
            reg.map_peers("d", &peers).unwrap();
            // Connection i takes placement i, round robin; auto reserves nothing.
            let dirs = reg.io.directory.clone();
            let now = Instant::now();
            assert_eq!(dirs.take(&PeerKey::Tcp(peer(2)), now), None);
            assert_eq!(dirs.take(&PeerKey::Tcp(peer(3)), now), Some(1));
            let e = reg.map_peers("d", &vec![peers[0]; 257]).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            reg.map_done("d", "/dev/nbd4", 3).unwrap();
            // What the connections did not take is released.
            assert_eq!(dirs.take(&PeerKey::Tcp(peer(1)), now), None);
            assert_eq!(reg.info("d").unwrap().placement, [Some(1), None]);
        }
        // After a restart the device is dead; a reattach keeps the placement.
        let mut reg = registry(&state_dir);
        let t = reg.map_begin(Handler::Mem, "d", &[]).unwrap();
        assert_eq!(t.reattach.as_deref(), Some("/dev/nbd4"));
        assert_eq!(t.placement, [Some(1), None]);
        reg.map_abort("d", "test").unwrap();
        // Asked again, a reattach takes the new placement; a fresh map with
        // none is all least-loaded.
        let t = reg.map_begin(Handler::Mem, "d", &[Some(0)]).unwrap();
        assert_eq!(t.placement, [Some(0)]);
        reg.map_done("d", "/dev/nbd4", 1).unwrap();
        reg.unmap_begin(Handler::Mem, "d").unwrap();
        reg.unmap_done("d").unwrap();
        assert!(reg
            .map_begin(Handler::Mem, "d", &[])
            .unwrap()
            .placement
            .is_empty());
        reg.map_done("d", "/dev/nbd4", 2).unwrap();
        drop(reg);
        // A state file naming shard 1 (or, edited by hand, 99) read by a
        // runner restarted with one shard: the reattach goes ahead, those
        // connections least-loaded, and announcing them is accepted.
        let path = state_dir.join("saveconfig.json");
        let mut cfg: SaveConfig =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg.backstores[0].placement = vec![Some(1), Some(99), Some(0)];
        std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
        let mut reg = registry_with_shards(&state_dir, 1);
        let t = reg.map_begin(Handler::Mem, "d", &[]).unwrap();
        assert_eq!(t.reattach.as_deref(), Some("/dev/nbd4"));
        assert_eq!(t.placement, [None, None, Some(0)]);
        reg.map_peers("d", &[ConnPeer::Tcp(peer(7)), ConnPeer::Tcp(peer(8))])
            .unwrap();
    }

    #[test]
    fn delete_removes_only_storage_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.raw");
        let adopted = dir.path().join("adopted.raw");
        std::fs::write(&adopted, vec![7u8; 8192]).unwrap();
        let mut reg = registry(&dir.path().join("state"));
        let (o, a) = (ours.to_str().unwrap(), adopted.to_str().unwrap());
        create(&mut reg, Handler::File, o, 8192).unwrap();
        let mismatch = create(&mut reg, Handler::File, a, 4096).unwrap_err();
        assert!(mismatch.message.contains("8192"), "{mismatch}");
        create(&mut reg, Handler::File, a, 8192).unwrap();
        reg.delete(Handler::File, o).unwrap();
        reg.delete(Handler::File, a).unwrap();
        assert!(!ours.exists());
        assert_eq!(std::fs::read(&adopted).unwrap(), vec![7u8; 8192]);
    }

    #[test]
    fn unavailable_handlers_and_bad_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut reg = registry(dir.path());
        if !cfg!(feature = "gluster") {
            let e = create(&mut reg, Handler::Gluster, "vol/img", 1 << 20).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unsupported);
            assert!(e.message.contains("gluster"));
        }
        assert_eq!(
            create(&mut reg, Handler::Mem, "a/b", 1).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            create(&mut reg, Handler::Mem, "z", 0).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(reg.list(None, ListFilter::All).is_empty());
    }
}
