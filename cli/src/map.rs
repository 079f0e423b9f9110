//! `map` and `unmap`: the runner opens the export, nbd-cli negotiates the IO
//! connections and hands them to the kernel, then tells the runner the
//! device. A dead backstore is reattached to its old device with
//! RECONFIGURE, after checking the device's cookie is ours.

use crate::cli_args::IoRoute;
use crate::kernel::{self, netlink, ConnectParams, ReconfigureParams};
use anyhow::{anyhow, bail, Context, Result};
use nbd_control::client::Client;
use nbd_control::model::Handler;
use nbd_control::wire::{ConnPeer, MapTarget, Request, Response};
use std::os::fd::OwnedFd;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

pub struct MapOptions {
    pub device: Option<String>,
    pub timeout: Option<u64>,
    pub readonly: bool,
    pub connections: Option<u32>,
    /// The runner shard of each connection (None: least-loaded); empty
    /// keeps a reattach's placement, or places all on the least-loaded.
    pub shards: Vec<Option<u32>>,
    pub route: IoRoute,
    /// TLS on the IO route, handed to the kernel's TLS.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// How long a device waits for a reattach once its connections are dead,
/// so IO survives a runner restart instead of failing at once.
const DEAD_CONN_TIMEOUT_SECS: u64 = 600;
const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Maps `key`; returns the device path.
pub fn map(client: &mut Client, handler: Handler, key: &str, opts: &MapOptions) -> Result<String> {
    let target = match client.call(&Request::MapBegin {
        handler,
        key: key.to_owned(),
        shards: opts.shards.clone(),
    })? {
        Response::Map(t) => t,
        other => bail!("unexpected answer to map: {other:?}"),
    };
    match attach(client, &target, opts) {
        Ok(attached) => record(client, key, &attached, &mut |dev| {
            let index = netlink::parse_device(dev).ok_or_else(|| anyhow!("bad device {dev}"))?;
            netlink::disconnect(index).with_context(|| format!("disconnecting {dev}"))
        }),
        Err(e) => {
            let _ = client.call(&Request::MapAbort {
                key: key.to_owned(),
                reason: format!("{e:#}"),
            });
            Err(e)
        }
    }
}

/// The control calls `map` makes after the kernel attach (a seam for tests).
pub trait Control {
    fn call(&mut self, request: &Request) -> Result<Response, nbd_control::client::ClientError>;
}

impl Control for Client {
    fn call(&mut self, request: &Request) -> Result<Response, nbd_control::client::ClientError> {
        Client::call(self, request)
    }
}

/// A device the kernel now serves from the backstore.
pub struct Attached {
    pub device: String,
    /// Connected by this map, not reattached: undoing it loses nothing.
    pub fresh: bool,
    pub connections: u32,
}

/// Tells the runner the device. If it cannot be told (it restarted in
/// between, or refused), a freshly attached device is detached again and
/// the mapping aborted: no device is left serving a backstore the runner
/// does not know is mapped. A reattached device keeps running (detaching
/// it would fail a mounted filesystem) and the next map reattaches it.
pub fn record(
    control: &mut dyn Control,
    key: &str,
    attached: &Attached,
    detach: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<String> {
    let done = control.call(&Request::MapDone {
        key: key.to_owned(),
        device: attached.device.clone(),
        connections: attached.connections,
    });
    let Err(e) = done else {
        return Ok(attached.device.clone());
    };
    let undone = if attached.fresh {
        match detach(&attached.device) {
            Ok(()) => format!("; {} detached again", attached.device),
            Err(d) => format!("; detaching {} failed too: {d:#}", attached.device),
        }
    } else {
        format!(
            "; {} stays attached, map again to record it",
            attached.device
        )
    };
    let _ = control.call(&Request::MapAbort {
        key: key.to_owned(),
        reason: format!("recording the device failed: {e}"),
    });
    bail!(
        "the runner did not record {} for {key}: {e}{undone}",
        attached.device
    )
}

fn io_address(client: &Client, target: &MapTarget) -> String {
    let host = if target.io_host.is_empty() {
        client.endpoint().host().unwrap_or("127.0.0.1").to_owned()
    } else {
        target.io_host.clone()
    };
    if host.contains(':') {
        format!("[{host}]:{}", target.io_port)
    } else {
        format!("{host}:{}", target.io_port)
    }
}

/// The device's IO connections, negotiated. On the runner's own host they
/// go through its unix socket unless told otherwise: plain NBD that the
/// socket's mode authenticates (TLS over loopback protects nothing), and
/// the only route that carries the kernel's swap writes under memory
/// pressure, which TCP over loopback drops (see `Route::Unix`).
pub fn io_connections(
    client: &mut Client,
    target: &MapTarget,
    count: usize,
    opts: &MapOptions,
) -> Result<(Vec<OwnedFd>, kernel::Negotiated)> {
    let unix = Path::new(&target.io_unix);
    let here = !target.io_unix.is_empty() && client.endpoint().is_local() && unix.exists();
    let use_unix = match opts.route {
        IoRoute::Auto => here,
        IoRoute::Tcp => false,
        IoRoute::Unix if here => true,
        IoRoute::Unix => bail!(
            "route unix needs the runner on this host, reached through its unix socket or \
             loopback, and its IO socket ({}) present",
            target.io_unix
        ),
    };
    // The runner places each connection on a shard when it accepts it,
    // so connections with a placement are announced by peer first.
    let placed = !target.placement.is_empty();
    if use_unix {
        if placed {
            let pid = rustix::process::getpid().as_raw_nonzero().get();
            announce(client, target, vec![ConnPeer::Unix { pid }; count])?;
        }
        let (s, info) = kernel::connect_unix_many(unix, &target.key, count, NEGOTIATE_TIMEOUT)
            .with_context(|| format!("connecting to the IO route at {}", unix.display()))?;
        return Ok((s.into_iter().map(OwnedFd::from).collect(), info));
    }
    let addr = io_address(client, target);
    let context = || format!("connecting to the IO route at {addr}");
    let (s, info) = if placed {
        let bound = kernel::BoundSockets::new(&addr, count).with_context(context)?;
        let peers = bound.sources().into_iter().map(ConnPeer::Tcp).collect();
        announce(client, target, peers)?;
        bound.connect(&target.key, NEGOTIATE_TIMEOUT, opts.tls.as_ref())
    } else {
        kernel::connect_export_many(
            &addr,
            &target.key,
            count,
            NEGOTIATE_TIMEOUT,
            opts.tls.as_ref(),
        )
    }
    .with_context(context)?;
    Ok((s.into_iter().map(OwnedFd::from).collect(), info))
}

/// Tells the runner which peers the map's connections come from.
fn announce(client: &mut Client, target: &MapTarget, peers: Vec<ConnPeer>) -> Result<()> {
    match client.call(&Request::MapPeers {
        key: target.key.clone(),
        peers,
    })? {
        Response::Done => Ok(()),
        other => bail!("unexpected answer to placing connections: {other:?}"),
    }
}

fn attach(client: &mut Client, target: &MapTarget, opts: &MapOptions) -> Result<Attached> {
    // A reattach replaces every connection the device has; a new map
    // takes one per shard unless told.
    let count = match (&target.reattach, target.connections) {
        (Some(_), n) if n > 0 => {
            if opts.connections.is_some_and(|c| c != n) {
                bail!(
                    "{} has {n} connections; a reattach replaces exactly those",
                    target.key
                );
            }
            n
        }
        // Connections follow a shard list unless counted.
        _ => opts.connections.unwrap_or(match target.placement.len() {
            0 => target.shards,
            n => n as u32,
        }),
    }
    .max(1) as usize;
    let (sockets, info) = io_connections(client, target, count, opts)?;
    let fds: Vec<_> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    if let Some(dead) = &target.reattach {
        if opts.device.as_deref().is_some_and(|d| d != dead) {
            bail!(
                "{} was mapped to {dead}; reattach it there (or unmap it first)",
                target.key
            );
        }
        let index = netlink::parse_device(dead).ok_or_else(|| anyhow!("bad device {dead}"))?;
        match netlink::backend_id(index) {
            Some(id) if id == target.cookie => {}
            Some(id) => bail!("refusing to reattach: {dead} now serves another backend ({id})"),
            None => bail!(
                "{dead} no longer exists or has no backend; unmap {} and map it again",
                target.key
            ),
        }
        netlink::reconfigure(&ReconfigureParams {
            index,
            sockets: fds,
            timeout_secs: opts.timeout,
            dead_conn_timeout_secs: Some(DEAD_CONN_TIMEOUT_SECS),
            backend_id: target.cookie.clone(),
            // The export may have been resized while the device was dead.
            size_bytes: Some(info.size),
        })
        .with_context(|| format!("reattaching {dead}"))?;
        return Ok(Attached {
            device: dead.clone(),
            fresh: false,
            connections: count as u32,
        });
    }
    let mut params = ConnectParams::from_negotiated(&info, opts.readonly, &target.cookie, fds);
    params.index = match &opts.device {
        Some(d) => Some(netlink::parse_device(d).ok_or_else(|| anyhow!("bad device {d}"))?),
        None => None,
    };
    params.timeout_secs = opts.timeout;
    params.dead_conn_timeout_secs = Some(DEAD_CONN_TIMEOUT_SECS);
    let index = netlink::connect(&params).context("attaching to the kernel")?;
    // The kernel holds its own references to the sockets now.
    drop(sockets);
    Ok(Attached {
        device: netlink::device_path(index).display().to_string(),
        fresh: true,
        connections: count as u32,
    })
}

/// Tells the kernel a mapped device's export has a new size
/// (NBD_CMD_RECONFIGURE with the size and no sockets).
pub fn resize_device(device: &str, cookie: &str, size: u64) -> Result<()> {
    let index = netlink::parse_device(device).ok_or_else(|| anyhow!("bad device {device}"))?;
    netlink::reconfigure(&ReconfigureParams {
        index,
        sockets: Vec::new(),
        timeout_secs: None,
        dead_conn_timeout_secs: None,
        backend_id: cookie.to_owned(),
        size_bytes: Some(size),
    })
    .with_context(|| format!("telling the kernel {device} has {size} bytes"))
}

/// Unmaps by key or device; returns the device that was released.
pub fn unmap(client: &mut Client, handler: Handler, target: &str) -> Result<Option<String>> {
    let t = match client.call(&Request::UnmapBegin {
        handler,
        target: target.to_owned(),
    })? {
        Response::Unmap(t) => t,
        other => bail!("unexpected answer to unmap: {other:?}"),
    };
    if let Some(dev) = &t.device {
        let index = netlink::parse_device(dev).ok_or_else(|| anyhow!("bad device {dev}"))?;
        // After a restart the device may serve another backstore by now:
        // only ours is disconnected.
        match netlink::backend_id(index) {
            Some(id) if id == t.cookie => {
                netlink::disconnect(index).with_context(|| format!("disconnecting {dev}"))?
            }
            Some(id) => eprintln!(
                "nbd-cli: {dev} now serves another backend ({id}); left it attached, {} is unmapped",
                t.key
            ),
            None => eprintln!("nbd-cli: {dev} no longer serves {}; nothing to disconnect", t.key),
        }
    }
    client.call(&Request::UnmapDone { key: t.key })?;
    Ok(t.device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_control::client::ClientError;
    use nbd_control::wire::WireError;

    /// A runner that went away between MapBegin and MapDone.
    #[derive(Default)]
    struct Gone {
        calls: Vec<Request>,
    }

    impl Control for Gone {
        fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
            self.calls.push(request.clone());
            Err(ClientError::Wire(WireError::Closed))
        }
    }

    #[test]
    fn a_device_the_runner_could_not_record_is_detached_and_the_map_aborted() {
        let mut ctl = Gone::default();
        let mut detached = Vec::new();
        let attached = Attached {
            device: "/dev/nbd3".into(),
            fresh: true,
            connections: 1,
        };
        let e = record(&mut ctl, "k", &attached, &mut |d| {
            detached.push(d.to_owned());
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(detached, ["/dev/nbd3"]);
        assert!(e.contains("detached again"), "{e}");
        assert!(matches!(
            ctl.calls[..],
            [Request::MapDone { .. }, Request::MapAbort { .. }]
        ));
        // A reattached device is left running, and says so.
        let mut ctl = Gone::default();
        let attached = Attached {
            device: "/dev/nbd3".into(),
            fresh: false,
            connections: 1,
        };
        let e = record(&mut ctl, "k", &attached, &mut |_| {
            panic!("detached a reattached device")
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("stays attached"), "{e}");
        assert_eq!(ctl.calls.len(), 2);
    }
}
