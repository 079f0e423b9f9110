//! Exports: named backstores served on the IO route, and the `--export`
//! spec `HANDLER:KEY[,size=SIZE][,readonly]`.

use crate::backend::{Backend, BackendError, FileBackend, MemBackend};
use crate::protocol::{ExportCatalog, ExportInfo};
use crate::size::parse_size;
use crate::stats::ExportStats;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use thiserror::Error;

pub struct Export {
    /// The backstore key: the export name clients ask for.
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub stats: ExportStats,
    /// When it started being served, for average rates.
    pub opened: Instant,
}

impl Export {
    pub fn info(&self) -> ExportInfo {
        let caps = self.backend.capabilities();
        ExportInfo {
            name: self.name.clone(),
            description: format!("{} backstore", self.backend.handler()),
            size: self.backend.size(),
            flags: caps.transmission_flags(),
            min_block: caps.block.min,
            preferred_block: caps.block.preferred,
            max_block: caps.block.max,
        }
    }
}

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("bad export spec {spec:?}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("export {0:?} already exists")]
    Duplicate(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Every export the runner serves; shared by all shards.
pub struct ExportTable {
    shards: usize,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
}

impl ExportTable {
    pub fn new(shards: usize) -> Self {
        ExportTable {
            shards,
            exports: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn add(&self, name: &str, backend: Arc<dyn Backend>) -> Result<Arc<Export>, ExportError> {
        let mut map = self.exports.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(name) {
            return Err(ExportError::Duplicate(name.to_owned()));
        }
        let export = Arc::new(Export {
            name: name.to_owned(),
            backend,
            stats: ExportStats::new(self.shards),
            opened: Instant::now(),
        });
        map.insert(name.to_owned(), export.clone());
        Ok(export)
    }

    /// Serves an export again that [`remove`](Self::remove) took out.
    pub fn restore(&self, export: Arc<Export>) {
        let mut map = self.exports.write().unwrap_or_else(|e| e.into_inner());
        map.entry(export.name.clone()).or_insert(export);
    }

    /// True while `export` is the one served under its name.
    pub fn serves(&self, export: &Arc<Export>) -> bool {
        let map = self.exports.read().unwrap_or_else(|e| e.into_inner());
        map.get(&export.name)
            .is_some_and(|x| Arc::ptr_eq(x, export))
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// By name; "" is the default export when exactly one is served.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.exports.read().unwrap_or_else(|e| e.into_inner());
        if name.is_empty() && map.len() == 1 {
            return map.values().next().cloned();
        }
        map.get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl ExportCatalog for ExportTable {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.get(name).map(|e| e.info())
    }

    fn list(&self) -> Vec<(String, String)> {
        self.all()
            .iter()
            .map(|e| (e.name.clone(), e.info().description))
            .collect()
    }
}

/// A parsed `--export HANDLER:KEY[,size=SIZE][,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub handler: String,
    pub key: String,
    pub size: Option<u64>,
    pub read_only: bool,
}

impl std::str::FromStr for ExportSpec {
    type Err = ExportError;

    fn from_str(spec: &str) -> Result<Self, ExportError> {
        let bad = |reason: &str| ExportError::Spec {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (handler, rest) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected HANDLER:KEY, e.g. mem:disk0,size=1G"))?;
        let mut parts = rest.split(',');
        let key = parts.next().unwrap_or_default();
        if key.is_empty() {
            return Err(bad("missing key"));
        }
        let mut out = ExportSpec {
            handler: handler.to_owned(),
            key: key.to_owned(),
            size: None,
            read_only: false,
        };
        for p in parts {
            match p.split_once('=') {
                Some(("size", v)) => {
                    out.size = Some(parse_size(v).map_err(|e| bad(&e.to_string()))?)
                }
                None if p == "readonly" => out.read_only = true,
                _ => return Err(bad(&format!("unknown option {p:?} (size=SIZE, readonly)"))),
            }
        }
        match out.handler.as_str() {
            "mem" if out.size.is_none() => Err(bad("mem exports need size=SIZE")),
            "mem" if out.key.contains('/') => Err(bad("mem export names cannot contain '/'")),
            "file" if !out.key.starts_with('/') => {
                Err(bad("file exports are keyed by absolute path"))
            }
            "mem" | "file" => Ok(out),
            "gluster" | "ceph" => Err(bad("this build has no gluster/ceph handler")),
            _ => Err(bad("unknown handler (mem, file)")),
        }
    }
}

impl ExportSpec {
    /// Builds the backend this spec names.
    pub fn open(&self) -> Result<Arc<dyn Backend>, ExportError> {
        Ok(match self.handler.as_str() {
            "mem" => Arc::new(MemBackend::new(self.size.unwrap_or(0), self.read_only)?),
            "file" => Arc::new(FileBackend::open_or_create(
                Path::new(&self.key),
                self.size,
                self.read_only,
            )?),
            other => {
                return Err(ExportError::Spec {
                    spec: other.to_owned(),
                    reason: "unknown handler".into(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s: ExportSpec = "mem:disk0,size=1G".parse().unwrap();
        assert_eq!(
            s,
            ExportSpec {
                handler: "mem".into(),
                key: "disk0".into(),
                size: Some(1 << 30),
                read_only: false
            }
        );
        let s: ExportSpec = "file:/var/lib/a.raw,size=10G,readonly".parse().unwrap();
        assert!(s.read_only);
        assert_eq!(s.size, Some(10 << 30));
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            "disk0",
            "mem:",
            "mem:disk0",
            "mem:disk0,size=abc",
            "mem:disk0,size=1G,bogus",
            "file:relative.img,size=1G",
            "nfs:x,size=1G",
        ] {
            assert!(bad.parse::<ExportSpec>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn default_export_only_when_unique() {
        let t = ExportTable::new(1);
        t.add("a", Arc::new(MemBackend::new(1 << 20, false).unwrap()))
            .unwrap();
        assert_eq!(t.get("").unwrap().name, "a");
        t.add("b", Arc::new(MemBackend::new(1 << 20, false).unwrap()))
            .unwrap();
        assert!(t.get("").is_none());
        assert!(matches!(
            t.add("a", Arc::new(MemBackend::new(1, false).unwrap())),
            Err(ExportError::Duplicate(_))
        ));
        assert_eq!(t.list().len(), 2);
    }
}
