//! The NBD protocol, sans-IO: bytes in, bytes out, no sockets. Modelled on
//! quinn-proto and rustls's codec so that every state is unit-testable and
//! the parsers are fuzzable.

pub mod consts;
pub mod errno;
#[cfg(test)]
mod fuzz_smoke_tests;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;

pub use errno::Errno;
pub use handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeError, Negotiated};
pub use reply::{encode_extents, Extent, ReplyHeader};
pub use request::{validate, BadMagic, Command, RequestHeader, Session, MAX_PAYLOAD};
