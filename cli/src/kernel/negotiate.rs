//! Client side of the NBD handshake, done in userspace before a socket is
//! handed to the kernel.
//!
//! Fixed newstyle, `NO_ZEROES` when the server offers it, then `NBD_OPT_GO`
//! for one export asking for `NBD_INFO_BLOCK_SIZE`. No structured replies
//! and no extended headers: the kernel client only understands simple
//! replies. A server that does not know `NBD_OPT_GO` gets the old
//! `NBD_OPT_EXPORT_NAME` instead.
//!
//! A read timeout guards the handshake and is cleared afterwards, because the
//! kernel's receive thread inherits the socket's `SO_RCVTIMEO` and would treat
//! an idle connection as dead.

use nbd_engine::protocol::consts as c;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`, `HAS_FLAGS` included).
    pub flags: u16,
    /// Block size constraints; the spec's defaults (1 / 4096 / 32 MiB) when
    /// the server sent no `NBD_INFO_BLOCK_SIZE`.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl Negotiated {
    pub fn read_only(&self) -> bool {
        self.flags & c::TF_READ_ONLY != 0
    }

    pub fn can_multi_conn(&self) -> bool {
        self.flags & c::TF_CAN_MULTI_CONN != 0
    }

    /// The block size to give the kernel: the server's preferred size
    /// (at least its minimum), clamped to what the kernel accepts (a power
    /// of two from 512 to 4096).
    pub fn kernel_block_size(&self) -> u32 {
        let want = self.preferred_block.max(self.min_block).clamp(512, 4096);
        1 << (31 - want.leading_zeros())
    }
}

/// Why a handshake failed. Every message names the export or the phase.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("{addr}: no address to connect to")]
    NoAddress { addr: String },
    #[error("timed out waiting for the server during {during}")]
    Timeout { during: &'static str },
    #[error("the server closed the connection during {during}")]
    Closed { during: &'static str },
    #[error("I/O error during {during}: {source}")]
    Io {
        during: &'static str,
        source: io::Error,
    },
    #[error("not an NBD server: bad {what} magic {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("the server does not speak fixed newstyle NBD (handshake flags {0:#x})")]
    NotFixedNewstyle(u16),
    #[error("no such export {name:?} on the server{}", detail(.message))]
    NoSuchExport { name: String, message: String },
    #[error("the server refused export {name:?}: {reason}{}", detail(.message))]
    Refused {
        name: String,
        /// The option reply type (`NBD_REP_ERR_*`).
        code: u32,
        reason: &'static str,
        message: String,
    },
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    #[error(
        "the server does not allow {wanted} connections to export {name:?} (no CAN_MULTI_CONN)"
    )]
    NoMultiConn { name: String, wanted: usize },
    #[error("connections to export {name:?} disagree on its size or flags ({a:?} vs {b:?})")]
    Inconsistent {
        name: String,
        a: Box<Negotiated>,
        b: Box<Negotiated>,
    },
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

/// Longest option reply body we accept (an INFO reply is at most a 4 KiB
/// string plus a few bytes; error strings are short).
const MAX_REPLY_LEN: usize = 64 * 1024;

/// Option reply types with this bit set are errors.
const REP_ERR: u32 = 1 << 31;

/// Default handshake timeout used by [`connect_export`] callers that have no
/// opinion.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` (HOST:PORT), handshakes for `export` and returns the
/// socket in transmission phase, ready for the kernel, blocking and without
/// timeouts. `timeout` bounds the TCP connect and each read/write of the
/// handshake.
pub fn connect_export(
    addr: &str,
    export: &str,
    timeout: Duration,
) -> Result<(TcpStream, Negotiated), NegotiateError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| NegotiateError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                let info = negotiate(&s, export, timeout)?;
                return Ok((s, info));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(source) => NegotiateError::Connect {
            addr: addr.to_owned(),
            source,
        },
        None => NegotiateError::NoAddress {
            addr: addr.to_owned(),
        },
    })
}

