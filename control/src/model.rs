//! The vocabulary shared by the runner, the CLI and the state file:
//! handlers, backstore states, and what `list`/`info`/`stats` show.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handler {
    Gluster,
    Ceph,
    File,
    Mem,
}

impl Handler {
    pub const ALL: [Handler; 4] = [Handler::Gluster, Handler::Ceph, Handler::File, Handler::Mem];

    pub fn name(self) -> &'static str {
        match self {
            Handler::Gluster => "gluster",
            Handler::Ceph => "ceph",
            Handler::File => "file",
            Handler::Mem => "mem",
        }
    }

    /// What a key looks like, for error messages and help.
    pub fn key_form(self) -> &'static str {
        match self {
            Handler::Gluster => "VOLUME/FILEPATH",
            Handler::Ceph => "POOL/IMAGE",
            Handler::File => "/ABSOLUTE/PATH",
            Handler::Mem => "NAME",
        }
    }

    /// Checks a key's shape; the reason is one line.
    pub fn check_key(self, key: &str) -> Result<(), String> {
        let bad = |why: &str| Err(format!("bad {} key {key:?}: {why}", self.name()));
        if key.is_empty() || key.len() > 4096 || key.contains('\0') {
            return bad("empty, too long, or contains NUL");
        }
        match self {
            Handler::File if !key.starts_with('/') => bad("expected an absolute path"),
            Handler::File | Handler::Gluster if key.split('/').any(|c| c == "." || c == "..") => {
                bad("'.' and '..' components are not allowed")
            }
            Handler::Mem if key.contains('/') => bad("mem names cannot contain '/'"),
            Handler::Gluster | Handler::Ceph => {
                let parts: Vec<&str> = key.split('/').collect();
                if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
                    bad(&format!("expected {}", self.key_form()))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Handler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Handler::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| format!("unknown handler {s:?} (gluster, ceph, file, mem)"))
    }
}

/// A backstore's life: created → mapping → mapped (live) → unmapping →
/// created, and dead when the runner restarted or the IO connections
/// dropped while the kernel still holds the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Created,
    Mapping,
    Mapped,
    Unmapping,
    Dead,
    /// Served from the runner's `--export` flags: listed, never mapped,
    /// deleted or saved by the control plane.
    Static,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Created => "created",
            State::Mapping => "mapping",
            State::Mapped => "live",
            State::Unmapping => "unmapping",
            State::Dead => "dead",
            State::Static => "static",
        }
    }

    /// The kernel holds (or may hold) a device for this backstore.
    pub fn has_device(self) -> bool {
        matches!(self, State::Mapped | State::Unmapping | State::Dead)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a backstore; [`next`] says what state it leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `map` starts; `stale` when an earlier map never finished (the CLI died).
    MapBegin {
        stale: bool,
    },
    /// The kernel took the device.
    MapDone,
    /// The map failed after it began.
    MapAbort,
    UnmapBegin,
    UnmapDone,
    /// Every IO connection dropped while the kernel holds the device.
    IoLost,
    /// The runner started again.
    Restart,
    Delete,
    Resize,
}

/// Why an event is refused in a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    AlreadyMapped,
    /// Mapping or unmapping right now: try again shortly.
    Busy,
    NotMapping,
    NotUnmapping,
    NotMapped,
    /// Delete while the kernel may hold a device.
    StillMapped,
    /// `--export` exports are the operator's, not the control plane's.
    Static,
}

/// The backstore state machine, whole: the state `event` leads to from
/// `state` (`device`: a device is recorded), or why it is refused. Events
/// that change nothing (a delete, an abort after the fact) give back
/// `state` unchanged.
pub fn next(state: State, device: bool, event: Event) -> Result<State, Refused> {
    use State::*;
    if state == Static {
        return Err(Refused::Static);
    }
    match (event, state) {
        (Event::MapBegin { .. }, Created | Dead) => Ok(Mapping),
        (Event::MapBegin { stale: true }, Mapping) => Ok(Mapping),
        (Event::MapBegin { .. }, Mapped) => Err(Refused::AlreadyMapped),
        (Event::MapBegin { .. }, _) => Err(Refused::Busy),
        (Event::MapDone, Mapping) => Ok(Mapped),
        (Event::MapDone, _) => Err(Refused::NotMapping),
        (Event::MapAbort, Mapping) => Ok(if device { Dead } else { Created }),
        (Event::MapAbort, s) => Ok(s),
        (Event::UnmapBegin, s) if s.has_device() => Ok(Unmapping),
        (Event::UnmapBegin, _) => Err(Refused::NotMapped),
        (Event::UnmapDone, Unmapping) => Ok(Created),
        (Event::UnmapDone, _) => Err(Refused::NotUnmapping),
        (Event::IoLost, Mapped) => Ok(Dead),
        (Event::IoLost, s) => Ok(s),
        (Event::Restart, Created) => Ok(Created),
        (Event::Restart, _) => Ok(if device { Dead } else { Created }),
        (Event::Delete, Created) => Ok(Created),
        (Event::Delete, _) => Err(Refused::StillMapped),
        (Event::Resize, Mapping | Unmapping) => Err(Refused::Busy),
        (Event::Resize, s) => Ok(s),
    }
}

