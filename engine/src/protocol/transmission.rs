//! The transmission phase as a sans-IO state machine: what to do with each
//! request header, and what to answer when a command completes. The socket
//! driver (`engine/src/server/connection.rs`) only reads the bytes this asks
//! for, runs the commands it hands out, and sends the replies it builds.
//!
//! The driver's loop, per request:
//! 1. read [`Transmission::header_len`] bytes, [`Transmission::parse_header`];
//! 2. take [`Transmission::reserve`] bytes of in-flight budget;
//! 3. act on [`Transmission::handle_header`]: start a command, read its
//!    payload first, answer a refusal, or hang up;
//! 4. when a command finishes, send what [`Transmission::complete`] builds.

use super::errno::Errno;
use super::handshake::Negotiated;
use super::msgs::{BadMagic, HeaderMode, RequestHeader};
use super::reply::{encode_extents, Extent, ReplyHeader, ReplyStyle};
use super::request::{
    block_status_payload, validate, Command, Session, MAX_BLOCK_STATUS_PAYLOAD, MAX_PAYLOAD,
};

/// Why the server hangs up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// Not a request header: the stream is out of sync.
    BadMagic(u32),
    /// A payload we will neither buffer nor skip (after a refusal reply).
    Oversized(u64),
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::BadMagic(m) => write!(f, "bad request magic {m:#x}"),
            Close::Oversized(n) => write!(f, "oversized payload of {n} bytes"),
        }
    }
}

/// What to do with a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run this command now.
    Start(Command),
    /// Read `len` bytes of payload, then run `cmd`: a WRITE's data, or a
    /// BLOCK_STATUS payload for [`Transmission::handle_payload`].
    Payload { len: u32, cmd: Command },
    /// Send this reply (of `error`), then skip `skip` bytes of payload.
    Refuse {
        reply: ReplyHeader,
        error: Errno,
        skip: u64,
    },
    /// Send this reply (of `error`), then hang up.
    RefuseAndClose {
        reply: ReplyHeader,
        error: Errno,
        why: Close,
    },
    /// NBD_CMD_DISC: the client is done; finish what is in flight and close.
    Disconnect,
}

/// How a command ended, as the driver saw it.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// A READ produced `got` bytes.
    Read {
        got: usize,
    },
    /// BLOCK_STATUS extents from the request offset.
    Extents(&'a [Extent]),
    Done,
    Failed(Errno),
}

/// What goes back for a finished command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completed {
    pub reply: ReplyHeader,
    pub body: Body,
    /// The error an error reply carries (counted in the stats).
    pub error: Option<Errno>,
}

impl Completed {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// What follows the reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    None,
    /// The READ's data.
    Data,
    /// The block descriptors written into the caller's buffer.
    Descriptors,
}

/// Why a command failed where the backend did not say: a backend bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    ShortRead { wanted: u32, got: usize },
    NoExtents,
}

/// One connection's transmission phase.
#[derive(Clone, Debug)]
pub struct Transmission {
    session: Session,
    context_id: u32,
}

impl Transmission {
    pub fn new(n: &Negotiated) -> Self {
        let style = match (n.headers, n.structured_replies) {
            (HeaderMode::Extended, _) => ReplyStyle::Extended,
            (HeaderMode::Compact, true) => ReplyStyle::Structured,
            (HeaderMode::Compact, false) => ReplyStyle::Simple,
        };
        let session = Session {
            size: n.export.size,
            flags: n.export.flags,
            style,
            base_allocation: n.base_allocation.is_some(),
        };
        Self::with_session(session, n.base_allocation.unwrap_or(0))
    }

    /// A session given directly (tests, fuzz drivers, benches); the
    /// server builds it from the handshake with [`Transmission::new`].
    pub fn with_session(session: Session, context_id: u32) -> Self {
        Transmission {
            session,
            context_id,
        }
    }

    pub fn style(&self) -> ReplyStyle {
        self.session.style
    }

    /// Bytes in a request header for this session.
    pub fn header_len(&self) -> usize {
        self.session.style.headers().request_len()
    }

    /// Parses a header of [`header_len`](Self::header_len) bytes; a bad
    /// magic means the stream is lost: hang up.
    pub fn parse_header(&self, b: &[u8]) -> Result<RequestHeader, Close> {
        RequestHeader::parse(b, self.session.style.headers())
            .map_err(|BadMagic(m)| Close::BadMagic(m))
    }

