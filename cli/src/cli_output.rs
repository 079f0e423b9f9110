//! What nbd-cli prints: aligned tables for people, JSON with `--json`.

use nbd_control::model::{BackstoreInfo, LinkInfo, ShardConnections, StatsReport};
use nbd_engine::protocol::consts::*;

pub use nbd_engine::config::size::human_size;

/// Names of the transmission flags that are set.
pub fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (TF_READ_ONLY, "read-only"),
        (TF_SEND_FLUSH, "flush"),
        (TF_SEND_FUA, "fua"),
        (TF_ROTATIONAL, "rotational"),
        (TF_SEND_TRIM, "trim"),
        (TF_SEND_WRITE_ZEROES, "write-zeroes"),
        (TF_SEND_DF, "df"),
        (TF_CAN_MULTI_CONN, "multi-conn"),
        (TF_SEND_CACHE, "cache"),
        (TF_SEND_FAST_ZERO, "fast-zero"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// `--json` form of a backstore: its fields, plus for ceph the parts of its
/// key: pool, namespace ("" for none), image, and snapshot (null for none),
/// also as `snap`, the name rbd-nbd's `list-mapped --format json` uses, so
/// an integration written for rbd-nbd finds it.
#[derive(serde::Serialize)]
pub struct JsonBackstore<'a> {
    #[serde(flatten)]
    pub info: &'a BackstoreInfo,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub ceph: Option<CephParts>,
}

#[derive(serde::Serialize)]
pub struct CephParts {
    pub pool: String,
    pub namespace: String,
    pub image: String,
    pub snapshot: Option<String>,
    pub snap: Option<String>,
}

impl<'a> JsonBackstore<'a> {
    pub fn of(info: &'a BackstoreInfo) -> Self {
        let ceph = (info.handler == nbd_control::model::Handler::Ceph)
            .then(|| nbd_engine::config::ceph_key::CephKey::parse(&info.key).ok())
            .flatten()
            .map(|k| CephParts {
                pool: k.pool,
                namespace: k.namespace.unwrap_or_default(),
                image: k.image,
                snap: k.snapshot.clone(),
                snapshot: k.snapshot,
            });
        JsonBackstore { info, ceph }
    }
}