/// `list [map|unmap|create|dead|live|all]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListFilter {
    /// Mapped to a device, live or dead.
    Map,
    /// Not mapped.
    Unmap,
    /// In the created state.
    Create,
    Dead,
    Live,
    #[default]
    All,
}

impl ListFilter {
    pub fn matches(self, s: State) -> bool {
        match self {
            ListFilter::Map => s.has_device(),
            ListFilter::Unmap => !s.has_device(),
            ListFilter::Create => s == State::Created,
            ListFilter::Dead => s == State::Dead,
            ListFilter::Live => s == State::Mapped,
            ListFilter::All => true,
        }
    }
}

impl FromStr for ListFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "map" => ListFilter::Map,
            "unmap" => ListFilter::Unmap,
            "create" => ListFilter::Create,
            "dead" => ListFilter::Dead,
            "live" => ListFilter::Live,
            "all" => ListFilter::All,
            _ => {
                return Err(format!(
                    "unknown list filter {s:?} (map, unmap, create, dead, live, all)"
                ))
            }
        })
    }
}

/// Live connections of a backstore on one shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConnections {
    pub shard: u32,
    pub connections: u64,
}

/// One live IO connection of a backstore: the shard that serves it and
/// where that shard runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkInfo {
    pub shard: u32,
    /// Its address, or its unix credentials.
    pub peer: String,
    /// The shard's thread (0: not started) and the CPUs it may run on.
    pub thread: i32,
    pub cpus: String,
}

/// What `list` and `info` show about one backstore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackstoreInfo {
    pub key: String,
    pub handler: Handler,
    pub size: u64,
    pub state: State,
    pub device: Option<String>,
    pub read_only: bool,
    /// NBD transmission flags, as clients see them.
    pub flags: u16,
    /// How IO is done ("buffered io_uring, FLUSH/FUA = fdatasync", ...).
    pub mode: String,
    /// Set when the runner could not open the backstore.
    pub error: Option<String>,
    pub connections: Vec<ShardConnections>,
    /// Each live IO connection, oldest first.
    pub links: Vec<LinkInfo>,
    /// The shard each of the device's connections was asked to be on
    /// (`map ... shards`), in connection order; None is the least-loaded
    /// one. Empty: all least-loaded.
    pub placement: Vec<Option<u32>>,
    pub options: BTreeMap<String, String>,
    /// Reattaches of the kernel device after its connections died, and
    /// the last one's time (seconds since the epoch).
    pub reattaches: u64,
    pub reattached_at: Option<u64>,
    /// The kernel BACKEND_IDENTIFIER a device of this backstore carries
    /// (public: `/sys/block/nbdX/backend` shows it); empty for `--export`.
    pub cookie: String,
}

