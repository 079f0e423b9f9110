//! Every NBD wire type, each with one encode/read pair on the codec: the
//! handshake's greeting, options, option replies and info blocks, and the
//! transmission phase's requests, replies and block descriptors, in both
//! the compact and the extended header forms.

use super::codec::{put_string, read_string, Codec, Reader, Sink};
use super::consts::*;

/// The server's first 18 bytes. Read as found, so a client can say what
/// it got instead of only "bad magic".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub magic: u64,
    pub style: u64,
    pub flags: u16,
}

/// What a client makes of a greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreetingKind {
    NotNbd,
    Oldstyle,
    UnknownStyle,
    Newstyle,
}

impl Greeting {
    pub const LEN: usize = 18;

    pub fn newstyle(flags: u16) -> Self {
        Greeting {
            magic: NBDMAGIC,
            style: IHAVEOPT,
            flags,
        }
    }

    pub fn kind(&self) -> GreetingKind {
        match (self.magic, self.style) {
            (NBDMAGIC, IHAVEOPT) => GreetingKind::Newstyle,
            (NBDMAGIC, OLDSTYLE_MAGIC) => GreetingKind::Oldstyle,
            (NBDMAGIC, _) => GreetingKind::UnknownStyle,
            _ => GreetingKind::NotNbd,
        }
    }
}

impl Codec for Greeting {
    fn encode<S: Sink>(&self, out: &mut S) {
        self.magic.encode(out);
        self.style.encode(out);
        self.flags.encode(out);
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(Greeting {
            magic: u64::read(r)?,
            style: u64::read(r)?,
            flags: u16::read(r)?,
        })
    }
}

/// An option's 16-byte header; its `len` bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    /// An option with its data, ready to send.
    pub fn with_data(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .to_bytes();
        v.extend_from_slice(data);
        v
    }
}

impl Codec for OptionHeader {
    fn encode<S: Sink>(&self, out: &mut S) {
        IHAVEOPT.encode(out);
        self.option.encode(out);
        self.len.encode(out);
    }

    /// None also when the magic is wrong.
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        (u64::read(r)? == IHAVEOPT).then_some(())?;
        Some(OptionHeader {
            option: u32::read(r)?,
            len: u32::read(r)?,
        })
    }
}

/// An option reply's 20-byte header; `len` bytes of body follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub kind: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    /// A whole reply, header and body.
    pub fn with_body(option: u32, kind: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::LEN + body.len());
        Self::put(&mut v, option, kind, body);
        v
    }

    pub fn put(out: &mut Vec<u8>, option: u32, kind: u32, body: &[u8]) {
        OptionReplyHeader {
            option,
            kind,
            len: body.len() as u32,
        }
        .encode(out);
        out.extend_from_slice(body);
    }
}

/// True for the `NBD_REP_ERR_*` reply types.
pub fn is_error_reply(kind: u32) -> bool {
    kind & REP_ERR != 0
}

impl Codec for OptionReplyHeader {
    fn encode<S: Sink>(&self, out: &mut S) {
        OPT_REPLY_MAGIC.encode(out);
        self.option.encode(out);
        self.kind.encode(out);
        self.len.encode(out);
    }

    /// None also when the magic is wrong.
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        (u64::read(r)? == OPT_REPLY_MAGIC).then_some(())?;
        Some(OptionReplyHeader {
            option: u32::read(r)?,
            kind: u32::read(r)?,
            len: u32::read(r)?,
        })
    }
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: an export and the NBD_INFO
/// types the client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl Codec for InfoRequest {
    fn encode<S: Sink>(&self, out: &mut S) {
        put_string(out, &self.name);
        (self.infos.len() as u16).encode(out);
        for i in &self.infos {
            i.encode(out);
        }
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let name = read_string(r, MAX_STRING)?;
        let count = u16::read(r)? as usize;
        // Checked against what is there before anything is allocated.
        (r.left() == count * 2).then_some(())?;
        let infos = (0..count).map(|_| u16::read(r)).collect::<Option<_>>()?;
        Some(InfoRequest { name, infos })
    }
}

