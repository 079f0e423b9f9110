//! Reply encoding: simple replies and structured-reply chunks.
//!
//! Headers are built into a small fixed array so the hot path never
//! allocates; payloads travel separately (see the engine's writer).

use super::codec::{Codec, Sink};
use super::consts::*;
use super::errno::Errno;
use super::msgs::{encode_simple_reply, ChunkHeader, Descriptor, ErrorChunk, HeaderMode};

/// Longest header we emit: an extended chunk header with 8 bytes of chunk
/// payload (an error, a READ's offset, a block-status prefix).
pub const MAX_HEADER: usize = EXT_CHUNK_HEADER_LEN + 8;

/// The reply form a session negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplyStyle {
    #[default]
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: compact chunks.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte chunks, never simple replies.
    Extended,
}

impl ReplyStyle {
    pub fn headers(self) -> HeaderMode {
        match self {
            ReplyStyle::Extended => HeaderMode::Extended,
            _ => HeaderMode::Compact,
        }
    }

    pub fn structured(self) -> bool {
        self != ReplyStyle::Simple
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    bytes: [u8; MAX_HEADER],
    len: u8,
}

impl Sink for ReplyHeader {
    #[inline]
    fn put(&mut self, b: &[u8]) {
        let at = self.len as usize;
        self.bytes[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }
}

impl ReplyHeader {
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    #[inline]
    fn empty() -> Self {
        ReplyHeader {
            bytes: [0u8; MAX_HEADER],
            len: 0,
        }
    }

    /// A simple reply (16 bytes); a successful READ's data follows it.
    #[inline]
    pub fn simple(cookie: u64, error: Option<Errno>) -> Self {
        let mut h = Self::empty();
        encode_simple_reply(&mut h, cookie, error.map_or(0, Errno::wire));
        h
    }

    /// A chunk header announcing `payload_len` bytes, compact unless the
    /// style is extended.
    #[inline]
    pub fn chunk(
        style: ReplyStyle,
        cookie: u64,
        offset: u64,
        flags: u16,
        kind: u16,
        payload_len: u64,
    ) -> Self {
        let mut h = Self::empty();
        ChunkHeader {
            flags,
            kind,
            cookie,
            offset,
            len: payload_len,
        }
        .encode_mode(style.headers(), &mut h);
        h
    }

    /// Header for a successful READ of `len` bytes at `offset`: the data follows.
    #[inline]
    pub fn read_data(style: ReplyStyle, cookie: u64, offset: u64, len: u32) -> Self {
        if style == ReplyStyle::Simple {
            return Self::simple(cookie, None);
        }
        if len == 0 {
            // OFFSET_DATA must carry a byte, and a structured READ gets no
            // simple reply: a lone NONE chunk.
            return Self::chunk(style, cookie, offset, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
        }
        let mut h = Self::chunk(
            style,
            cookie,
            offset,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            len as u64 + 8,
        );
        offset.encode(&mut h);
        h
    }

    /// Success for anything but READ and BLOCK_STATUS.
    #[inline]
    pub fn done(style: ReplyStyle, cookie: u64, offset: u64) -> Self {
        match style {
            // Extended headers allow no simple replies.
            ReplyStyle::Extended => {
                Self::chunk(style, cookie, offset, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
            }
            _ => Self::simple(cookie, None),
        }
    }

    /// An error for any command, in the form the session expects.
    #[inline]
    pub fn error(style: ReplyStyle, cookie: u64, offset: u64, errno: Errno) -> Self {
        if style == ReplyStyle::Simple {
            return Self::simple(cookie, Some(errno));
        }
        let mut h = Self::chunk(style, cookie, offset, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6);
        ErrorChunk {
            error: errno.wire(),
            message: String::new(),
        }
        .encode(&mut h);
        h
    }

    /// Header of a BLOCK_STATUS chunk; `descriptors` descriptors of the
    /// style's size follow.
    #[inline]
    pub fn block_status(
        style: ReplyStyle,
        cookie: u64,
        offset: u64,
        context_id: u32,
        descriptors: u32,
    ) -> Self {
        let each = Descriptor::wire_len(style.headers()) as u64;
        let (kind, prefix) = match style {
            ReplyStyle::Extended => (REPLY_TYPE_BLOCK_STATUS_EXT, 8),
            _ => (REPLY_TYPE_BLOCK_STATUS, 4),
        };
        let len = prefix + descriptors as u64 * each;
        let mut h = Self::chunk(style, cookie, offset, REPLY_FLAG_DONE, kind, len);
        context_id.encode(&mut h);
        if style == ReplyStyle::Extended {
            descriptors.encode(&mut h);
        }
        h
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
/// block descriptors of `mode`'s size. Adjacent equal extents merge while
/// the descriptor can hold them (a compact session's limit fits in 32
/// bits, so nothing needs splitting); `req_one` keeps only the first.
/// Returns the descriptor count.
pub fn encode_extents(
    extents: &[Extent],
    limit: u64,
    req_one: bool,
    mode: HeaderMode,
    out: &mut Vec<u8>,
) -> u32 {
    let longest = match mode {
        HeaderMode::Compact => u32::MAX as u64,
        HeaderMode::Extended => u64::MAX,
    };
    let mut remaining = limit.min(longest);
    let mut count = 0u32;
    let mut pending: Option<Extent> = None;
    let mut emit = |e: Extent, out: &mut Vec<u8>| {
        Descriptor {
            len: e.len,
            flags: e.flags as u64,
        }
        .encode_mode(mode, out);
        count += 1;
    };
    for e in extents.iter().filter(|e| e.len > 0) {
        if remaining == 0 {
            break;
        }
        let len = e.len.min(remaining);
        remaining -= len;
        match pending.as_mut() {
            // The sum stays within `limit`, which fits a descriptor.
            Some(p) if p.flags == e.flags => p.len += len,
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
