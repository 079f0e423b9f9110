//! The kernel's generic-netlink "nbd" family (linux/nbd-netlink.h, version 1):
//! attach handshaken sockets to `/dev/nbdX`, detach, reattach after the
//! server died (RECONFIGURE), and ask for status. Through neli.
//!
//! Every call opens its own netlink socket: these are rare operator actions.
//! CONNECT, DISCONNECT and RECONFIGURE need CAP_SYS_ADMIN; STATUS does not.

use super::negotiate::Negotiated;
use nbd_engine::protocol::consts as c;
use neli::{
    consts::{nl::NlmF, socket::NlFamily},
    err::RouterError,
    genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder},
    nl::NlPayload,
    router::synchronous::NlRouter,
    types::{Buffer, GenlBuffer},
    utils::Groups,
    Size, ToBytes,
};
use std::fmt;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Generic netlink family name and version of the kernel's NBD interface.
pub const FAMILY: &str = "nbd";
pub const VERSION: u8 = 1;
/// The family's multicast group, where LINK_DEAD events are sent.
pub const MCAST_GROUP: &str = "nbd_mc_group";

/// `NBD_CMD_*` of the netlink family.
pub mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
    pub const LINK_DEAD: u8 = 4;
    pub const STATUS: u8 = 5;
}

/// `NBD_ATTR_*` and the nested attribute numbers.
pub mod attr {
    pub const INDEX: u16 = 1;
    pub const SIZE_BYTES: u16 = 2;
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    pub const TIMEOUT: u16 = 4;
    pub const SERVER_FLAGS: u16 = 5;
    pub const CLIENT_FLAGS: u16 = 6;
    pub const SOCKETS: u16 = 7;
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const DEVICE_LIST: u16 = 9;
    pub const BACKEND_IDENTIFIER: u16 = 10;
    /// In SOCKETS: one `SOCK_ITEM` per socket, holding `SOCK_FD` (u32).
    pub const SOCK_ITEM: u16 = 1;
    pub const SOCK_FD: u16 = 1;
    /// In DEVICE_LIST: one `DEVICE_ITEM` per device, holding `DEVICE_INDEX`
    /// (u32) and `DEVICE_CONNECTED` (u8).
    pub const DEVICE_ITEM: u16 = 1;
    pub const DEVICE_INDEX: u16 = 1;
    pub const DEVICE_CONNECTED: u16 = 2;
}

/// `NBD_CFLAG_*` client flags.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
pub const CFLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

/// An attach request. The sockets must already be in transmission phase
/// (see [`super::negotiate`]); the kernel takes its own reference to each, so
/// the caller closes its descriptors once [`connect`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// `Some(n)` for `/dev/nbdn`; `None` lets the kernel pick a free device.
    pub index: Option<u32>,
    pub size_bytes: u64,
    /// Logical block size: a power of two from 512 to 4096.
    pub block_size: u64,
    /// Transmission flags from the handshake, plus `NBD_FLAG_READ_ONLY` for
    /// a read-only mapping.
    pub server_flags: u64,
    /// Per-request timeout; `None` keeps the kernel's default (30 s).
    pub timeout_secs: Option<u64>,
    /// How long IO waits for a RECONFIGURE once every connection is dead;
    /// `None` (or 0) fails IO at once.
    pub dead_conn_timeout_secs: Option<u64>,
    /// Cookie shown in `/sys/block/nbdX/backend`; RECONFIGURE must present
    /// the same one. Empty: none is set.
    pub backend_id: String,
    pub sockets: Vec<RawFd>,
    /// `NBD_CFLAG_*`. `DISCONNECT_ON_CLOSE` is refused: our sockets are
    /// closed right after connect, and the device must outlive its openers.
    pub client_flags: u64,
}

impl ConnectParams {
    /// Parameters for an export as negotiated; `read_only` forces a
    /// read-only device even on a writable export.
    pub fn from_negotiated(
        info: &Negotiated,
        read_only: bool,
        backend_id: impl Into<String>,
        sockets: Vec<RawFd>,
    ) -> Self {
        let mut server_flags = u64::from(info.flags);
        if read_only {
            server_flags |= u64::from(c::TF_READ_ONLY);
        }
        ConnectParams {
            index: None,
            size_bytes: info.size,
            block_size: u64::from(info.kernel_block_size()),
            server_flags,
            timeout_secs: None,
            dead_conn_timeout_secs: None,
            backend_id: backend_id.into(),
            sockets,
            client_flags: 0,
        }
    }
}