/// Meta-context queries per option we take.
pub const MAX_QUERIES: u32 = 128;

/// The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl Codec for MetaContextRequest {
    fn encode<S: Sink>(&self, out: &mut S) {
        put_string(out, &self.name);
        (self.queries.len() as u32).encode(out);
        for q in &self.queries {
            put_string(out, q);
        }
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let name = read_string(r, MAX_STRING)?;
        let count = u32::read(r)?;
        if count > MAX_QUERIES {
            return None;
        }
        let queries = (0..count)
            .map(|_| read_string(r, MAX_STRING))
            .collect::<Option<_>>()?;
        Some(MetaContextRequest { name, queries })
    }
}

/// The body of an NBD_REP_INFO reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InfoBlock {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// A type this side does not know; skipped.
    Unknown(u16),
}

impl Codec for InfoBlock {
    fn encode<S: Sink>(&self, out: &mut S) {
        match self {
            InfoBlock::Export { size, flags } => {
                INFO_EXPORT.encode(out);
                size.encode(out);
                flags.encode(out);
            }
            InfoBlock::Name(s) => {
                INFO_NAME.encode(out);
                out.put(s.as_bytes());
            }
            InfoBlock::Description(s) => {
                INFO_DESCRIPTION.encode(out);
                out.put(s.as_bytes());
            }
            InfoBlock::BlockSize {
                min,
                preferred,
                max,
            } => {
                INFO_BLOCK_SIZE.encode(out);
                min.encode(out);
                preferred.encode(out);
                max.encode(out);
            }
            InfoBlock::Unknown(kind) => kind.encode(out),
        }
    }

    /// Reads the whole body: fixed-size blocks must be exactly their size.
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let text = |r: &mut Reader<'_>| {
            let b = r.rest();
            (b.len() <= MAX_STRING).then(|| String::from_utf8_lossy(b).into_owned())
        };
        let block = match u16::read(r)? {
            INFO_EXPORT => InfoBlock::Export {
                size: u64::read(r)?,
                flags: u16::read(r)?,
            },
            INFO_NAME => InfoBlock::Name(text(r)?),
            INFO_DESCRIPTION => InfoBlock::Description(text(r)?),
            INFO_BLOCK_SIZE => InfoBlock::BlockSize {
                min: u32::read(r)?,
                preferred: u32::read(r)?,
                max: u32::read(r)?,
            },
            other => {
                r.rest();
                InfoBlock::Unknown(other)
            }
        };
        r.finish().map(|()| block)
    }
}

/// The body of an NBD_REP_SERVER reply to NBD_OPT_LIST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    pub description: String,
}

impl Codec for ServerEntry {
    fn encode<S: Sink>(&self, out: &mut S) {
        put_string(out, &self.name);
        out.put(self.description.as_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let name = read_string(r, MAX_STRING)?;
        let description = String::from_utf8_lossy(r.rest()).into_owned();
        Some(ServerEntry { name, description })
    }
}

/// The body of an NBD_REP_META_CONTEXT reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextReply {
    pub id: u32,
    pub name: String,
}

impl Codec for MetaContextReply {
    fn encode<S: Sink>(&self, out: &mut S) {
        self.id.encode(out);
        out.put(self.name.as_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let id = u32::read(r)?;
        let b = r.rest();
        (b.len() <= MAX_STRING).then_some(())?;
        Some(MetaContextReply {
            id,
            name: std::str::from_utf8(b).ok()?.to_owned(),
        })
    }
}

/// The server's answer to NBD_OPT_EXPORT_NAME: size and flags, then 124
/// zero bytes unless both sides agreed on NO_ZEROES.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: u16,
}

impl ExportNameReply {
    pub const ZEROES: usize = 124;

    pub fn len(no_zeroes: bool) -> usize {
        10 + if no_zeroes { 0 } else { Self::ZEROES }
    }

    pub fn put(&self, out: &mut Vec<u8>, no_zeroes: bool) {
        self.encode(out);
        if !no_zeroes {
            out.extend_from_slice(&[0u8; Self::ZEROES]);
        }
    }
}

