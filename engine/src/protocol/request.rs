//! Transmission-phase requests: parsing the 28-byte header and checking it
//! against the negotiated export, with checked arithmetic throughout.

use super::consts::*;
use super::errno::Errno;
use super::msgs::RequestHeader;
use super::reply::ReplyStyle;

/// Largest READ/WRITE payload we take; advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// A request that passed every check: ranges are inside the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    Disconnect,
}

/// What validation needs to know about the session.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub size: u64,
    pub flags: u16,
    /// Simple, structured or extended: also says which request header.
    pub style: ReplyStyle,
    pub base_allocation: bool,
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Checks a header against the session (docs/ARCHITECTURE.md, "Hostile
/// input"). On error, the caller still has to consume `payload_len()` bytes
/// to stay in sync. A BLOCK_STATUS with a payload comes back with the
/// header's length; [`block_status_payload`] gives its effect length.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Errno> {
    let extended = s.style == ReplyStyle::Extended;
    let payload = h.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    // PAYLOAD_LEN only with extended headers: on WRITE (which carries its
    // data with or without it, see `payload_len`) and on BLOCK_STATUS when
    // we offered the payload form.
    let payload_ok = !payload
        || extended
            && match h.kind {
                CMD_WRITE => true,
                CMD_BLOCK_STATUS => s.has(TF_BLOCK_STATUS_PAYLOAD),
                _ => false,
            };
    if !payload_ok {
        return Err(Errno::Inval);
    }
    // FUA is valid on every command once SEND_FUA is advertised (the spec:
    // "the server MUST accept all commands with this bit set"); commands
    // that write nothing ignore it.
    let allowed = CMD_FLAG_FUA
        | match h.kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_WRITE | CMD_TRIM | CMD_FLUSH | CMD_CACHE | CMD_DISC => 0,
            _ => return Err(Errno::Inval),
        };
    if h.flags & !(allowed | CMD_FLAG_PAYLOAD_LEN) != 0 {
        return Err(Errno::Inval);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    if fua && !s.has(TF_SEND_FUA) {
        return Err(Errno::Inval);
    }
    if h.flags & CMD_FLAG_DF != 0 && !(s.style.structured() && s.has(TF_SEND_DF)) {
        return Err(Errno::Inval);
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.has(TF_READ_ONLY) {
        return Err(Errno::Perm);
    }
    let in_range = h
        .offset
        .checked_add(h.length)
        .is_some_and(|end| end <= s.size);
    let range_err = if matches!(h.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
        Errno::NoSpc
    } else {
        Errno::Inval
    };
    let (offset, len) = (h.offset, h.length);
    match h.kind {
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => {
            if !s.has(TF_SEND_FLUSH) {
                return Err(Errno::Inval);
            }
            Ok(Command::Flush)
        }
        CMD_READ | CMD_WRITE => {
            if len > MAX_PAYLOAD as u64 {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(range_err);
            }
            let len = len as u32;
            Ok(if h.kind == CMD_READ {
                Command::Read { offset, len }
            } else {
                Command::Write { offset, len, fua }
            })
        }
        CMD_TRIM => {
            if !s.has(TF_SEND_TRIM) {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(range_err);
            }
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_WRITE_ZEROES => {
            let fast = h.flags & CMD_FLAG_FAST_ZERO != 0;
            if !s.has(TF_SEND_WRITE_ZEROES) || fast && !s.has(TF_SEND_FAST_ZERO) {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(range_err);
            }
            let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
                fast,
            })
        }
        CMD_CACHE => {
            if !s.has(TF_SEND_CACHE) {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(range_err);
            }
            Ok(Command::Cache { offset, len })
        }
        CMD_BLOCK_STATUS => {
            // With a payload the length is the payload's: its effect
            // length is checked once the payload is read.
            if !s.base_allocation || len == 0 || !payload && !in_range {
                return Err(Errno::Inval);
            }
            let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one,
            })
        }
        _ => Err(Errno::Inval),
    }
}

/// Longest BLOCK_STATUS payload that can make sense: the effect length
/// and each of our contexts once (we have one).
pub const MAX_BLOCK_STATUS_PAYLOAD: u64 = 8 + 4;

/// The payload form of BLOCK_STATUS (extended headers): a u64 effect
/// length, then the context ids wanted. Every id must be one we gave,
/// once; the effect length must be inside the export.
pub fn block_status_payload(
    cmd: Command,
    payload: &[u8],
    context_id: u32,
    s: &Session,
) -> Result<Command, Errno> {
    use super::codec::{Codec, Reader};
    let Command::BlockStatus {
        offset, req_one, ..
    } = cmd
    else {
        return Err(Errno::Inval);
    };
    let mut r = Reader::new(payload);
    let len = u64::read(&mut r).ok_or(Errno::Inval)?;
    // We have one context: the list must be exactly its id.
    if u32::from_bytes(r.rest()) != Some(context_id) {
        return Err(Errno::Inval);
    }
    let in_range = offset.checked_add(len).is_some_and(|end| end <= s.size);
    if len == 0 || !in_range {
        return Err(Errno::Inval);
    }
    Ok(Command::BlockStatus {
        offset,
        len,
        req_one,
    })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