    /// In-flight bytes the request will hold (its data, either way).
    pub fn reserve(&self, h: &RequestHeader) -> u64 {
        match h.kind {
            super::consts::CMD_READ | super::consts::CMD_WRITE => h.length.min(MAX_PAYLOAD as u64),
            _ => 0,
        }
    }

    /// Decides what a header asks for. `size` is the export's size now:
    /// after a resize connected clients reach the new range.
    pub fn handle_header(&self, h: &RequestHeader, size: u64) -> Next {
        let session = Session {
            size,
            ..self.session
        };
        let payload = h.payload_len(session.style.headers());
        let cmd = match validate(h, &session) {
            Ok(Command::Disconnect) => return Next::Disconnect,
            other => other,
        };
        let refuse = |errno| {
            let reply = self.error(h.cookie, h.offset, errno);
            if payload > MAX_PAYLOAD as u64 {
                // Never buffered, and skipping gigabytes only helps an attacker.
                Next::RefuseAndClose {
                    reply,
                    error: errno,
                    why: Close::Oversized(payload),
                }
            } else {
                Next::Refuse {
                    reply,
                    error: errno,
                    skip: payload,
                }
            }
        };
        match cmd {
            Err(errno) => refuse(errno),
            Ok(cmd @ Command::Write { len, .. }) => Next::Payload { len, cmd },
            Ok(cmd @ Command::BlockStatus { .. }) if payload > 0 => {
                if payload > MAX_BLOCK_STATUS_PAYLOAD {
                    // Consumed, then refused: no context list is that long.
                    return refuse(Errno::Inval);
                }
                Next::Payload {
                    len: payload as u32,
                    cmd,
                }
            }
            Ok(cmd) => Next::Start(cmd),
        }
    }

    /// A BLOCK_STATUS payload has arrived (see [`Next::Payload`]).
    pub fn handle_payload(
        &self,
        h: &RequestHeader,
        cmd: Command,
        payload: &[u8],
        size: u64,
    ) -> Next {
        let session = Session {
            size,
            ..self.session
        };
        match block_status_payload(cmd, payload, self.context_id, &session) {
            Ok(cmd) => Next::Start(cmd),
            Err(errno) => Next::Refuse {
                reply: self.error(h.cookie, h.offset, errno),
                error: errno,
                skip: 0,
            },
        }
    }

    /// The reply to a finished command. Block descriptors go into
    /// `descriptors`; an anomaly (a backend bug the client sees as EIO) is
    /// returned for the driver to log.
    pub fn complete(
        &self,
        h: &RequestHeader,
        cmd: &Command,
        outcome: Outcome<'_>,
        descriptors: &mut Vec<u8>,
    ) -> (Completed, Option<Anomaly>) {
        let style = self.session.style;
        let (cookie, offset) = (h.cookie, h.offset);
        let failed = |errno| Completed {
            reply: self.error(cookie, offset, errno),
            body: Body::None,
            error: Some(errno),
        };
        match (outcome, *cmd) {
            (Outcome::Read { got }, Command::Read { len, .. }) => {
                if got != len as usize {
                    let a = Anomaly::ShortRead { wanted: len, got };
                    return (failed(Errno::Io), Some(a));
                }
                let reply = ReplyHeader::read_data(style, cookie, offset, len);
                (
                    Completed {
                        reply,
                        body: if len > 0 { Body::Data } else { Body::None },
                        error: None,
                    },
                    None,
                )
            }
            (Outcome::Extents(extents), Command::BlockStatus { len, req_one, .. }) => {
                match encode_extents(extents, len, req_one, style.headers(), descriptors) {
                    0 => (failed(Errno::Io), Some(Anomaly::NoExtents)),
                    n => (
                        Completed {
                            reply: ReplyHeader::block_status(
                                style,
                                cookie,
                                offset,
                                self.context_id,
                                n,
                            ),
                            body: Body::Descriptors,
                            error: None,
                        },
                        None,
                    ),
                }
            }
            (Outcome::Done, _) => (
                Completed {
                    reply: ReplyHeader::done(style, cookie, offset),
                    body: Body::None,
                    error: None,
                },
                None,
            ),
            (Outcome::Failed(errno), _) => (failed(errno), None),
            // An outcome that does not fit the command is a driver bug;
            // the client still gets an answer.
            _ => (failed(Errno::Io), None),
        }
    }

    fn error(&self, cookie: u64, offset: u64, errno: Errno) -> ReplyHeader {
        ReplyHeader::error(self.session.style, cookie, offset, errno)
    }
}

#[cfg(test)]
#[path = "transmission_tests.rs"]
mod tests;
