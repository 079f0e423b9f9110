//! The control route's wire format.
//!
//! A connection opens with a fixed-layout hello in each direction, kept out
//! of postcard on purpose: its layout never changes, so any two versions can
//! read each other's version number and refuse each other clearly. After
//! that, every message is a frame: a big-endian u32 length, then a postcard
//! payload (a [`Request`] or a [`Response`]).

use crate::model::{BackstoreInfo, Handler, ListFilter, StatsReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use thiserror::Error;

pub const MAGIC: [u8; 4] = *b"NBDR";
/// Bumped on any change to [`Request`] or [`Response`].
pub const PROTOCOL_VERSION: u16 = 7;
/// Largest frame either side accepts; real messages are a few KiB.
pub const MAX_FRAME: u32 = 1 << 20;
const MAX_TOKEN: usize = 4096;
const MAX_HELLO_MESSAGE: usize = 4096;

#[derive(Debug, Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("not an nbd-runner control peer (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooBig(u32),
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("hello field too long ({0} bytes)")]
    HelloTooLong(usize),
    #[error("peer closed the connection")]
    Closed,
}

/// The client's opening message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// Shared secret, required when the runner listens beyond loopback.
    pub token: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HelloStatus {
    Welcome = 0,
    VersionMismatch = 1,
    Unauthorized = 2,
    Busy = 3,
}

/// The runner's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u16,
    pub status: HelloStatus,
    pub message: String,
}

fn read_exact_or_closed<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })
}

fn read_u16<R: Read>(r: &mut R) -> Result<u16, WireError> {
    let mut b = [0u8; 2];
    read_exact_or_closed(r, &mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_magic<R: Read>(r: &mut R) -> Result<(), WireError> {
    let mut magic = [0u8; 4];
    read_exact_or_closed(r, &mut magic)?;
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    Ok(())
}

/// u16 length + bytes, refusing more than `max`.
fn read_short_string<R: Read>(r: &mut R, max: usize) -> Result<String, WireError> {
    let len = read_u16(r)? as usize;
    if len > max {
        return Err(WireError::HelloTooLong(len));
    }
    let mut b = vec![0u8; len];
    read_exact_or_closed(r, &mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

fn put_short_string(out: &mut Vec<u8>, s: &str, max: usize) {
    let b = &s.as_bytes()[..s.len().min(max)];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.version.to_be_bytes());
        put_short_string(&mut out, self.token.as_deref().unwrap_or(""), MAX_TOKEN);
        out
    }

    pub fn read_from<R: Read>(r: &mut R) -> Result<Hello, WireError> {
        read_magic(r)?;
        let version = read_u16(r)?;
        let token = read_short_string(r, MAX_TOKEN)?;
        Ok(Hello {
            version,
            token: (!token.is_empty()).then_some(token),
        })
    }
}

impl HelloReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(self.status as u8);
        put_short_string(&mut out, &self.message, MAX_HELLO_MESSAGE);
        out
    }

    pub fn read_from<R: Read>(r: &mut R) -> Result<HelloReply, WireError> {
        read_magic(r)?;
        let version = read_u16(r)?;
        let mut status = [0u8; 1];
        read_exact_or_closed(r, &mut status)?;
        let status = match status[0] {
            0 => HelloStatus::Welcome,
            1 => HelloStatus::VersionMismatch,
            2 => HelloStatus::Unauthorized,
            _ => HelloStatus::Busy,
        };
        let message = read_short_string(r, MAX_HELLO_MESSAGE)?;
        Ok(HelloReply {
            version,
            status,
            message,
        })
    }
}

/// Writes one length-framed postcard message.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), WireError> {
    let body = postcard::to_stdvec(msg)?;
    if body.len() > MAX_FRAME as usize {
        return Err(WireError::FrameTooBig(body.len() as u32));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    w.write_all(&out)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame, refusing oversized ones before allocating.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<T, WireError> {
    let mut len = [0u8; 4];
    read_exact_or_closed(r, &mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        return Err(WireError::FrameTooBig(len));
    }
    let mut body = vec![0u8; len as usize];
    read_exact_or_closed(r, &mut body)?;
    Ok(postcard::from_bytes(&body)?)
}

/// What `create` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    pub handler: Handler,
    pub key: String,
    pub size: u64,
    /// Allocate every byte now rather than sparsely.
    pub prealloc: bool,
    /// Handler-specific settings (e.g. a gluster volfile server).
    pub options: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Create(CreateRequest),
    Delete {
        handler: Handler,
        key: String,
    },
    /// First half of `map`: the runner opens the export and says where to connect.
    MapBegin {
        handler: Handler,
        key: String,
        /// The shard for each connection, in order (None: least-loaded);
        /// empty keeps a reattach's saved placement, or is all least-loaded.
        shards: Vec<Option<u32>>,
    },
    /// Before `map` connects: the peers its connections will come from, in
    /// connect order, so the runner can place them as
    /// [`MapTarget::placement`] says.
    MapPeers {
        key: String,
        peers: Vec<ConnPeer>,
    },
    /// Second half: the kernel holds the device now.
    MapDone {
        key: String,
        device: String,
        /// IO connections the device has: a later reattach replaces them all.
        connections: u32,
    },
    /// The CLI could not attach; the backstore goes back to where it was.
    MapAbort {
        key: String,
        reason: String,
    },
    /// First half of `unmap`, by key or by /dev/nbdX.
    UnmapBegin {
        handler: Handler,
        target: String,
    },
    UnmapDone {
        key: String,
    },
    List {
        handler: Option<Handler>,
        filter: ListFilter,
    },
    Info {
        key: String,
    },
    Stats {
        key: String,
    },
    /// Grows (or, with `shrink`, shrinks) a backstore's storage.
    Resize {
        handler: Handler,
        key: String,
        size: u64,
        shrink: bool,
    },
}

