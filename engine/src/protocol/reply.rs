//! Reply encoding: simple replies and structured-reply chunks.
//!
//! Headers are built into a small fixed array so the hot path never
//! allocates; payloads travel separately (see the engine's writer).

use super::consts::*;
use super::errno::Errno;

/// Longest header we emit: a structured ERROR chunk with no message.
pub const MAX_HEADER: usize = CHUNK_HEADER_LEN + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    bytes: [u8; MAX_HEADER],
    len: u8,
}

impl ReplyHeader {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    fn build(parts: &[&[u8]]) -> Self {
        let mut bytes = [0u8; MAX_HEADER];
        let mut len = 0;
        for p in parts {
            bytes[len..len + p.len()].copy_from_slice(p);
            len += p.len();
        }
        ReplyHeader {
            bytes,
            len: len as u8,
        }
    }

    /// A simple reply (16 bytes); a successful READ's data follows it.
    pub fn simple(cookie: u64, error: Option<Errno>) -> Self {
        let err = error.map_or(0, Errno::wire);
        Self::build(&[
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            &err.to_be_bytes(),
            &cookie.to_be_bytes(),
        ])
    }

    /// A structured chunk header announcing `payload_len` bytes.
    pub fn chunk(cookie: u64, flags: u16, kind: u16, payload_len: u32) -> Self {
        Self::build(&[
            &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            &flags.to_be_bytes(),
            &kind.to_be_bytes(),
            &cookie.to_be_bytes(),
            &payload_len.to_be_bytes(),
        ])
    }

    /// Header for a successful READ of `len` bytes at `offset`: the data follows.
    pub fn read_data(cookie: u64, offset: u64, len: u32, structured: bool) -> Self {
        if !structured {
            return Self::simple(cookie, None);
        }
        if len == 0 {
            return Self::chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        }
        let mut h = Self::chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, len + 8);
        h.append(&offset.to_be_bytes());
        h
    }

    /// Success for anything but READ and BLOCK_STATUS.
    pub fn done(cookie: u64) -> Self {
        Self::simple(cookie, None)
    }

    /// An error for any command, in the form the session expects.
    pub fn error(cookie: u64, errno: Errno, structured: bool) -> Self {
        if !structured {
            return Self::simple(cookie, Some(errno));
        }
        let mut h = Self::chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6);
        h.append(&errno.wire().to_be_bytes());
        h.append(&0u16.to_be_bytes());
        h
    }

    /// Header of a BLOCK_STATUS chunk; `descriptors` bytes of (u32 len, u32 flags) follow.
    pub fn block_status(cookie: u64, context_id: u32, descriptors: u32) -> Self {
        let mut h = Self::chunk(
            cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            4 + descriptors * 8,
        );
        h.append(&context_id.to_be_bytes());
        h
    }

    fn append(&mut self, b: &[u8]) {
        let at = self.len as usize;
        self.bytes[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }
}

/// One base:allocation extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// STATE_HOLE | STATE_ZERO bits.
    pub flags: u32,
}

/// Encodes extents covering at most `limit` bytes from the request offset as
/// block descriptors. Extents longer than a u32 are split; adjacent equal ones
/// merged; `req_one` keeps only the first. Returns the descriptor count.
pub fn encode_extents(extents: &[Extent], limit: u32, req_one: bool, out: &mut Vec<u8>) -> u32 {
    let mut remaining = limit as u64;
    let mut count = 0u32;
    let mut pending: Option<Extent> = None;
    let mut emit = |e: Extent, out: &mut Vec<u8>| {
        out.extend_from_slice(&(e.len as u32).to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        count += 1;
    };
    for e in extents.iter().filter(|e| e.len > 0) {
        if remaining == 0 {
            break;
        }
        let len = e.len.min(remaining);
        remaining -= len;
        match pending.as_mut() {
            Some(p) if p.flags == e.flags && p.len + len <= u32::MAX as u64 => p.len += len,
            _ => {
                if let Some(p) = pending.take() {
                    emit(p, out);
                    if req_one {
                        return 1;
                    }
                }
                pending = Some(Extent {
                    len,
                    flags: e.flags,
                });
            }
        }
    }
    if let Some(p) = pending {
        emit(p, out);
    }
    count
}

#[cfg(test)]
#[path = "reply_tests.rs"]
mod tests;
