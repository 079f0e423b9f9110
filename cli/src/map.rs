//! `map` and `unmap`: the runner opens the export, nbd-cli negotiates the IO
//! connections and hands them to the kernel, then tells the runner the
//! device. A dead backstore is reattached to its old device with
//! RECONFIGURE, after checking the device's cookie is ours.

use crate::kernel::{self, netlink, ConnectParams, ReconfigureParams};
use anyhow::{anyhow, bail, Context, Result};
use nbd_control::client::Client;
use nbd_control::model::Handler;
use nbd_control::wire::{MapTarget, Request, Response};
use std::os::unix::io::AsRawFd;
use std::time::Duration;

pub struct MapOptions {
    pub device: Option<String>,
    pub timeout: Option<u64>,
    pub readonly: bool,
    pub connections: Option<u32>,
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
    })? {
        Response::Map(t) => t,
        other => bail!("unexpected answer to map: {other:?}"),
    };
    match attach(client, &target, opts) {
        Ok(device) => {
            client.call(&Request::MapDone {
                key: key.to_owned(),
                device: device.clone(),
            })?;
            Ok(device)
        }
        Err(e) => {
            let _ = client.call(&Request::MapAbort {
                key: key.to_owned(),
                reason: format!("{e:#}"),
            });
            Err(e)
        }
    }
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

fn attach(client: &Client, target: &MapTarget, opts: &MapOptions) -> Result<String> {
    let count = opts.connections.unwrap_or(target.shards).max(1) as usize;
    let addr = io_address(client, target);
    let (sockets, info) = kernel::connect_export_many(
        &addr,
        &target.key,
        count,
        NEGOTIATE_TIMEOUT,
        opts.tls.as_ref(),
    )
    .with_context(|| format!("connecting to the IO route at {addr}"))?;
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
        return Ok(dead.clone());
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
    Ok(netlink::device_path(index).display().to_string())
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
        netlink::disconnect(index).with_context(|| format!("disconnecting {dev}"))?;
    }
    client.call(&Request::UnmapDone { key: t.key })?;
    Ok(t.device)
}