impl Request {
    /// Its name in metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Create(_) => "create",
            Request::Delete { .. } => "delete",
            Request::MapBegin { .. } => "map_begin",
            Request::MapPeers { .. } => "map_peers",
            Request::MapDone { .. } => "map_done",
            Request::MapAbort { .. } => "map_abort",
            Request::UnmapBegin { .. } => "unmap_begin",
            Request::UnmapDone { .. } => "unmap_done",
            Request::List { .. } => "list",
            Request::Info { .. } => "info",
            Request::Stats { .. } => "stats",
            Request::Resize { .. } => "resize",
        }
    }
}

/// An IO connection as the runner will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnPeer {
    /// Its TCP source address (bound before connecting).
    Tcp(std::net::SocketAddr),
    /// From this process, on the runner's unix socket.
    Unix { pid: i32 },
}

/// Where `map` connects and what it must check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapTarget {
    pub key: String,
    /// IO route address as the runner sees it; empty for "the host you reached me on".
    pub io_host: String,
    pub io_port: u16,
    /// The IO route's unix socket (empty: none); a map on the runner's own
    /// host connects there, which swap on the device needs.
    pub io_unix: String,
    /// Runner shards: the default connection count.
    pub shards: u32,
    /// BACKEND_IDENTIFIER for the kernel: unique per backstore, stable across restarts.
    pub cookie: String,
    /// Connections the device was attached with (0: unknown), for a reattach.
    pub connections: u32,
    /// Set for a dead backstore: the device to reattach with RECONFIGURE.
    pub reattach: Option<String>,
    /// The shard of each connection (None: least-loaded), asked for or
    /// saved for a reattach; empty when all are least-loaded.
    pub placement: Vec<Option<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmapTarget {
    pub key: String,
    pub device: Option<String>,
    /// The device must carry this BACKEND_IDENTIFIER to be disconnected:
    /// after a restart it may have been given to another backstore.
    pub cookie: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    NotFound,
    Exists,
    InvalidArgument,
    WrongState,
    Unsupported,
    Backend,
    Persistence,
    Internal,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Exists => "exists",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Backend => "backend",
            ErrorCode::Persistence => "persistence",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Backstore(BackstoreInfo),
    Map(MapTarget),
    Unmap(UnmapTarget),
    List(Vec<BackstoreInfo>),
    Stats(StatsReport),
    /// After a resize: the backstore, and the cookie nbd-cli needs to tell
    /// the kernel about the new size when it is mapped.
    Resized {
        info: BackstoreInfo,
        cookie: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Sent any number of times before the answer to a long request
    /// (preallocation); keeps the client informed and its timeout fed.
    Progress {
        done: u64,
        total: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn hello_round_trips_and_keeps_its_layout() {
        let h = Hello {
            version: 7,
            token: Some("s3cret".into()),
        };
        let bytes = h.encode();
        assert_eq!(&bytes[..6], b"NBDR\x00\x07");
        assert_eq!(Hello::read_from(&mut Cursor::new(&bytes)).unwrap(), h);
        let anon = Hello {
            version: 1,
            token: None,
        };
        assert_eq!(
            Hello::read_from(&mut Cursor::new(anon.encode())).unwrap(),
            anon
        );
        let r = HelloReply {
            version: 2,
            status: HelloStatus::VersionMismatch,
            message: "runner speaks 2".into(),
        };
        assert_eq!(
            HelloReply::read_from(&mut Cursor::new(r.encode())).unwrap(),
            r
        );
    }

    #[test]
    fn bad_hellos_are_refused() {
        let e = Hello::read_from(&mut Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()));
        assert!(matches!(e, Err(WireError::BadMagic(_))));
        let mut long = b"NBDR\x00\x01".to_vec();
        long.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            Hello::read_from(&mut Cursor::new(long)),
            Err(WireError::HelloTooLong(_))
        ));
        assert!(matches!(
            Hello::read_from(&mut Cursor::new(b"NBD".to_vec())),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn frames_round_trip() {
        let req = Request::Create(CreateRequest {
            handler: Handler::File,
            key: "/var/lib/a.raw".into(),
            size: 1 << 30,
            prealloc: true,
            options: [("k".to_string(), "v".to_string())].into(),
        });
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).unwrap();
        assert_eq!(
            u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
            buf.len() - 4
        );
        let back: Request = read_frame(&mut Cursor::new(&buf)).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_truncated_and_garbage_frames_fail_cleanly() {
        let mut huge = (MAX_FRAME + 1).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(matches!(
            read_frame::<_, Request>(&mut Cursor::new(huge)),
            Err(WireError::FrameTooBig(_))
        ));
        let mut short = 100u32.to_be_bytes().to_vec();
        short.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            read_frame::<_, Request>(&mut Cursor::new(short)),
            Err(WireError::Closed)
        ));
        let mut garbage = 8u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 8]);
        assert!(matches!(
            read_frame::<_, Request>(&mut Cursor::new(garbage)),
            Err(WireError::Decode(_))
        ));
    }
}