/// Opens `count` connections to the same export (for a multi-connection
/// device). Fails if the server does not advertise `CAN_MULTI_CONN` when
/// `count > 1` (the kernel would refuse), or if the connections disagree.
pub fn connect_export_many(
    addr: &str,
    export: &str,
    count: usize,
    timeout: Duration,
) -> Result<(Vec<TcpStream>, Negotiated), NegotiateError> {
    assert!(count > 0, "at least one connection");
    let (first, info) = connect_export(addr, export, timeout)?;
    if count > 1 && !info.can_multi_conn() {
        return Err(NegotiateError::NoMultiConn {
            name: export.to_owned(),
            wanted: count,
        });
    }
    let mut socks = vec![first];
    for _ in 1..count {
        let (s, other) = connect_export(addr, export, timeout)?;
        if other.size != info.size || other.flags != info.flags {
            return Err(NegotiateError::Inconsistent {
                name: export.to_owned(),
                a: Box::new(info),
                b: Box::new(other),
            });
        }
        socks.push(s);
    }
    Ok((socks, info))
}

/// Handshakes on an already connected socket. Sets `timeout` as the read and
/// write timeout for the handshake and clears both afterwards (also on
/// error), and turns on TCP_NODELAY.
pub fn negotiate(
    stream: &TcpStream,
    export: &str,
    timeout: Duration,
) -> Result<Negotiated, NegotiateError> {
    let setup = |during| move |source| NegotiateError::Io { during, source };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(setup("socket setup"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(setup("socket setup"))?;
    let _ = stream.set_nodelay(true);
    let mut s = stream;
    let result = handshake(&mut s, export);
    let clear = stream
        .set_read_timeout(None)
        .and_then(|_| stream.set_write_timeout(None));
    let info = result?;
    clear.map_err(setup("socket setup"))?;
    Ok(info)
}

/// The handshake itself, over any byte stream (unit tests use pipes).
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<Negotiated, NegotiateError> {
    if export.len() > c::MAX_STRING {
        return Err(NegotiateError::Protocol(format!(
            "export name is {} bytes, the protocol allows {}",
            export.len(),
            c::MAX_STRING
        )));
    }
    let mut greeting = [0u8; 18];
    read_exact(s, &mut greeting, "the greeting")?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().unwrap());
    if magic != c::NBDMAGIC {
        return Err(NegotiateError::BadMagic {
            what: "greeting",
            got: magic,
        });
    }
    let style = u64::from_be_bytes(greeting[8..16].try_into().unwrap());
    if style != c::IHAVEOPT {
        return Err(if style == 0x0000_4202_8186_1253 {
            NegotiateError::Protocol(
                "the server speaks oldstyle NBD, which cannot select an export".into(),
            )
        } else {
            NegotiateError::BadMagic {
                what: "newstyle",
                got: style,
            }
        });
    }
    let hflags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if hflags & c::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NegotiateError::NotFixedNewstyle(hflags));
    }
    let no_zeroes = hflags & c::FLAG_NO_ZEROES != 0;
    let mut cflags = c::CLIENT_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= c::CLIENT_NO_ZEROES;
    }
    write_all(s, &cflags.to_be_bytes(), "the client flags")?;

    // NBD_OPT_GO: name length, name, one info request (BLOCK_SIZE).
    let mut data = Vec::with_capacity(export.len() + 8);
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&c::INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, c::OPT_GO, &data)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut blocks: Option<(u32, u32, u32)> = None;
    loop {
        let (opt, kind, body) = read_option_reply(s)?;
        if opt != c::OPT_GO {
            return Err(NegotiateError::Protocol(format!(
                "reply to option {opt} while waiting for NBD_OPT_GO"
            )));
        }
        match kind {
            c::REP_ACK => break,
            c::REP_INFO => {
                if body.len() < 2 {
                    return Err(NegotiateError::Protocol("INFO reply too short".into()));
                }
                let info = u16::from_be_bytes([body[0], body[1]]);
                match info {
                    c::INFO_EXPORT => {
                        if body.len() != 12 {
                            return Err(NegotiateError::Protocol(format!(
                                "NBD_INFO_EXPORT of {} bytes, expected 12",
                                body.len()
                            )));
                        }
                        export_info = Some((
                            u64::from_be_bytes(body[2..10].try_into().unwrap()),
                            u16::from_be_bytes([body[10], body[11]]),
                        ));
                    }
                    c::INFO_BLOCK_SIZE => {
                        if body.len() != 14 {
                            return Err(NegotiateError::Protocol(format!(
                                "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                                body.len()
                            )));
                        }
                        let be = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().unwrap());
                        blocks = Some((be(2), be(6), be(10)));
                    }
                    _ => {} // NAME, DESCRIPTION, or newer: not needed
                }
            }
            c::REP_ERR_UNSUP => {
                // A server from before NBD_OPT_GO: fall back to EXPORT_NAME,
                // which ends option haggling (and closes on a bad name).
                return export_name_fallback(s, export, no_zeroes);
            }
            k if k & REP_ERR != 0 => return Err(refusal(export, k, &body)),
            k => {
                return Err(NegotiateError::Protocol(format!(
                    "unexpected reply type {k:#x} to NBD_OPT_GO"
                )))
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| {
        NegotiateError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
    })?;
    let (min_block, preferred_block, max_block) = blocks.unwrap_or((1, 4096, 32 << 20));
    if min_block == 0
        || !min_block.is_power_of_two()
        || preferred_block < min_block
        || max_block < min_block
    {
        return Err(NegotiateError::Protocol(format!(
            "nonsensical block sizes min {min_block} preferred {preferred_block} max {max_block}"
        )));
    }
    Ok(Negotiated {
        size,
        flags,
        min_block,
        preferred_block,
        max_block,
    })
}

