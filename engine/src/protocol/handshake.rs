//! Fixed-newstyle handshake as a sans-IO state machine.
//!
//! The driver asks [`Handshake::want`] how many bytes to read, hands exactly
//! that many to [`Handshake::receive`], and sends whatever
//! [`Handshake::take_output`] returns. No sockets, so every state is unit-tested
//! and fuzzed.

use super::codec::Codec;
use super::consts::*;
use super::msgs::{
    ExportNameReply, Greeting, HeaderMode, InfoBlock, InfoRequest, MetaContextReply,
    MetaContextRequest, OptionHeader, OptionReplyHeader, ServerEntry,
};
use thiserror::Error;

/// Longest option payload we accept. Real options are far smaller (a name is
/// at most 4096 bytes); anything bigger is refused without buffering it.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options per handshake before we give up on the client.
pub const MAX_OPTIONS: u32 = 256;

/// What the handshake needs to know about an export. Opening the backend
/// waits until the handshake is over (nbdkit CVE-2019-14850).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags, HAS_FLAGS included.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// Export lookup for the handshake.
pub trait ExportCatalog {
    /// The export a client names; "" is the default export, if there is one.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// (name, description) for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// Outcome of a finished handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// Context id for base:allocation, if the client selected it.
    pub base_allocation: Option<u32>,
    pub no_zeroes: bool,
    /// Extended (32-byte, 64-bit length) headers, which imply structured replies.
    pub headers: HeaderMode,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("client sent unknown client flags {0:#x}")]
    BadClientFlags(u32),
    #[error("client does not speak fixed newstyle")]
    NotFixedNewstyle,
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option length {0} exceeds the limit")]
    OptionTooBig(u32),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameAfterExtended,
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client aborted the handshake")]
    Aborted,
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS")]
    TlsRequired,
    #[error("handshake is over")]
    Finished,
    #[error("wrong input size: wanted {want}, got {got}")]
    WrongInput { want: usize, got: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: u32 },
    Done,
    Closed,
}

/// What the server offers on STARTTLS (the NBD spec's NOTLS, SELECTIVETLS
/// with no TLS-only export, and FORCEDTLS modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    #[default]
    Off,
    /// TLS if the client asks; plain clients are served too.
    On,
    /// Nothing but STARTTLS and ABORT before TLS.
    Require,
}