/// A reattach of a connected device whose connections died (server crash or
/// restart): each socket replaces one connection the kernel has marked dead.
/// Sockets beyond the number of dead connections are ignored by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconfigureParams {
    pub index: u32,
    pub sockets: Vec<RawFd>,
    pub timeout_secs: Option<u64>,
    pub dead_conn_timeout_secs: Option<u64>,
    /// Must equal the cookie given at connect; checked here against sysfs
    /// first, and by the kernel.
    pub backend_id: String,
    /// A new size, e.g. after the export grew.
    pub size_bytes: Option<u64>,
}

/// One device as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    /// The device holds a configuration (it is attached, possibly with dead
    /// connections awaiting RECONFIGURE).
    pub connected: bool,
}

/// The operation that failed, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Connect,
    Disconnect,
    Reconfigure,
    Status,
    Events,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Connect => "nbd connect",
            Op::Disconnect => "nbd disconnect",
            Op::Reconfigure => "nbd reconfigure",
            Op::Status => "nbd status",
            Op::Events => "nbd link-dead events",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("the nbd kernel module is not loaded (modprobe nbd)")]
    ModuleNotLoaded,
    #[error("{op}: permission denied: attaching NBD devices needs root (CAP_SYS_ADMIN)")]
    PermissionDenied { op: Op },
    #[error("{op}: {device} is busy (already connected, or still held open)")]
    Busy { op: Op, device: String },
    #[error("{op}: no such device {device}")]
    NoSuchDevice { op: Op, device: String },
    #[error("{op}: {device} is not connected")]
    NotConnected { op: Op, device: String },
    #[error("{op}: {device} serves backend {found:?}, not {expected:?}")]
    BackendMismatch {
        op: Op,
        device: String,
        expected: String,
        found: String,
    },
    #[error("{op}: the kernel refused the request as invalid (EINVAL): {hint} (see dmesg)")]
    Invalid { op: Op, hint: String },
    #[error("{op}: {message}")]
    InvalidParams { op: Op, message: String },
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*.errno))]
    Kernel { op: Op, errno: i32 },
    #[error("{op}: netlink: {detail}")]
    Netlink { op: Op, detail: String },
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// `/dev/nbdN`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index of `/dev/nbdN`, `nbdN` or `N`.
pub fn parse_device(dev: &str) -> Option<u32> {
    let n = dev.strip_prefix("/dev/").unwrap_or(dev);
    let n = n.strip_prefix("nbd").unwrap_or(n);
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The cookie the device was connected with (`/sys/block/nbdN/backend`);
/// `None` when the device is not connected or was connected without one.
pub fn backend_id(index: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).ok()?;
    let s = s.strip_suffix('\n').unwrap_or(&s);
    (!s.is_empty()).then(|| s.to_owned())
}

/// Attaches `p.sockets` to a device and returns its index.
pub fn connect(p: &ConnectParams) -> Result<u32> {
    let op = Op::Connect;
    let bad = |message: String| Err(NetlinkError::InvalidParams { op, message });
    if p.sockets.is_empty() {
        return bad("no sockets to attach".into());
    }
    if p.size_bytes == 0 {
        return bad("the export size is 0".into());
    }
    if !(512..=4096).contains(&p.block_size) || !p.block_size.is_power_of_two() {
        return bad(format!(
            "block size {} is not a power of two from 512 to 4096",
            p.block_size
        ));
    }
    if p.client_flags & CFLAG_DISCONNECT_ON_CLOSE != 0 {
        return bad("DISCONNECT_ON_CLOSE would detach the device when its sockets close".into());
    }
    if p.sockets.len() > 1 && p.server_flags & u64::from(c::TF_CAN_MULTI_CONN) == 0 {
        return bad(format!(
            "{} connections, but the server does not allow multi-conn",
            p.sockets.len()
        ));
    }
    let nbd = Nbd::open(op)?;
    let replies = nbd
        .call(op, cmd::CONNECT, connect_attrs(p).map_err(internal(op))?)
        .map_err(|e| refine(e, p.index))?;
    for r in &replies {
        if let Ok(i) = r
            .attrs()
            .get_attr_handle()
            .get_attr_payload_as::<u32>(attr::INDEX)
        {
            return Ok(i);
        }
    }
    Err(NetlinkError::Netlink {
        op,
        detail: "the kernel's reply carries no device index".into(),
    })
}

