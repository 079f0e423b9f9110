//! Exports: named backstores served on the IO route. What opens them is
//! the control crate's factory (`nbd_control::factory`).

use crate::backend::{Backend, BackendError};
use crate::protocol::{ExportCatalog, ExportInfo};
use crate::stats::ExportStats;
use std::collections::BTreeMap;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    #[test]
    fn default_export_only_when_unique() {
        let t = ExportTable::new(1);
        t.add(
            "a",
            Arc::new(
                MemBackend::new(1 << 20, false, &crate::backend::MemBudget::unlimited()).unwrap(),
            ),
        )
        .unwrap();
        assert_eq!(t.get("").unwrap().name, "a");
        t.add(
            "b",
            Arc::new(
                MemBackend::new(1 << 20, false, &crate::backend::MemBudget::unlimited()).unwrap(),
            ),
        )
        .unwrap();
        assert!(t.get("").is_none());
        assert!(matches!(
            t.add(
                "a",
                Arc::new(
                    MemBackend::new(1, false, &crate::backend::MemBudget::unlimited()).unwrap()
                )
            ),
            Err(ExportError::Duplicate(_))
        ));
        assert_eq!(t.list().len(), 2);
    }
}
