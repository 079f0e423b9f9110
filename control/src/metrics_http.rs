//! `--metrics ADDR:PORT`: answers `GET /metrics` with [`metrics::render`].
//! A thread per connection, at most [`MAX_CONNECTIONS`] of them: a new
//! connection past that evicts the oldest, so connections that say nothing
//! cannot lock a scraper out; each has an absolute [`DEADLINE`] and a
//! request head of at most [`MAX_HEAD`] bytes. A scrape is one small GET;
//! an HTTP library would bring a runtime this does not need.

use crate::metrics::{self, Sources};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time a client has to send its request head and read the answer.
pub const DEADLINE: Duration = Duration::from_secs(3);
/// The longest request head read.
pub const MAX_HEAD: usize = 8192;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// The connections being served, oldest first, to shut down on eviction.
#[derive(Default)]
struct Live(Mutex<VecDeque<(u64, TcpStream)>>);

impl Live {
    /// Registers `s`; past the cap, the oldest is shut down (its thread
    /// then sees EOF or EPIPE and ends).
    fn admit(&self, id: u64, s: &TcpStream) -> std::io::Result<()> {
        let mut live = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while live.len() >= MAX_CONNECTIONS {
            if let Some((_, old)) = live.pop_front() {
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
        }
        live.push_back((id, s.try_clone()?));
        Ok(())
    }

    fn done(&self, id: u64) {
        let mut live = self.0.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(i, _)| *i != id);
    }
}

/// Serves on `listener` from threads of its own until the process ends.
pub fn spawn(listener: TcpListener, sources: Sources) -> std::io::Result<()> {
    let live = Arc::new(Live::default());
    std::thread::Builder::new()
        .name("nbd-metrics".into())
        .spawn(move || {
            for (id, stream) in (0u64..).zip(listener.incoming()) {
                let s = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("metrics accept: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if let Err(e) = live.admit(id, &s) {
                    tracing::debug!("metrics connection: {e}");
                    continue;
                }
                let (live, sources) = (live.clone(), sources.clone());
                let spawned = std::thread::Builder::new()
                    .name("nbd-metrics-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(s, &sources) {
                            tracing::debug!("metrics connection: {e}");
                        }
                        live.done(id);
                    });
                if let Err(e) = spawned {
                    tracing::warn!("metrics: cannot start a thread: {e}");
                }
            }
        })
        .map(drop)
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    /// `openmetrics`: the client's Accept header names OpenMetrics.
    Metrics {
        head_only: bool,
        openmetrics: bool,
    },
    NotFound,
    BadMethod,
    Bad,
    TooLarge,
}

/// Reads the request head (up to the blank line) within the deadline.
fn read_head(s: &mut TcpStream, deadline: Instant) -> std::io::Result<Result<Vec<u8>, Asked>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(Err(Asked::Bad));
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(Ok(head));
        }
        if head.len() > MAX_HEAD {
            return Ok(Err(Asked::TooLarge));
        }
    }
}

fn parse(head: &[u8]) -> Asked {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Asked::Bad;
    };
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return Asked::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Bad;
    }
    let path = target.split('?').next().unwrap_or("");
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Asked::BadMethod,
    };
    // Prometheus asks for OpenMetrics first; anyone else gets 0.0.4.
    let openmetrics = String::from_utf8_lossy(head).lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    if path == "/metrics" {
        Asked::Metrics {
            head_only,
            openmetrics,
        }
    } else {
        Asked::NotFound
    }
}

fn answer(mut s: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let asked = match read_head(&mut s, deadline)? {
        Ok(head) => parse(&head),
        Err(a) => a,
    };
    let (status, ctype, body, head_only) = match asked {
        Asked::Metrics {
            head_only,
            openmetrics,
        } => {
            let om = metrics::render(sources);
            if openmetrics {
                ("200 OK", metrics::OPENMETRICS, om, head_only)
            } else {
                let text = metrics::to_text_format(&om);
                ("200 OK", metrics::TEXT_FORMAT, text, head_only)
            }
        }
        Asked::NotFound => (
            "404 Not Found",
            "text/plain",
            "try /metrics\n".into(),
            false,
        ),
        Asked::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or HEAD\n".into(),
            false,
        ),
        Asked::TooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".into(),
            false,
        ),
        Asked::Bad => (
            "400 Bad Request",
            "text/plain",
            "bad request\n".into(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_write_timeout(Some(left.max(Duration::from_millis(1))))?;
    s.write_all(&out)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        let m = |s: &str| parse(s.as_bytes());
        assert_eq!(
            m("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics {
                head_only: false,
                openmetrics: false
            }
        );
        assert_eq!(
            m("HEAD /metrics?x=1 HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"),
            Asked::Metrics {
                head_only: true,
                openmetrics: true
            }
        );
        assert_eq!(m("GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(m("POST /metrics HTTP/1.1\r\n\r\n"), Asked::BadMethod);
        assert_eq!(m("GET /metrics\r\n\r\n"), Asked::Bad);
        assert_eq!(m("GET /metrics SPDY/3\r\n\r\n"), Asked::Bad);
        assert_eq!(m("\u{0}\u{1}\r\n\r\n"), Asked::Bad);
    }
}