fn export_name_fallback<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, NegotiateError> {
    send_option(s, c::OPT_EXPORT_NAME, export.as_bytes())?;
    let mut buf = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { buf.len() };
    match read_exact(s, &mut buf[..len], "NBD_OPT_EXPORT_NAME") {
        Err(NegotiateError::Closed { .. }) => {
            // The spec's only way to refuse EXPORT_NAME is to hang up.
            return Err(NegotiateError::NoSuchExport {
                name: export.to_owned(),
                message: "the server closed the connection on NBD_OPT_EXPORT_NAME".into(),
            });
        }
        r => r?,
    }
    Ok(Negotiated {
        size: u64::from_be_bytes(buf[0..8].try_into().unwrap()),
        flags: u16::from_be_bytes([buf[8], buf[9]]),
        min_block: 1,
        preferred_block: 4096,
        max_block: 32 << 20,
    })
}

fn refusal(export: &str, code: u32, body: &[u8]) -> NegotiateError {
    let message = String::from_utf8_lossy(body).trim().to_owned();
    let name = export.to_owned();
    let reason = match code {
        c::REP_ERR_UNKNOWN => return NegotiateError::NoSuchExport { name, message },
        c::REP_ERR_POLICY => "denied by server policy",
        c::REP_ERR_INVALID => "invalid request",
        c::REP_ERR_PLATFORM => "not supported on the server's platform",
        c::REP_ERR_TLS_REQD => "the server requires TLS, which kernel attach does not support",
        c::REP_ERR_SHUTDOWN => "the server is shutting down",
        c::REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
        c::REP_ERR_TOO_BIG => "request too big",
        _ => "unknown error",
    };
    NegotiateError::Refused {
        name,
        code,
        reason,
        message,
    }
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> Result<(), NegotiateError> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&c::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    write_all(s, &msg, "an option request")?;
    s.flush().map_err(|e| io_error(e, "an option request"))
}

fn read_option_reply<S: Read>(s: &mut S) -> Result<(u32, u32, Vec<u8>), NegotiateError> {
    let mut h = [0u8; 20];
    read_exact(s, &mut h, "an option reply")?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
    if magic != c::OPT_REPLY_MAGIC {
        return Err(NegotiateError::BadMagic {
            what: "option reply",
            got: magic,
        });
    }
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    if len > MAX_REPLY_LEN {
        return Err(NegotiateError::Protocol(format!(
            "option reply of {len} bytes (limit {MAX_REPLY_LEN})"
        )));
    }
    let mut body = vec![0u8; len];
    read_exact(s, &mut body, "an option reply")?;
    Ok((opt, kind, body))
}

fn io_error(e: io::Error, during: &'static str) -> NegotiateError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NegotiateError::Timeout { during },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => NegotiateError::Closed { during },
        _ => NegotiateError::Io { during, source: e },
    }
}

fn read_exact<S: Read>(
    s: &mut S,
    buf: &mut [u8],
    during: &'static str,
) -> Result<(), NegotiateError> {
    s.read_exact(buf).map_err(|e| io_error(e, during))
}

fn write_all<S: Write>(s: &mut S, buf: &[u8], during: &'static str) -> Result<(), NegotiateError> {
    s.write_all(buf).map_err(|e| io_error(e, during))
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