/// Detaches `/dev/nbdN`: the kernel sends NBD_CMD_DISC on each connection
/// and drops them; the device is free once its last opener closes it (see
/// [`wait_disconnected`]). Detaching a device that is not connected
/// succeeds.
pub fn disconnect(index: u32) -> Result<()> {
    let op = Op::Disconnect;
    let nbd = Nbd::open(op)?;
    let attrs = [attr_of(attr::INDEX, index)]
        .into_iter()
        .collect::<std::result::Result<GenlBuffer<u16, Buffer>, _>>()
        .map_err(internal(op))?;
    match nbd.call(op, cmd::DISCONNECT, attrs) {
        Ok(_) => Ok(()),
        Err(NetlinkError::Kernel { errno, .. }) if errno == libc::EINVAL => {
            Err(NetlinkError::NoSuchDevice {
                op,
                device: dev(index),
            })
        }
        Err(e) => Err(e),
    }
}

/// Reattaches a connected device with fresh sockets (NBD_CMD_RECONFIGURE),
/// after its server died or restarted. Checks the cookie first so a reattach
/// never lands on the wrong backstore.
pub fn reconfigure(p: &ReconfigureParams) -> Result<()> {
    let op = Op::Reconfigure;
    // A size change alone needs no sockets (the kernel only requires a
    // configured device), as rbd-nbd's resize does.
    if p.sockets.is_empty() && p.size_bytes.is_none() {
        return Err(NetlinkError::InvalidParams {
            op,
            message: "no sockets to attach".into(),
        });
    }
    let device = dev(p.index);
    match status(p.index)? {
        None => return Err(NetlinkError::NoSuchDevice { op, device }),
        Some(false) => return Err(NetlinkError::NotConnected { op, device }),
        Some(true) => {}
    }
    let found = backend_id(p.index).unwrap_or_default();
    if found != p.backend_id {
        return Err(NetlinkError::BackendMismatch {
            op,
            device,
            expected: p.backend_id.clone(),
            found,
        });
    }
    let nbd = Nbd::open(op)?;
    match nbd.call(
        op,
        cmd::RECONFIGURE,
        reconfigure_attrs(p).map_err(internal(op))?,
    ) {
        Ok(_) => Ok(()),
        Err(NetlinkError::Kernel { errno, .. }) if errno == libc::EINVAL => {
            Err(NetlinkError::Invalid {
                op,
                hint: format!(
                    "{device} was not connected through netlink, or its backend does not match"
                ),
            })
        }
        Err(e) => Err(e),
    }
}

/// Whether `/dev/nbdN` holds a configuration; `None` if there is no such
/// device.
pub fn status(index: u32) -> Result<Option<bool>> {
    Ok(query(Some(index))?
        .into_iter()
        .find(|d| d.index == index)
        .map(|d| d.connected))
}

/// Every NBD device the kernel has, in index order.
pub fn devices() -> Result<Vec<DeviceStatus>> {
    let mut all = query(None)?;
    all.sort_by_key(|d| d.index);
    Ok(all)
}

