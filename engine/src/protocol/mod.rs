//! The NBD protocol, sans-IO: bytes in, bytes out, no sockets. Modelled on
//! quinn-proto and rustls's codec so that every state is unit-testable and
//! the parsers are fuzzable. Every NBD magic and layout lives here and only
//! here: [`codec`] and [`msgs`] are the one codec, [`handshake`] and
//! [`client`] the two sides of negotiation, [`transmission`] the server's
//! transmission phase.

pub mod client;
pub mod codec;
pub mod consts;
pub mod errno;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod handshake;
pub mod msgs;
pub mod reply;
pub mod request;
pub mod transmission;

pub use client::{ClientError, ClientHandshake, ClientNegotiated};
pub use errno::Errno;
pub use handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeError, Negotiated, TlsPolicy};
pub use msgs::{BadMagic, HeaderMode, RequestHeader};
pub use reply::{encode_extents, Extent, ReplyHeader, ReplyStyle};
pub use request::{validate, Command, Session, MAX_PAYLOAD};
pub use transmission::Transmission;
