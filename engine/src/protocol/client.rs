//! The client side of the fixed-newstyle handshake, sans-IO, for a client
//! that hands its socket to the kernel: `NO_ZEROES` when offered, then
//! `NBD_OPT_GO` for one export asking for `NBD_INFO_BLOCK_SIZE`, with no
//! structured replies and no extended headers (the kernel understands only
//! simple replies). A server without `NBD_OPT_GO` gets `NBD_OPT_EXPORT_NAME`.
//!
//! With [`ClientHandshake::with_tls`] the first option is `NBD_OPT_STARTTLS`
//! and nothing about the export is asked before TLS is up.
//!
//! The driver sends [`ClientHandshake::take_output`], reads exactly
//! [`ClientHandshake::want`] bytes into [`ClientHandshake::receive`], runs
//! the TLS handshake when [`ClientHandshake::take_starttls`] says so, and
//! asks [`ClientHandshake::on_eof`] what a closed connection means.

use super::codec::Codec;
use super::consts::*;
use super::msgs::{
    is_error_reply, ExportNameReply, Greeting, GreetingKind, InfoBlock, InfoRequest, OptionHeader,
    OptionReplyHeader,
};
use thiserror::Error;

/// Longest option reply body we accept (an INFO reply is at most a 4 KiB
/// string plus a few bytes; error strings are short).
pub const MAX_REPLY_LEN: u32 = 64 * 1024;

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientNegotiated {
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

const DEFAULT_BLOCKS: (u32, u32, u32) = (1, 4096, 32 << 20);

impl ClientNegotiated {
    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    pub fn can_multi_conn(&self) -> bool {
        self.flags & TF_CAN_MULTI_CONN != 0
    }

    /// The block size to give the kernel: the server's preferred size
    /// (at least its minimum), clamped to what the kernel accepts (a power
    /// of two from 512 to 4096).
    pub fn kernel_block_size(&self) -> u32 {
        let want = self.preferred_block.max(self.min_block).clamp(512, 4096);
        1 << (31 - want.leading_zeros())
    }
}

/// Why a handshake failed, in the server's words where it gave any.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClientError {
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
    #[error("the server does not offer TLS{}", detail(.message))]
    NoTls { message: String },
    #[error("the server closed the connection during {during}")]
    Closed { during: &'static str },
    #[error("NBD protocol error: {0}")]
    Protocol(String),
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    ReplyHeader,
    ReplyBody(OptionReplyHeader),
    /// STARTTLS was acknowledged; the driver upgrades before anything else.
    Upgrade,
    ExportName,
    Done,
    Failed,
}

/// One client handshake for one export.
#[derive(Debug)]
pub struct ClientHandshake {
    state: State,
    export: String,
    out: Vec<u8>,
    no_zeroes: bool,
    export_info: Option<(u64, u16)>,
    blocks: Option<(u32, u32, u32)>,
    negotiated: Option<ClientNegotiated>,
    tls: bool,
    /// STARTTLS is sent and its reply not yet read.
    awaiting_starttls: bool,
}

impl ClientHandshake {
    pub fn new(export: &str) -> Result<Self, ClientError> {
        if export.len() > MAX_STRING {
            return Err(ClientError::Protocol(format!(
                "export name is {} bytes, the protocol allows {MAX_STRING}",
                export.len()
            )));
        }
        Ok(ClientHandshake {
            state: State::Greeting,
            export: export.to_owned(),
            out: Vec::new(),
            no_zeroes: false,
            export_info: None,
            blocks: None,
            negotiated: None,
            tls: false,
            awaiting_starttls: false,
        })
    }

    /// Starts TLS before anything else, and fails if the server will not.
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// True once STARTTLS is acknowledged: run the TLS handshake now; every
    /// byte from here on goes through TLS.
    pub fn take_starttls(&mut self) -> bool {
        if self.state != State::Upgrade {
            return false;
        }
        self.send_go();
        true
    }

    /// Bytes needed next; 0 once done or failed.
    pub fn want(&self) -> usize {
        match self.state {
            State::Greeting => Greeting::LEN,
            State::ReplyHeader => OptionReplyHeader::LEN,
            State::ReplyBody(h) => h.len as usize,
            State::ExportName => ExportNameReply::len(self.no_zeroes),
            State::Upgrade | State::Done | State::Failed => 0,
        }
    }

    /// What the handshake is waiting for, for messages.
    pub fn phase(&self) -> &'static str {
        match self.state {
            State::Greeting => "the greeting",
            State::ReplyHeader | State::ReplyBody(_) => "an option reply",
            State::ExportName => "NBD_OPT_EXPORT_NAME",
            State::Upgrade => "the TLS handshake",
            State::Done | State::Failed => "the end of the handshake",
        }
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn negotiated(&self) -> Option<&ClientNegotiated> {
        self.negotiated.as_ref()
    }

    /// What it means that the server closed the connection now.
    pub fn on_eof(&self) -> ClientError {
        if self.state == State::ExportName {
            // The spec's only way to refuse EXPORT_NAME is to hang up.
            return ClientError::NoSuchExport {
                name: self.export.clone(),
                message: "the server closed the connection on NBD_OPT_EXPORT_NAME".into(),
            };
        }
        ClientError::Closed {
            during: self.phase(),
        }
    }

    /// Feeds exactly [`want`](Self::want) bytes.
    pub fn receive(&mut self, input: &[u8]) -> Result<(), ClientError> {
        if input.len() != self.want()
            || matches!(self.state, State::Upgrade | State::Done | State::Failed)
        {
            return Err(ClientError::Protocol(format!(
                "handshake fed {} bytes while wanting {}",
                input.len(),
                self.want()
            )));
        }
        let result = match self.state {
            State::Greeting => self.on_greeting(input),
            State::ReplyHeader => self.on_reply_header(input),
            State::ReplyBody(h) => {
                self.state = State::ReplyHeader;
                self.on_reply(h, input)
            }
            State::ExportName => self.on_export_name(input),
            State::Upgrade | State::Done | State::Failed => unreachable!("checked above"),
        };
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn on_greeting(&mut self, input: &[u8]) -> Result<(), ClientError> {
        let g = Greeting::from_bytes(input).expect("length checked");
        match g.kind() {
            GreetingKind::NotNbd => {
                return Err(ClientError::BadMagic {
                    what: "greeting",
                    got: g.magic,
                })
            }
            GreetingKind::Oldstyle => {
                return Err(ClientError::Protocol(
                    "the server speaks oldstyle NBD, which cannot select an export".into(),
                ))
            }
            GreetingKind::UnknownStyle => {
                return Err(ClientError::BadMagic {
                    what: "newstyle",
                    got: g.style,
                })
            }
            GreetingKind::Newstyle => {}
        }
        if g.flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::NotFixedNewstyle(g.flags));
        }
        self.no_zeroes = g.flags & FLAG_NO_ZEROES != 0;
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if self.no_zeroes {
            cflags |= CLIENT_NO_ZEROES;
        }
        cflags.encode(&mut self.out);
        if self.tls {
            self.out.extend(OptionHeader::with_data(OPT_STARTTLS, &[]));
            self.awaiting_starttls = true;
            self.state = State::ReplyHeader;
        } else {
            self.send_go();
        }
        Ok(())
    }

    fn send_go(&mut self) {
        let go = InfoRequest {
            name: self.export.clone(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        self.out
            .extend(OptionHeader::with_data(OPT_GO, &go.to_bytes()));
        self.state = State::ReplyHeader;
    }

    fn on_starttls_reply(&mut self, h: OptionReplyHeader, body: &[u8]) -> Result<(), ClientError> {
        if h.option != OPT_STARTTLS {
            return Err(ClientError::Protocol(format!(
                "reply to option {} while waiting for NBD_OPT_STARTTLS",
                h.option
            )));
        }
        self.awaiting_starttls = false;
        match h.kind {
            REP_ACK => {
                self.state = State::Upgrade;
                Ok(())
            }
            k if is_error_reply(k) => Err(ClientError::NoTls {
                message: String::from_utf8_lossy(body).trim().to_owned(),
            }),
            k => Err(ClientError::Protocol(format!(
                "unexpected reply type {k:#x} to NBD_OPT_STARTTLS"
            ))),
        }
    }

    fn on_reply_header(&mut self, input: &[u8]) -> Result<(), ClientError> {
        let Some(h) = OptionReplyHeader::from_bytes(input) else {
            return Err(ClientError::BadMagic {
                what: "option reply",
                got: u64::from_bytes(&input[..8]).unwrap_or_default(),
            });
        };
        if h.len > MAX_REPLY_LEN {
            return Err(ClientError::Protocol(format!(
                "option reply of {} bytes (limit {MAX_REPLY_LEN})",
                h.len
            )));
        }
        self.state = State::ReplyBody(h);
        if h.len == 0 {
            // Nothing to read: the body is complete already.
            self.state = State::ReplyHeader;
            return self.on_reply(h, &[]);
        }
        Ok(())
    }

    fn on_reply(&mut self, h: OptionReplyHeader, body: &[u8]) -> Result<(), ClientError> {
        if self.awaiting_starttls {
            return self.on_starttls_reply(h, body);
        }
        if h.option != OPT_GO {
            return Err(ClientError::Protocol(format!(
                "reply to option {} while waiting for NBD_OPT_GO",
                h.option
            )));
        }
        match h.kind {
            REP_ACK => self.finish_go(),
            REP_INFO => self.on_info(body),
            REP_ERR_UNSUP => {
                // A server from before NBD_OPT_GO: fall back to EXPORT_NAME,
                // which ends option haggling (and closes on a bad name).
                self.out.extend(OptionHeader::with_data(
                    OPT_EXPORT_NAME,
                    self.export.as_bytes(),
                ));
                self.state = State::ExportName;
                Ok(())
            }
            k if is_error_reply(k) => Err(self.refusal(k, body)),
            k => Err(ClientError::Protocol(format!(
                "unexpected reply type {k:#x} to NBD_OPT_GO"
            ))),
        }
    }

    fn on_info(&mut self, body: &[u8]) -> Result<(), ClientError> {
        let Some(block) = InfoBlock::from_bytes(body) else {
            let kind = u16::from_bytes(body.get(..2).unwrap_or_default());
            return Err(ClientError::Protocol(match kind {
                Some(INFO_EXPORT) => {
                    format!("NBD_INFO_EXPORT of {} bytes, expected 12", body.len())
                }
                Some(INFO_BLOCK_SIZE) => {
                    format!("NBD_INFO_BLOCK_SIZE of {} bytes, expected 14", body.len())
                }
                _ => "malformed INFO reply".into(),
            }));
        };
        match block {
            InfoBlock::Export { size, flags } => self.export_info = Some((size, flags)),
            InfoBlock::BlockSize {
                min,
                preferred,
                max,
            } => self.blocks = Some((min, preferred, max)),
            _ => {} // NAME, DESCRIPTION, or newer: not needed
        }
        Ok(())
    }

    fn finish_go(&mut self) -> Result<(), ClientError> {
        let (size, flags) = self.export_info.ok_or_else(|| {
            ClientError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
        })?;
        let (min_block, preferred_block, max_block) = self.blocks.unwrap_or(DEFAULT_BLOCKS);
        if min_block == 0
            || !min_block.is_power_of_two()
            || preferred_block < min_block
            || max_block < min_block
        {
            return Err(ClientError::Protocol(format!(
                "nonsensical block sizes min {min_block} preferred {preferred_block} max {max_block}"
            )));
        }
        self.done(ClientNegotiated {
            size,
            flags,
            min_block,
            preferred_block,
            max_block,
        });
        Ok(())
    }

    fn on_export_name(&mut self, input: &[u8]) -> Result<(), ClientError> {
        let r = ExportNameReply::from_bytes(input).expect("length checked");
        let (min_block, preferred_block, max_block) = DEFAULT_BLOCKS;
        self.done(ClientNegotiated {
            size: r.size,
            flags: r.flags,
            min_block,
            preferred_block,
            max_block,
        });
        Ok(())
    }

    fn done(&mut self, n: ClientNegotiated) {
        self.negotiated = Some(n);
        self.state = State::Done;
    }

    fn refusal(&self, code: u32, body: &[u8]) -> ClientError {
        let message = String::from_utf8_lossy(body).trim().to_owned();
        let name = self.export.clone();
        let reason = match code {
            REP_ERR_UNKNOWN => return ClientError::NoSuchExport { name, message },
            REP_ERR_POLICY => "denied by server policy",
            REP_ERR_INVALID => "invalid request",
            REP_ERR_PLATFORM => "not supported on the server's platform",
            REP_ERR_TLS_REQD => "the server requires TLS",
            REP_ERR_SHUTDOWN => "the server is shutting down",
            REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
            REP_ERR_TOO_BIG => "request too big",
            _ => "unknown error",
        };
        ClientError::Refused {
            name,
            code,
            reason,
            message,
        }
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