/// The server side of one handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    out: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    headers: HeaderMode,
    /// Resolved export name base:allocation was selected for.
    meta_export: Option<String>,
    options_seen: u32,
    shutting_down: bool,
    /// NBD_OPT_LIST names the exports; off, it reveals nothing.
    list_exports: bool,
    negotiated: Option<Negotiated>,
    tls: TlsPolicy,
    /// TLS is up (the driver finished the TLS handshake after our ACK).
    tls_active: bool,
    /// An ACK to STARTTLS is in the output: the driver must send it, then
    /// upgrade before it reads another byte.
    starttls: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A new handshake whose output already holds the server greeting.
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(256);
        Greeting::newstyle(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).encode(&mut out);
        Handshake {
            state: State::ClientFlags,
            out,
            no_zeroes: false,
            structured: false,
            headers: HeaderMode::Compact,
            meta_export: None,
            options_seen: 0,
            shutting_down: false,
            list_exports: true,
            negotiated: None,
            tls: TlsPolicy::Off,
            tls_active: false,
            starttls: false,
        }
    }

    /// Whether NBD_OPT_LIST names the exports (export names are host paths
    /// for file backstores). Off, LIST gets NBD_REP_ERR_POLICY. On by
    /// default here; the runner turns it on only with `--list-exports`.
    pub fn list_exports(mut self, on: bool) -> Self {
        self.list_exports = on;
        self
    }

    pub fn tls(mut self, policy: TlsPolicy) -> Self {
        self.tls = policy;
        self
    }

    /// True once after STARTTLS was accepted: send the output in plain
    /// text, then run the TLS handshake. Bytes the client sent after
    /// STARTTLS and before TLS must be thrown away, never parsed as options
    /// (they were not protected: CVE-2021-3716).
    pub fn take_starttls(&mut self) -> bool {
        std::mem::take(&mut self.starttls)
    }

    /// Whether options are being read over TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// From now on every option is answered with NBD_REP_ERR_SHUTDOWN.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// Bytes the state machine needs next; 0 once finished or closed.
    pub fn want(&self) -> usize {
        match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => OptionHeader::LEN,
            State::OptionData { len, .. } => len as usize,
            State::Done | State::Closed => 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Bytes to send to the client now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The result of a finished handshake.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Feeds exactly [`want`](Self::want) bytes. An error means: send the
    /// output, then close the connection.
    pub fn receive(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<(), HandshakeError> {
        let want = self.want();
        if matches!(self.state, State::Done | State::Closed) {
            return Err(HandshakeError::Finished);
        }
        if input.len() != want {
            return Err(HandshakeError::WrongInput {
                want,
                got: input.len(),
            });
        }
        let result = match self.state {
            State::ClientFlags => self.on_client_flags(input),
            State::OptionHeader => self.on_option_header(input),
            State::OptionData { option, .. } => {
                self.state = State::OptionHeader;
                self.on_option(option, input, catalog)
            }
            State::Done | State::Closed => unreachable!(),
        };
        if result.is_err() {
            self.state = State::Closed;
        }
        result
    }

    fn on_client_flags(&mut self, input: &[u8]) -> Result<(), HandshakeError> {
        let flags = u32::from_bytes(input).ok_or(HandshakeError::WrongInput {
            want: 4,
            got: input.len(),
        })?;
        if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
            return Err(HandshakeError::BadClientFlags(flags));
        }
        if flags & CLIENT_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle);
        }
        self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
        self.state = State::OptionHeader;
        Ok(())
    }

    fn on_option_header(&mut self, input: &[u8]) -> Result<(), HandshakeError> {
        let Some(OptionHeader { option, len }) = OptionHeader::from_bytes(input) else {
            let magic = u64::from_bytes(&input[..8]).unwrap_or_default();
            return Err(HandshakeError::BadOptionMagic(magic));
        };
        self.options_seen += 1;
        if self.options_seen > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions);
        }
        if len > MAX_OPTION_LEN {
            // Answer, then close: skipping gigabytes would only feed the attacker.
            // EXPORT_NAME has no error reply: the only refusal is hanging up.
            if option != OPT_EXPORT_NAME {
                self.reply_error(option, REP_ERR_TOO_BIG, "option too long");
            }
            return Err(HandshakeError::OptionTooBig(len));
        }
        self.state = State::OptionData { option, len };
        Ok(())
    }

    fn on_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<(), HandshakeError> {
        if self.shutting_down && option == OPT_EXPORT_NAME {
            // No option reply can answer EXPORT_NAME; hang up instead.
            return Err(HandshakeError::ShuttingDown);
        }
        if self.shutting_down && option != OPT_ABORT {
            self.reply_error(option, REP_ERR_SHUTDOWN, "server is shutting down");
            return Ok(());
        }
        if self.tls == TlsPolicy::Require && !self.tls_active {
            match option {
                OPT_STARTTLS | OPT_ABORT => {}
                // No reply can refuse EXPORT_NAME.
                OPT_EXPORT_NAME => return Err(HandshakeError::TlsRequired),
                _ => {
                    self.reply_error(option, REP_ERR_TLS_REQD, "TLS is required on this server");
                    return Ok(());
                }
            }
        }
        match option {
            OPT_EXPORT_NAME => self.on_export_name(data, catalog),
            OPT_ABORT => {
                self.reply(option, REP_ACK, &[]);
                Err(HandshakeError::Aborted)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "LIST takes no data");
                    return Ok(());
                }
                if !self.list_exports {
                    self.reply_error(
                        option,
                        REP_ERR_POLICY,
                        "export listing is off on this server",
                    );
                    return Ok(());
                }
                for (name, _) in catalog.list() {
                    let entry = ServerEntry {
                        name,
                        description: String::new(),
                    };
                    self.reply(option, REP_SERVER, &entry.to_bytes());
                }
                self.reply(option, REP_ACK, &[]);
                Ok(())
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
                } else if self.headers == HeaderMode::Extended {
                    // Extended headers cannot be downgraded.
                    self.reply_error(
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
                Ok(())
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.reply_error(option, REP_ERR_INVALID, "EXTENDED_HEADERS takes no data");
                } else {
                    self.headers = HeaderMode::Extended;
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]);
                }
                Ok(())
            }
            OPT_INFO | OPT_GO => self.on_info_or_go(option, data, catalog),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.on_meta_context(option, data, catalog);
                Ok(())
            }
            OPT_STARTTLS => {
                self.on_starttls(data);
                Ok(())
            }
            _ => {
                self.reply_error(option, REP_ERR_UNSUP, "unsupported option");
                Ok(())
            }
        }
    }

    fn on_starttls(&mut self, data: &[u8]) {
        let option = OPT_STARTTLS;
        if self.tls == TlsPolicy::Off {
            self.reply_error(option, REP_ERR_POLICY, "TLS is off on this server");
        } else if !data.is_empty() {
            self.reply_error(option, REP_ERR_INVALID, "STARTTLS takes no data");
        } else if self.tls_active {
            self.reply_error(option, REP_ERR_INVALID, "TLS is already negotiated");
        } else {
            self.reply(option, REP_ACK, &[]);
            // Nothing negotiated in the clear survives the upgrade.
            self.structured = false;
            self.headers = HeaderMode::Compact;
            self.meta_export = None;
            self.tls_active = true;
            self.starttls = true;
        }
    }

    fn on_export_name(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<(), HandshakeError> {
        if self.headers == HeaderMode::Extended {
            return Err(HandshakeError::ExportNameAfterExtended);
        }
        let name = String::from_utf8_lossy(data).into_owned();
        // The spec leaves no way to refuse EXPORT_NAME but to hang up.
        let Some(export) = (data.len() <= MAX_STRING)
            .then(|| catalog.lookup(&name))
            .flatten()
        else {
            return Err(HandshakeError::UnknownExport(name));
        };
        ExportNameReply {
            size: export.size,
            flags: export.flags,
        }
        .put(&mut self.out, self.no_zeroes);
        self.finish(export);
        Ok(())
    }

    fn on_info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<(), HandshakeError> {
        let Some(InfoRequest { name, infos }) = InfoRequest::from_bytes(data) else {
            self.reply_error(option, REP_ERR_INVALID, "malformed INFO/GO request");
            return Ok(());
        };
        let Some(mut export) = catalog.lookup(&name) else {
            self.reply_error(option, REP_ERR_UNKNOWN, "no such export");
            return Ok(());
        };
        if self.headers == HeaderMode::Extended {
            export.flags |= TF_BLOCK_STATUS_PAYLOAD;
        }
        self.info(
            option,
            InfoBlock::Export {
                size: export.size,
                flags: export.flags,
            },
        );
        // Each kind once: a client repeating NAME thousands of times in one
        // 64 KiB option must not make the server write megabytes.
        let mut seen = Vec::with_capacity(4);
        for req in infos {
            if seen.contains(&req) {
                continue;
            }
            seen.push(req);
            match req {
                INFO_NAME => self.info(option, InfoBlock::Name(export.name.clone())),
                INFO_DESCRIPTION if !export.description.is_empty() => {
                    self.info(option, InfoBlock::Description(export.description.clone()))
                }
                _ => {}
            }
        }
        // Always sent: clients that did not ask may ignore it, and the ones
        // that did (qemu, libnbd, the kernel via nbd-cli) need it.
        self.info(
            option,
            InfoBlock::BlockSize {
                min: export.min_block,
                preferred: export.preferred_block,
                max: export.max_block,
            },
        );
        self.reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.finish(export);
        }
        Ok(())
    }

    fn on_meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        if option == OPT_SET_META_CONTEXT {
            // SET replaces the earlier selection, even when it fails.
            self.meta_export = None;
        }
        if option == OPT_SET_META_CONTEXT && !self.structured {
            self.reply_error(
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let Some(MetaContextRequest { name, queries }) = MetaContextRequest::from_bytes(data)
        else {
            self.reply_error(option, REP_ERR_INVALID, "malformed meta context request");
            return;
        };
        let Some(export) = catalog.lookup(&name) else {
            self.reply_error(option, REP_ERR_UNKNOWN, "no such export");
            return;
        };
        let list = option == OPT_LIST_META_CONTEXT;
        let matches = if queries.is_empty() {
            // LIST with no queries lists all; SET with none selects none.
            list
        } else {
            // "base:" is a wildcard for LIST only; SET must ignore it.
            queries
                .iter()
                .any(|q| q == META_BASE_ALLOCATION || list && q == "base:")
        };
        if option == OPT_SET_META_CONTEXT {
            self.meta_export = matches.then_some(export.name);
        }
        if matches {
            let reply = MetaContextReply {
                // The id in LIST replies is reserved and should be zero.
                id: if list { 0 } else { META_ID_BASE_ALLOCATION },
                name: META_BASE_ALLOCATION.to_owned(),
            };
            self.reply(option, REP_META_CONTEXT, &reply.to_bytes());
        }
        self.reply(option, REP_ACK, &[]);
    }

    fn finish(&mut self, export: ExportInfo) {
        // A context selected for another export does not carry over.
        let base_allocation = (self.structured
            && self.meta_export.as_deref() == Some(export.name.as_str()))
        .then_some(META_ID_BASE_ALLOCATION);
        self.negotiated = Some(Negotiated {
            export,
            structured_replies: self.structured,
            base_allocation,
            no_zeroes: self.no_zeroes,
            headers: self.headers,
        });
        self.state = State::Done;
    }

    fn reply(&mut self, option: u32, kind: u32, body: &[u8]) {
        OptionReplyHeader::put(&mut self.out, option, kind, body);
    }

    fn info(&mut self, option: u32, block: InfoBlock) {
        self.reply(option, REP_INFO, &block.to_bytes());
    }

    fn reply_error(&mut self, option: u32, kind: u32, message: &str) {
        self.reply(option, kind, message.as_bytes());
    }
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