impl Codec for ExportNameReply {
    fn encode<S: Sink>(&self, out: &mut S) {
        self.size.encode(out);
        self.flags.encode(out);
    }

    /// Reads size and flags, ignoring any zero padding after them.
    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let v = ExportNameReply {
            size: u64::read(r)?,
            flags: u16::read(r)?,
        };
        r.rest();
        Some(v)
    }
}

/// Which transmission headers a session uses (NBD_OPT_EXTENDED_HEADERS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeaderMode {
    /// 28-byte requests, 32-bit lengths; simple or structured replies.
    #[default]
    Compact,
    /// 32-byte requests and replies, 64-bit lengths.
    Extended,
}

impl HeaderMode {
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Compact => REQUEST_LEN,
            HeaderMode::Extended => EXT_REQUEST_LEN,
        }
    }
}

/// A request header, in either form. `length` is 64-bit; the compact form
/// carries only 32 bits of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// A request header whose magic is wrong for the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl RequestHeader {
    /// Parses a header of `mode.request_len()` bytes. Fixed offsets once
    /// the length is known: this runs for every request.
    #[inline]
    pub fn parse(b: &[u8], mode: HeaderMode) -> Result<Self, BadMagic> {
        let be = |at: usize, n: usize| {
            b[at..at + n]
                .iter()
                .fold(0u64, |v, &byte| v << 8 | u64::from(byte))
        };
        if b.len() < 4 {
            return Err(BadMagic(0));
        }
        let magic = be(0, 4) as u32;
        let want = match mode {
            HeaderMode::Compact => REQUEST_MAGIC,
            HeaderMode::Extended => EXT_REQUEST_MAGIC,
        };
        if magic != want || b.len() != mode.request_len() {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be(4, 2) as u16,
            kind: be(6, 2) as u16,
            cookie: be(8, 8),
            offset: be(16, 8),
            length: match mode {
                HeaderMode::Compact => be(24, 4),
                HeaderMode::Extended => be(24, 8),
            },
        })
    }

    /// The header in `mode`'s form; a compact header keeps the low 32 bits
    /// of `length` (callers check it fits).
    pub fn encode_mode<S: Sink>(&self, mode: HeaderMode, out: &mut S) {
        match mode {
            HeaderMode::Compact => REQUEST_MAGIC.encode(out),
            HeaderMode::Extended => EXT_REQUEST_MAGIC.encode(out),
        }
        self.flags.encode(out);
        self.kind.encode(out);
        self.cookie.encode(out);
        self.offset.encode(out);
        match mode {
            HeaderMode::Compact => (self.length as u32).encode(out),
            HeaderMode::Extended => self.length.encode(out),
        }
    }

    pub fn to_bytes(&self, mode: HeaderMode) -> Vec<u8> {
        let mut v = Vec::with_capacity(mode.request_len());
        self.encode_mode(mode, &mut v);
        v
    }

    /// Bytes of payload that follow this header on the wire, whatever its
    /// validity: a WRITE's length, or an extended header's length when it
    /// says PAYLOAD_LEN. The spec has extended WRITEs set PAYLOAD_LEN, but
    /// qemu 10 does not; a WRITE carries its data either way (as qemu's
    /// own server reads it).
    #[inline]
    pub fn payload_len(&self, mode: HeaderMode) -> u64 {
        let flagged = mode == HeaderMode::Extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if self.kind == CMD_WRITE || flagged {
            self.length
        } else {
            0
        }
    }
}

/// A reply header as read by a client: simple, structured or extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHead {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        /// The request's offset (extended headers only, else 0).
        offset: u64,
        len: u64,
    },
}

impl ReplyHead {
    /// Bytes of header to read, from its first four (the magic); None for
    /// a magic no reply has.
    pub fn len_from_magic(magic: [u8; 4]) -> Option<usize> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Some(CHUNK_HEADER_LEN),
            EXT_REPLY_MAGIC => Some(EXT_CHUNK_HEADER_LEN),
            _ => None,
        }
    }

    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHead::Simple { cookie, .. } | ReplyHead::Chunk { cookie, .. } => cookie,
        }
    }
}