/// One operation's numbers in `stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpReport {
    pub op: String,
    pub count: u64,
    pub errors: u64,
    pub bytes: u64,
    /// Average since the export was opened.
    pub iops: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    pub key: String,
    pub uptime_secs: f64,
    pub ops: Vec<OpReport>,
    pub connections: Vec<ShardConnections>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state × event × device, against the table written out.
    #[test]
    fn transition_table() {
        use Refused::*;
        use State::*;
        let states = [Created, Mapping, Mapped, Unmapping, Dead];
        let events = [
            Event::MapBegin { stale: false },
            Event::MapBegin { stale: true },
            Event::MapDone,
            Event::MapAbort,
            Event::UnmapBegin,
            Event::UnmapDone,
            Event::IoLost,
            Event::Restart,
            Event::Delete,
            Event::Resize,
        ];
        #[rustfmt::skip]
        let want = |s: State, dev: bool, e: Event| -> Result<State, Refused> {
            match e {
                Event::MapBegin { stale } => match s {
                    Created | Dead => Ok(Mapping),
                    Mapping if stale => Ok(Mapping),
                    Mapped => Err(AlreadyMapped),
                    _ => Err(Busy),
                },
                Event::MapDone => if s == Mapping { Ok(Mapped) } else { Err(NotMapping) },
                Event::MapAbort => Ok(match (s, dev) { (Mapping, true) => Dead, (Mapping, false) => Created, _ => s }),
                Event::UnmapBegin => if matches!(s, Mapped | Unmapping | Dead) { Ok(Unmapping) } else { Err(NotMapped) },
                Event::UnmapDone => if s == Unmapping { Ok(Created) } else { Err(NotUnmapping) },
                Event::IoLost => Ok(if s == Mapped { Dead } else { s }),
                Event::Restart => Ok(if s != Created && dev { Dead } else { Created }),
                Event::Delete => if s == Created { Ok(Created) } else { Err(StillMapped) },
                Event::Resize => if matches!(s, Mapping | Unmapping) { Err(Busy) } else { Ok(s) },
            }
        };
        for s in states {
            for dev in [false, true] {
                for e in events {
                    assert_eq!(next(s, dev, e), want(s, dev, e), "{s:?} device={dev} {e:?}");
                }
            }
        }
        for e in events {
            assert_eq!(next(State::Static, false, e), Err(Refused::Static));
        }
    }

    /// The operator's paths through the machine, end to end.
    #[test]
    fn life_cycles() {
        let run = |from: State, dev: bool, events: &[Event]| {
            events.iter().try_fold(from, |s, &e| next(s, dev, e))
        };
        use Event::*;
        let map = [MapBegin { stale: false }, MapDone];
        assert_eq!(run(State::Created, true, &map), Ok(State::Mapped));
        assert_eq!(
            run(
                State::Created,
                true,
                &[MapBegin { stale: false }, MapDone, UnmapBegin, UnmapDone]
            ),
            Ok(State::Created)
        );
        // A restart (or lost connections) leaves the device dead; map reattaches it.
        assert_eq!(run(State::Mapped, true, &[Restart]), Ok(State::Dead));
        assert_eq!(run(State::Mapped, true, &[IoLost]), Ok(State::Dead));
        assert_eq!(run(State::Dead, true, &map), Ok(State::Mapped));
        // A map that died half-way is retried once it is stale.
        assert_eq!(
            run(
                State::Created,
                false,
                &[MapBegin { stale: false }, MapBegin { stale: false }]
            ),
            Err(Refused::Busy)
        );
        assert_eq!(
            run(
                State::Created,
                false,
                &[MapBegin { stale: false }, MapBegin { stale: true }, MapDone]
            ),
            Ok(State::Mapped)
        );
        // Nothing mapped may be deleted.
        assert_eq!(
            run(State::Mapped, true, &[Delete]),
            Err(Refused::StillMapped)
        );
    }

    #[test]
    fn handler_names_round_trip() {
        for h in Handler::ALL {
            assert_eq!(h.name().parse::<Handler>().unwrap(), h);
        }
        assert!("nfs".parse::<Handler>().is_err());
    }

    #[test]
    fn keys_are_checked_per_handler() {
        assert!(Handler::File.check_key("/var/lib/a.raw").is_ok());
        assert!(Handler::File.check_key("a.raw").is_err());
        assert!(Handler::File.check_key("/var/../etc/shadow").is_err());
        assert!(Handler::Mem.check_key("disk0").is_ok());
        assert!(Handler::Mem.check_key("a/b").is_err());
        assert!(Handler::Gluster.check_key("vol/dir/file.img").is_ok());
        assert!(Handler::Gluster.check_key("vol").is_err());
        assert!(Handler::Gluster.check_key("vol/../other/x").is_err());
        assert!(Handler::Gluster.check_key("vol/./x").is_err());
        assert!(Handler::File.check_key("/var/lib/./a").is_err());
        assert!(Handler::Ceph.check_key("rbd/img").is_ok());
        assert!(Handler::Ceph.check_key("rbd//img").is_err());
        assert!(Handler::Mem.check_key("").is_err());
    }

    #[test]
    fn list_filters_follow_the_seed() {
        use State::*;
        let all = [Created, Mapping, Mapped, Unmapping, Dead, Static];
        let pick = |f: &str| -> Vec<State> {
            let f: ListFilter = f.parse().unwrap();
            all.into_iter().filter(|s| f.matches(*s)).collect()
        };
        assert_eq!(pick("map"), vec![Mapped, Unmapping, Dead]);
        assert_eq!(pick("unmap"), vec![Created, Mapping, Static]);
        assert_eq!(pick("create"), vec![Created]);
        assert_eq!(pick("dead"), vec![Dead]);
        assert_eq!(pick("live"), vec![Mapped]);
        assert_eq!(pick("all").len(), 6);
        assert!("mapped".parse::<ListFilter>().is_err());
    }
}