/// Polls [`status`] until `/dev/nbdN` is free or `timeout` passes; true if it
/// is free.
pub fn wait_disconnected(index: u32, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if status(index)? != Some(true) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Subscribes to the kernel's LINK_DEAD events: `on_dead` gets the index of
/// every device that loses a connection, on a thread of its own, until it
/// returns false or the subscription breaks.
pub fn link_dead_events(mut on_dead: impl FnMut(u32) -> bool + Send + 'static) -> Result<()> {
    let op = Op::Events;
    let (nbd, mut events) = Nbd::connect(op)?;
    let group = nbd
        .router
        .resolve_nl_mcast_group(FAMILY, MCAST_GROUP)
        .map_err(|e| router_error(op, e))?;
    nbd.router
        .add_mcast_membership(Groups::new_groups(&[group]))
        .map_err(|e| router_error(op, e))?;
    std::thread::Builder::new()
        .name("nbd-link-dead".into())
        .spawn(move || {
            let _subscribed = nbd; // the socket lives as long as the thread
            while let Some(Ok(m)) = events.next_typed::<u16, Reply>() {
                let NlPayload::Payload(p) = m.nl_payload() else {
                    continue;
                };
                if *p.cmd() != cmd::LINK_DEAD {
                    continue;
                }
                let index = p
                    .attrs()
                    .get_attr_handle()
                    .get_attr_payload_as::<u32>(attr::INDEX);
                if let Ok(i) = index {
                    if !on_dead(i) {
                        return;
                    }
                }
            }
        })
        .map_err(|e| internal(op)(format!("cannot start the event thread: {e}")))?;
    Ok(())
}

fn query(index: Option<u32>) -> Result<Vec<DeviceStatus>> {
    let op = Op::Status;
    let nbd = Nbd::open(op)?;
    let attrs = index
        .map(|i| attr_of(attr::INDEX, i))
        .into_iter()
        .collect::<std::result::Result<GenlBuffer<u16, Buffer>, _>>()
        .map_err(internal(op))?;
    let mut out = Vec::new();
    for r in nbd.call(op, cmd::STATUS, attrs)? {
        out.extend(parse_device_list(r.attrs()).map_err(internal(op))?);
    }
    Ok(out)
}

/// DEVICE_LIST { DEVICE_ITEM { DEVICE_INDEX u32, DEVICE_CONNECTED u8 }... }
fn parse_device_list(
    attrs: &GenlBuffer<u16, Buffer>,
) -> std::result::Result<Vec<DeviceStatus>, String> {
    let handle = attrs.get_attr_handle();
    let Some(list) = handle.get_attribute(attr::DEVICE_LIST) else {
        return Ok(Vec::new());
    };
    let list = list.get_attr_handle::<u16>().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for item in list.iter() {
        if *item.nla_type().nla_type() != attr::DEVICE_ITEM {
            continue;
        }
        let h = item.get_attr_handle::<u16>().map_err(|e| e.to_string())?;
        let index = h
            .get_attr_payload_as::<u32>(attr::DEVICE_INDEX)
            .map_err(|e| e.to_string())?;
        let connected = h
            .get_attr_payload_as::<u8>(attr::DEVICE_CONNECTED)
            .map(|b| b != 0)
            .unwrap_or(false);
        out.push(DeviceStatus { index, connected });
    }
    Ok(out)
}

type Attr = Nlattr<u16, Buffer>;

fn attr_of<P: Size + ToBytes>(kind: u16, payload: P) -> std::result::Result<Attr, String> {
    NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(kind)
                .build()
                .map_err(|e| e.to_string())?,
        )
        .nla_payload(payload)
        .build()
        .map_err(|e| e.to_string())
}

/// SOCKETS { SOCK_ITEM { SOCK_FD u32 }... }
fn sockets_attr(fds: &[RawFd]) -> std::result::Result<Attr, String> {
    let mut socks = attr_of(attr::SOCKETS, Vec::<u8>::new())?;
    for &fd in fds {
        let fd = u32::try_from(fd).map_err(|_| format!("bad socket descriptor {fd}"))?;
        let item = attr_of(attr::SOCK_ITEM, Vec::<u8>::new())?
            .nest(&attr_of(attr::SOCK_FD, fd)?)
            .map_err(|e| e.to_string())?;
        socks = socks.nest(&item).map_err(|e| e.to_string())?;
    }
    Ok(socks)
}

fn connect_attrs(p: &ConnectParams) -> std::result::Result<GenlBuffer<u16, Buffer>, String> {
    let mut a = vec![
        attr_of(attr::SIZE_BYTES, p.size_bytes)?,
        attr_of(attr::BLOCK_SIZE_BYTES, p.block_size)?,
        attr_of(attr::SERVER_FLAGS, p.server_flags)?,
    ];
    if let Some(i) = p.index {
        a.push(attr_of(attr::INDEX, i)?);
    }
    if let Some(t) = p.timeout_secs {
        a.push(attr_of(attr::TIMEOUT, t)?);
    }
    if let Some(t) = p.dead_conn_timeout_secs {
        a.push(attr_of(attr::DEAD_CONN_TIMEOUT, t)?);
    }
    if p.client_flags != 0 {
        a.push(attr_of(attr::CLIENT_FLAGS, p.client_flags)?);
    }
    if !p.backend_id.is_empty() {
        a.push(attr_of(attr::BACKEND_IDENTIFIER, p.backend_id.as_str())?);
    }
    a.push(sockets_attr(&p.sockets)?);
    Ok(a.into_iter().collect())
}

