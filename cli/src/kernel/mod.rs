//! Kernel attach for `nbd-cli map`/`unmap`: the client side of the NBD
//! handshake ([`negotiate`]) and the kernel's generic-netlink NBD interface
//! ([`netlink`]).
//!
//! A map is: open N connections with [`negotiate::connect_export_many`],
//! build [`netlink::ConnectParams::from_negotiated`], call
//! [`netlink::connect`], then drop the sockets (the kernel holds its own
//! references). A dead device (server restarted) is reattached with
//! [`netlink::reconfigure`] and fresh sockets; unmap is
//! [`netlink::disconnect`].

pub mod ktls;
pub mod negotiate;
pub mod netlink;

pub use negotiate::{
    connect_export, connect_export_many, connect_export_with, connect_unix_many, negotiate,
    BoundSockets, NegotiateError, Negotiated,
};
pub use netlink::{
    backend_id, connect, devices, disconnect, reconfigure, status, ConnectParams, DeviceStatus,
    NetlinkError, ReconfigureParams,
};