pub fn list(items: &[BackstoreInfo]) -> String {
    if items.is_empty() {
        return "no backstores\n".into();
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|b| {
            vec![
                b.handler.to_string(),
                b.key.clone(),
                human_size(b.size),
                b.state.to_string(),
                b.device.clone().unwrap_or_else(|| "-".into()),
                reattached(b, now()),
            ]
        })
        .collect();
    table(
        &["HANDLER", "KEY", "SIZE", "STATE", "DEVICE", "REATTACHED"],
        &rows,
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How often the device was reattached after its connections died, and
/// how long ago the last time: `-`, or `2 (5m ago)`.
fn reattached(b: &BackstoreInfo, now: u64) -> String {
    match (b.reattaches, b.reattached_at) {
        (0, _) => "-".into(),
        (n, None) => n.to_string(),
        (n, Some(at)) => format!("{n} ({} ago)", ago(now.saturating_sub(at))),
    }
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn placement(c: &[ShardConnections]) -> String {
    let total: u64 = c.iter().map(|s| s.connections).sum();
    let per: Vec<String> = c
        .iter()
        .map(|s| format!("shard {}: {}", s.shard, s.connections))
        .collect();
    format!("{total} ({})", per.join(", "))
}

/// A map's placement as `map ... shards` takes it: `1,0,auto`, or `auto`.
fn shard_list(p: &[Option<u32>]) -> String {
    if p.is_empty() {
        return "auto".into();
    }
    let each: Vec<String> = p
        .iter()
        .map(|s| s.map_or("auto".into(), |s| s.to_string()))
        .collect();
    each.join(",")
}

/// One connection: `shard 1 (cpu 1, thread 4242) unix:uid=0,pid=77`.
fn link(l: &LinkInfo) -> String {
    let cpus = match l.cpus.as_str() {
        "" => "cpus unknown".to_owned(),
        c if c.contains([',', '-']) => format!("cpus {c}"),
        c => format!("cpu {c}"),
    };
    format!("shard {} ({cpus}, thread {}) {}", l.shard, l.thread, l.peer)
}

pub fn info(b: &BackstoreInfo) -> String {
    let mut out = String::new();
    let mut field = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    field("key", b.key.clone());
    field("handler", b.handler.to_string());
    field("size", format!("{} ({} bytes)", human_size(b.size), b.size));
    field("state", b.state.to_string());
    field("device", b.device.clone().unwrap_or_else(|| "-".into()));
    field("flags", flag_names(b.flags).join(" "));
    field("mode", b.mode.clone());
    field("connections", placement(&b.connections));
    field("shards", shard_list(&b.placement));
    for (i, l) in b.links.iter().enumerate() {
        field(&format!("link {i}"), link(l));
    }
    field("reattached", reattached(b, now()));
    if let Some(e) = &b.error {
        field("error", e.clone());
    }
    for (k, v) in &b.options {
        field(k, v.clone());
    }
    out
}

pub fn stats(s: &StatsReport) -> String {
    let mut out = format!(
        "{}: up {:.0} s, connections {}\n",
        s.key,
        s.uptime_secs,
        placement(&s.connections)
    );
    if s.ops.is_empty() {
        out.push_str("no IO yet\n");
        return out;
    }
    let rows: Vec<Vec<String>> = s
        .ops
        .iter()
        .map(|o| {
            vec![
                o.op.clone(),
                o.count.to_string(),
                o.errors.to_string(),
                format!("{:.1}", o.iops),
                human_size(o.bytes),
                format!("{:.1}", o.p50_us),
                format!("{:.1}", o.p90_us),
                format!("{:.1}", o.p99_us),
                format!("{:.1}", o.p999_us),
                format!("{:.1}", o.max_us),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "OP", "COUNT", "ERRORS", "IOPS", "BYTES", "P50us", "P90us", "P99us", "P99.9us", "MAXus",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_a_ceph_keys_parts() {
        let mut b: BackstoreInfo = serde_json::from_value(serde_json::json!({
            "key": "rbd/ns/img@s1", "handler": "ceph", "size": 1, "state": "mapped",
            "device": "/dev/nbd3", "read_only": true, "flags": 0, "mode": "", "error": null,
            "connections": [], "links": [], "placement": [], "options": {},
            "reattaches": 0, "reattached_at": null, "cookie": "c00k1e"
        }))
        .expect("a BackstoreInfo");
        let v = serde_json::to_value(JsonBackstore::of(&b)).unwrap();
        for (k, want) in [
            ("pool", "rbd"),
            ("namespace", "ns"),
            ("image", "img"),
            ("snapshot", "s1"),
            ("snap", "s1"),
            ("device", "/dev/nbd3"),
            ("cookie", "c00k1e"),
            ("state", "mapped"),
        ] {
            assert_eq!(v[k], want, "{k} in {v}");
        }
        b.key = "rbd/img".into();
        let v = serde_json::to_value(JsonBackstore::of(&b)).unwrap();
        assert_eq!(
            (v["namespace"].as_str(), v["snap"].is_null()),
            (Some(""), true)
        );
        b.handler = nbd_control::model::Handler::Mem;
        let v = serde_json::to_value(JsonBackstore::of(&b)).unwrap();
        assert!(v.get("pool").is_none(), "{v}");
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn flags_are_named() {
        assert_eq!(
            flag_names(TF_HAS_FLAGS | TF_SEND_FLUSH | TF_CAN_MULTI_CONN),
            ["flush", "multi-conn"]
        );
    }

    #[test]
    fn reattaches_read_naturally() {
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(600), "10m");
        assert_eq!(ago(3 * 3600), "3h");
        assert_eq!(ago(3 * 86400), "3d");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22\n");
    }
}