fn reconfigure_attrs(
    p: &ReconfigureParams,
) -> std::result::Result<GenlBuffer<u16, Buffer>, String> {
    let mut a = vec![attr_of(attr::INDEX, p.index)?];
    if let Some(s) = p.size_bytes {
        a.push(attr_of(attr::SIZE_BYTES, s)?);
    }
    if let Some(t) = p.timeout_secs {
        a.push(attr_of(attr::TIMEOUT, t)?);
    }
    if let Some(t) = p.dead_conn_timeout_secs {
        a.push(attr_of(attr::DEAD_CONN_TIMEOUT, t)?);
    }
    if !p.backend_id.is_empty() {
        a.push(attr_of(attr::BACKEND_IDENTIFIER, p.backend_id.as_str())?);
    }
    if !p.sockets.is_empty() {
        a.push(sockets_attr(&p.sockets)?);
    }
    Ok(a.into_iter().collect())
}

fn dev(index: u32) -> String {
    device_path(index).display().to_string()
}

fn internal(op: Op) -> impl Fn(String) -> NetlinkError {
    move |detail| NetlinkError::Netlink { op, detail }
}

/// Turns a bare errno from CONNECT into what it means there.
fn refine(e: NetlinkError, index: Option<u32>) -> NetlinkError {
    let op = Op::Connect;
    match e {
        NetlinkError::Kernel { errno, .. } if errno == libc::EBUSY => NetlinkError::Busy {
            op,
            device: index.map_or_else(|| "the device".to_owned(), dev),
        },
        NetlinkError::Kernel { errno, .. } if errno == libc::EINVAL => NetlinkError::Invalid {
            op,
            hint: "check the size, the block size, the sockets (connected, in transmission \
                   phase) and multi-conn"
                .into(),
        },
        e => e,
    }
}

/// A netlink socket bound to the nbd family.
struct Nbd {
    router: NlRouter,
    family: u16,
}

type Reply = Genlmsghdr<u8, u16>;
type Multicast = neli::router::synchronous::NlRouterReceiverHandle<u16, Reply>;

impl Nbd {
    fn open(op: Op) -> Result<Nbd> {
        Ok(Self::connect(op)?.0)
    }

    /// The socket, and the receiver its multicast messages arrive on.
    fn connect(op: Op) -> Result<(Nbd, Multicast)> {
        let (router, multicast) = NlRouter::connect(NlFamily::Generic, None, Groups::empty())
            .map_err(|e| NetlinkError::Netlink {
                op,
                detail: format!("cannot open a generic netlink socket: {e}"),
            })?;
        let family = match router.resolve_genl_family(FAMILY) {
            Ok(id) => id,
            Err(RouterError::Nlmsgerr(e)) if -*e.error() == libc::ENOENT => {
                return Err(NetlinkError::ModuleNotLoaded)
            }
            // neli's own "not found" when the reply lacks an id.
            Err(RouterError::Msg(_)) => return Err(NetlinkError::ModuleNotLoaded),
            Err(e) => return Err(router_error(op, e)),
        };
        Ok((Nbd { router, family }, multicast))
    }

    /// Sends one request (with ACK) and collects the replies' payloads.
    fn call(&self, op: Op, command: u8, attrs: GenlBuffer<u16, Buffer>) -> Result<Vec<Reply>> {
        let msg = GenlmsghdrBuilder::<u8, u16>::default()
            .cmd(command)
            .version(VERSION)
            .attrs(attrs)
            .build()
            .map_err(|e| internal(op)(e.to_string()))?;
        let recv = self
            .router
            .send::<_, _, u16, Reply>(self.family, NlmF::ACK, NlPayload::Payload(msg))
            .map_err(|e| router_error(op, e))?;
        let mut out = Vec::new();
        for m in recv {
            let m = m.map_err(|e| router_error(op, e))?;
            if let NlPayload::Payload(p) = m.nl_payload() {
                out.push(p.clone());
            }
        }
        Ok(out)
    }
}

fn router_error<T: fmt::Debug, P: fmt::Debug>(op: Op, e: RouterError<T, P>) -> NetlinkError {
    match e {
        RouterError::Nlmsgerr(e) => {
            let errno = -*e.error();
            if errno == libc::EPERM || errno == libc::EACCES {
                NetlinkError::PermissionDenied { op }
            } else {
                NetlinkError::Kernel { op, errno }
            }
        }
        e => NetlinkError::Netlink {
            op,
            detail: e.to_string(),
        },
    }
}

#[cfg(test)]
#[path = "netlink_tests.rs"]
mod tests;
