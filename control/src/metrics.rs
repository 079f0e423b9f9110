//! The runner's metrics, encoded by prometheus-client at scrape time from
//! the counters the shards keep anyway (per-shard slots of
//! [`nbd_engine::stats`]), so metrics add no work to the IO path: per
//! export and operation requests, bytes, errors by NBD error and latency
//! histograms (buckets read off the HDR histograms); in-flight requests and
//! bytes; connections per shard; backstore states; control requests by
//! type and result; and the usual process metrics.

use crate::model::ListFilter;
use crate::registry::Registry;
use nbd_engine::export::ExportTable;
use nbd_engine::protocol::Errno;
use nbd_engine::stats::Op;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::collections::BTreeMap;
use std::fmt::Error;
use std::sync::{Arc, Mutex};

/// Control requests answered, by request type and result ("ok" or the
/// error code). Control requests are rare: one lock is plenty.
#[derive(Debug, Default)]
pub struct RequestCounters(Mutex<BTreeMap<(&'static str, &'static str), u64>>);

impl RequestCounters {
    pub fn count(&self, request: &'static str, result: &'static str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((request, result)).or_default() += 1;
    }

    fn snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Where a scrape reads from.
#[derive(Clone)]
pub struct Sources {
    pub table: Arc<ExportTable>,
    pub registry: Arc<Mutex<Registry>>,
    pub requests: Arc<RequestCounters>,
}

/// Latency bucket bounds: 1 µs doubling to about 17 s (25 buckets), enough
/// to tell a page-cache hit from a disk from a cluster, and cheap to read
/// off an HDR histogram.
fn bucket_bounds_ns() -> impl Iterator<Item = u64> {
    (0..25).map(|k| 1_000u64 << k)
}

/// The metrics as the Prometheus (OpenMetrics) text format.
pub fn render(sources: &Sources) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape(sources.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The Content-Type of [`render`]'s output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Content-Type of [`to_text_format`]'s output.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The same metrics in Prometheus' older text format (0.0.4), for scrapers
/// that do not ask for OpenMetrics (promtool, curl, older agents): the two
/// differ only in a counter family's name, which carries the `_total`
/// suffix in 0.0.4, and in the `# EOF` and `# UNIT` lines.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

struct Scrape(Sources);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

/// One family: its descriptor, then one sample per label set.
fn family<L, M>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    M: EncodeMetric,
{
    let mut f = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in samples {
        m.encode(f.encode_family(&labels)?)?;
    }
    Ok(())
}

struct Histogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut enc: MetricEncoder) -> Result<(), Error> {
        enc.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The encoder adds the buckets up itself: each one gets only its own
/// count, read off the HDR histogram as cumulative counts differenced.
fn histogram(h: &hdrhistogram::Histogram<u64>) -> Histogram {
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = bucket_bounds_ns()
        .map(|b| {
            let upto = h.count_between(0, b).max(below);
            let own = upto - below;
            below = upto;
            (b as f64 / 1e9, own)
        })
        .collect();
    buckets.push((f64::INFINITY, h.len().saturating_sub(below)));
    Histogram {
        sum: h.mean() * h.len() as f64 / 1e9,
        count: h.len(),
        buckets,
    }
}

type Labels = Vec<(&'static str, String)>;

/// A family of one sample without labels.
fn one<M>(m: M) -> std::iter::Once<(Labels, M)> {
    std::iter::once((Labels::new(), m))
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
        let exports = self.0.table.all();
        let mut requests = Vec::new();
        let mut bytes = Vec::new();
        let mut errors = Vec::new();
        let mut latency = Vec::new();
        let mut refused = Vec::new();
        let mut in_flight = Vec::new();
        let mut in_flight_bytes = Vec::new();
        let mut connections = Vec::new();
        for export in &exports {
            let snap = export.stats.snapshot();
            let name = export.name.to_string();
            for (op, s) in &snap.ops {
                if s.count() == 0 && !matches!(op, Op::Read | Op::Write) {
                    continue;
                }
                let labels: Labels = vec![("export", name.clone()), ("op", op.name().into())];
                requests.push((labels.clone(), ConstCounter::new(s.count())));
                bytes.push((labels.clone(), ConstCounter::new(s.bytes)));
                latency.push((labels.clone(), histogram(&s.latency_ns)));
                for e in Errno::ALL {
                    let n = s.errnos[e.index()];
                    if n > 0 {
                        let mut l = labels.clone();
                        l.push(("errno", e.to_string()));
                        errors.push((l, ConstCounter::new(n)));
                    }
                }
            }
            for e in Errno::ALL {
                let n = snap.refused[e.index()];
                if n > 0 {
                    let labels: Labels = vec![("export", name.clone()), ("errno", e.to_string())];
                    refused.push((labels, ConstCounter::new(n)));
                }
            }
            let labels: Labels = vec![("export", name.clone())];
            in_flight.push((labels.clone(), ConstGauge::new(snap.in_flight as i64)));
            in_flight_bytes.push((labels, ConstGauge::new(snap.in_flight_bytes as i64)));
            for (shard, n) in snap.connections_per_shard.iter().enumerate() {
                let labels: Labels = vec![("export", name.clone()), ("shard", shard.to_string())];
                connections.push((labels, ConstGauge::new(*n as i64)));
            }
        }
        use MetricType::{Counter, Gauge, Histogram as Hist};
        family(
            &mut enc,
            "nbd_requests",
            "NBD requests answered",
            Counter,
            requests,
        )?;
        family(
            &mut enc,
            "nbd_bytes",
            "Bytes read or written by requests that succeeded",
            Counter,
            bytes,
        )?;
        family(
            &mut enc,
            "nbd_request_errors",
            "Error replies, by NBD error",
            Counter,
            errors,
        )?;
        family(
            &mut enc,
            "nbd_requests_refused",
            "Requests refused before they started (out of range, malformed), by NBD error",
            Counter,
            refused,
        )?;
        family(
            &mut enc,
            "nbd_request_duration_seconds",
            "Time from a request's header to its reply",
            Hist,
            latency,
        )?;
        family(
            &mut enc,
            "nbd_in_flight_requests",
            "Requests read and not yet answered",
            Gauge,
            in_flight,
        )?;
        family(
            &mut enc,
            "nbd_in_flight_bytes",
            "Read and write bytes of the requests in flight",
            Gauge,
            in_flight_bytes,
        )?;
        family(
            &mut enc,
            "nbd_connections",
            "Live NBD connections, by shard",
            Gauge,
            connections,
        )?;

        let (lent, slow) = nbd_engine::server::colocate::counts();
        family(
            &mut enc,
            "nbd_colocated_sends",
            "Replies sent with the shard's CPU lent to a local client waiting on each reply (--colocate)",
            Counter,
            one(ConstCounter::new(lent)),
        )?;
        family(
            &mut enc,
            "nbd_colocation_backoffs",
            "Lent sends starved by other work on the shard's CPU; each pauses lending on that shard",
            Counter,
            one(ConstCounter::new(slow)),
        )?;

        let backstores = {
            let reg = self.0.registry.lock().unwrap_or_else(|e| e.into_inner());
            reg.list(None, ListFilter::All)
        };
        let states = backstores.iter().map(|b| {
            let labels: Labels = vec![
                ("backstore", b.key.clone()),
                ("handler", b.handler.name().into()),
                ("state", b.state.name().into()),
            ];
            (labels, ConstGauge::new(1i64))
        });
        family(
            &mut enc,
            "nbd_backstore_state",
            "Each backstore, labelled with its state (always 1)",
            Gauge,
            states,
        )?;
        let control = self
            .0
            .requests
            .snapshot()
            .into_iter()
            .map(|((req, result), n)| {
                let labels: Labels = vec![("request", req.into()), ("result", result.into())];
                (labels, ConstCounter::new(n))
            });
        family(
            &mut enc,
            "nbd_control_requests",
            "Control requests answered, by type and result",
            Counter,
            control,
        )?;
        process(&mut enc)
    }
}

/// process_* as Prometheus' client libraries name them, from /proc/self.
fn process(enc: &mut DescriptorEncoder) -> Result<(), Error> {
    use MetricType::{Counter, Gauge};
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let tick = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as u64;
    let cpu = (field(14) + field(15)) as f64 / tick;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let start = boot as f64 + field(22) as f64 / tick;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as i64;
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .map_or(-1, |v| v.min(i64::MAX as u64) as i64);
    family(
        enc,
        "process_cpu_seconds",
        "User and system CPU time",
        Counter,
        one(ConstCounter::new(cpu)),
    )?;
    let gauges: [(&str, &str, f64); 5] = [
        (
            "process_resident_memory_bytes",
            "Resident memory",
            (field(24) * page) as f64,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory",
            field(23) as f64,
        ),
        ("process_open_fds", "Open file descriptors", fds as f64),
        ("process_max_fds", "RLIMIT_NOFILE", max_fds as f64),
        (
            "process_start_time_seconds",
            "Start time since the epoch",
            start,
        ),
    ];
    for (name, help, v) in gauges {
        family(enc, name, help, Gauge, one(ConstGauge::new(v)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counters_with_their_suffix() {
        let om = "# HELP a_b Things\n# TYPE a_b counter\n# UNIT a_b x\na_b_total{k=\"v\"} 1\n\
                  # HELP g A gauge\n# TYPE g gauge\ng 2.0\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP a_b_total Things\n# TYPE a_b_total counter\na_b_total{k=\"v\"} 1\n\
             # HELP g A gauge\n# TYPE g gauge\ng 2.0\n"
        );
    }

    #[test]
    fn buckets_hold_their_own_counts() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 2).unwrap();
        h.record(3_000).unwrap(); // 3 us: the 4 us bucket
        h.record(3_500).unwrap();
        h.record(100_000_000_000).unwrap(); // 100 s: past the last bound
        let got = histogram(&h);
        assert_eq!(got.count, 3);
        assert_eq!(got.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        let four_us = got.buckets.iter().find(|b| b.0 == 4e-6).unwrap();
        assert_eq!(four_us.1, 2);
        assert_eq!(got.buckets.last().unwrap(), &(f64::INFINITY, 1));
    }
}