impl ReplyHead {
    pub fn read(r: &mut Reader<'_>) -> Option<Self> {
        Some(match u32::read(r)? {
            SIMPLE_REPLY_MAGIC => ReplyHead::Simple {
                error: u32::read(r)?,
                cookie: u64::read(r)?,
            },
            STRUCTURED_REPLY_MAGIC => ReplyHead::Chunk {
                flags: u16::read(r)?,
                kind: u16::read(r)?,
                cookie: u64::read(r)?,
                offset: 0,
                len: u32::read(r)? as u64,
            },
            EXT_REPLY_MAGIC => ReplyHead::Chunk {
                flags: u16::read(r)?,
                kind: u16::read(r)?,
                cookie: u64::read(r)?,
                offset: u64::read(r)?,
                len: u64::read(r)?,
            },
            _ => return None,
        })
    }
}

/// The header of a structured (compact) or extended reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    /// Sent only in the extended form: the request's offset.
    pub offset: u64,
    pub len: u64,
}

impl ChunkHeader {
    /// Laid out in a stack array and handed to the sink in one piece: reply
    /// headers are built once per request.
    #[inline]
    pub fn encode_mode<S: Sink>(&self, mode: HeaderMode, out: &mut S) {
        let mut b = [0u8; EXT_CHUNK_HEADER_LEN];
        let magic = match mode {
            HeaderMode::Compact => STRUCTURED_REPLY_MAGIC,
            HeaderMode::Extended => EXT_REPLY_MAGIC,
        };
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        let n = match mode {
            HeaderMode::Compact => {
                b[16..20].copy_from_slice(&(self.len as u32).to_be_bytes());
                CHUNK_HEADER_LEN
            }
            HeaderMode::Extended => {
                b[16..24].copy_from_slice(&self.offset.to_be_bytes());
                b[24..32].copy_from_slice(&self.len.to_be_bytes());
                EXT_CHUNK_HEADER_LEN
            }
        };
        out.put(&b[..n]);
    }
}

/// A simple reply's header.
#[inline]
pub fn encode_simple_reply<S: Sink>(out: &mut S, cookie: u64, error: u32) {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    out.put(&b);
}

/// One base:allocation block descriptor; the compact form carries 32 bits
/// of each field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u64,
    pub flags: u64,
}

impl Descriptor {
    pub fn wire_len(mode: HeaderMode) -> usize {
        match mode {
            HeaderMode::Compact => 8,
            HeaderMode::Extended => 16,
        }
    }

    #[inline]
    pub fn encode_mode<S: Sink>(&self, mode: HeaderMode, out: &mut S) {
        match mode {
            HeaderMode::Compact => {
                (self.len as u32).encode(out);
                (self.flags as u32).encode(out);
            }
            HeaderMode::Extended => {
                self.len.encode(out);
                self.flags.encode(out);
            }
        }
    }

    pub fn read_mode(r: &mut Reader<'_>, mode: HeaderMode) -> Option<Self> {
        Some(match mode {
            HeaderMode::Compact => Descriptor {
                len: u32::read(r)? as u64,
                flags: u32::read(r)? as u64,
            },
            HeaderMode::Extended => Descriptor {
                len: u64::read(r)?,
                flags: u64::read(r)?,
            },
        })
    }
}

/// The payload of an error chunk: errno and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorChunk {
    pub error: u32,
    pub message: String,
}

impl Codec for ErrorChunk {
    #[inline]
    fn encode<S: Sink>(&self, out: &mut S) {
        self.error.encode(out);
        (self.message.len() as u16).encode(out);
        out.put(self.message.as_bytes());
    }

    fn read(r: &mut Reader<'_>) -> Option<Self> {
        let error = u32::read(r)?;
        let len = u16::read(r)? as usize;
        let message = String::from_utf8_lossy(r.take(len)?).into_owned();
        r.rest(); // ERROR_OFFSET's offset, if any
        Some(ErrorChunk { error, message })
    }
}

#[cfg(test)]
#[path = "msgs_tests.rs"]
mod tests;
