//! `--metrics`: a real Prometheus (Debian's package) scrapes the runner,
//! and a PromQL query over its HTTP API returns the read count a client
//! really issued; `promtool check metrics` accepts what the endpoint
//! serves; and the endpoint holds against connections that say nothing,
//! oversized heads and wrong methods.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn metrics_addr(r: &Runner) -> String {
    r.metrics
        .clone()
        .expect("the ready line says where metrics are")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A sample's value in the text format, e.g. `nbd_requests_total{export="m",op="read"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

struct Prometheus {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = scratch();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: nbd-runner\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's prometheus package; .ci/run installs it)");
        Prometheus {
            child,
            _dir: dir,
            addr,
        }
    }

    /// The value of an instant PromQL query with one result, once it has one.
    fn query(&self, promql: &str) -> Option<String> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        // Until Prometheus listens there is no answer yet (`get` would panic).
        TcpStream::connect(&self.addr).ok()?;
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?query={q}"), None);
        if !status.contains("200") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str().map(str::to_owned)
    }
}

#[test]
fn prometheus_scrapes_the_reads_a_client_issued() {
    let dir = scratch();
    let log = dir.path().join("runner.log");
    let r = Runner::start_logged(
        &[
            "--threads",
            "2",
            "--export",
            "mem:m,size=8M",
            "--metrics",
            "127.0.0.1:0",
        ],
        &log,
    );
    let at = metrics_addr(&r);
    // 37 reads, 5 writes and 2 reads past the end (refused with EINVAL),
    // from a raw client that sends nothing else.
    let mut s = negotiate(&r.addr, "m");
    for i in 0..37 {
        read_at(&mut s, i * 4096, 4096).expect("read");
    }
    for i in 0..5 {
        assert_eq!(write_at(&mut s, i * 4096, &[7u8; 4096]), 0);
    }
    for _ in 0..2 {
        assert!(read_at(&mut s, 8 << 20, 4096).is_err());
    }

    let (status, text) = http_get(&at, "/metrics", None);
    assert!(status.contains("200"), "{status}");
    let read = r#"nbd_requests_total{export="m",op="read"}"#;
    assert_eq!(sample(&text, read), Some(37.0), "{text}");
    assert_eq!(
        sample(&text, r#"nbd_requests_total{export="m",op="write"}"#),
        Some(5.0)
    );
    assert_eq!(
        sample(&text, r#"nbd_bytes_total{export="m",op="read"}"#),
        Some(37.0 * 4096.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"nbd_requests_refused_total{export="m",errno="EINVAL"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"nbd_connections{export="m",shard="0"}"#).unwrap_or(0.0)
            + sample(&text, r#"nbd_connections{export="m",shard="1"}"#).unwrap_or(0.0),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"nbd_request_duration_seconds_count{export="m",op="read"}"#
        ),
        Some(37.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"nbd_request_duration_seconds_bucket{le="+Inf",export="m",op="read"}"#
        ),
        Some(37.0)
    );
    assert!(sample(&text, "process_open_fds").unwrap_or(0.0) > 0.0);

    // promtool, Prometheus' own linter, on exactly what was served.
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // What Prometheus itself asks for: OpenMetrics.
    let (_, om) = http_get(
        &at,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0"),
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");

    // The real scraper, and PromQL over its HTTP API.
    let prom = Prometheus::start(&at);
    let deadline = Instant::now() + Duration::from_secs(90);
    let promql = r#"nbd_requests_total{job="nbd-runner",export="m",op="read"}"#;
    let got = loop {
        if let Some(v) = prom.query(promql) {
            break v;
        }
        assert!(Instant::now() < deadline, "Prometheus never had {promql}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(got, "37", "PromQL {promql}");
    // More reads show up in the next scrapes.
    for i in 0..3 {
        read_at(&mut s, i * 4096, 4096).expect("read");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.query(promql).as_deref() != Some("40") {
        assert!(Instant::now() < deadline, "Prometheus never saw 40 reads");
        std::thread::sleep(Duration::from_millis(250));
    }
    let up = prom.query(r#"up{job="nbd-runner"}"#);
    assert_eq!(up.as_deref(), Some("1"));
}

#[test]
fn the_endpoint_holds_against_hostile_clients() {
    let dir = scratch();
    let log = dir.path().join("runner.log");
    let mut r = Runner::start_logged(
        &[
            "--threads",
            "1",
            "--export",
            "mem:m,size=1M",
            "--metrics",
            "127.0.0.1:0",
        ],
        &log,
    );
    let at = metrics_addr(&r);
    let baseline = r.fd_count();
    // 100 connections that never send a byte: a scrape still gets through
    // at once (the oldest silent ones are evicted), and none outlives
    // the endpoint's deadline.
    let silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&at).expect("connect"))
        .collect();
    let t = Instant::now();
    let (status, body) = http_get(&at, "/metrics", None);
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("nbd_requests_total"));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a scrape behind 100 silent connections took {:?}",
        t.elapsed()
    );
    // A head past 8 KiB: refused, not buffered.
    let mut s = TcpStream::connect(&at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(20_000));
    let _ = s.write_all(big.as_bytes());
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    assert!(http_get(&at, "/", None).0.contains("404"));
    let mut s = TcpStream::connect(&at).unwrap();
    s.write_all(b"DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer:.80}");
    let mut s = TcpStream::connect(&at).unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.80}");
    // The silent ones are gone once their deadline has passed: no fd leak.
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.fd_count() > baseline + 2 {
        assert!(
            Instant::now() < deadline,
            "fds {} vs {baseline} before the silent connections",
            r.fd_count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_healthy(&r.addr, "m");
    r.assert_alive();
}

#[test]
fn metrics_are_off_by_default_and_a_bad_address_is_one_line() {
    let r = Runner::start(&["mem:m,size=1M"]);
    let threads = r.threads();
    assert!(
        !threads.iter().any(|t| t.name.starts_with("nbd-metrics")),
        "a metrics thread without --metrics"
    );
    let err = runner_refuses(&["--metrics", "nowhere:99999"]);
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.contains("--metrics") && first.contains("bad port"),
        "{err}"
    );
    // An address this host does not have: one line naming the flag.
    let err = runner_refuses(&["--metrics", "192.0.2.1:9"]);
    assert!(
        err.contains("--metrics 192.0.2.1:9: cannot listen"),
        "{err}"
    );
}
