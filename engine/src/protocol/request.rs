//! Transmission-phase requests: parsing the 28-byte header and checking it
//! against the negotiated export, with checked arithmetic throughout.

use super::consts::*;
use super::errno::Errno;
use super::wire::{get_u16, get_u32, get_u64};

/// Largest READ/WRITE payload we take; advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        let magic = get_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: get_u16(b, 4),
            kind: get_u16(b, 6),
            cookie: get_u64(b, 8),
            offset: get_u64(b, 16),
            length: get_u32(b, 24),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Bytes of payload that follow this header on the wire, whatever its validity.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

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
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
}

/// What validation needs to know about the session.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub base_allocation: bool,
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Checks a header against the session (DESIGN §7). On error, the caller
/// still has to consume `payload_len()` bytes to stay in sync.
pub fn validate(h: &RequestHeader, s: &Session) -> Result<Command, Errno> {
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
    if h.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    if fua && !s.has(TF_SEND_FUA) {
        return Err(Errno::Inval);
    }
    if h.flags & CMD_FLAG_DF != 0 && !(s.structured && s.has(TF_SEND_DF)) {
        return Err(Errno::Inval);
    }
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.has(TF_READ_ONLY) {
        return Err(Errno::Perm);
    }
    let in_range = h
        .offset
        .checked_add(h.length as u64)
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
            if len > MAX_PAYLOAD {
                return Err(Errno::Inval);
            }
            if !in_range {
                return Err(range_err);
            }
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
            if !s.base_allocation || len == 0 || !in_range {
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

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
