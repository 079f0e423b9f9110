//! nbd-attach: a small driver of `nbd_cli::kernel`, used by the VM tests
//! (tests/vm/guest-attach.sh) until `nbd-cli map` exists.
//!
//! ```text
//! nbd-attach connect HOST:PORT EXPORT CONNECTIONS [readonly] [/dev/nbdX]   # prints /dev/nbdN
//! nbd-attach disconnect N|/dev/nbdN
//! nbd-attach reconfigure N|/dev/nbdN HOST:PORT EXPORT CONNECTIONS
//! nbd-attach status N|/dev/nbdN      # prints connected | disconnected; exit 1 if no such device
//! nbd-attach list                    # every device: INDEX connected|disconnected
//! ```
//! Env: NBD_ATTACH_COOKIE (backend identifier; default: the export name),
//! NBD_ATTACH_TIMEOUT (kernel request timeout, seconds; default: kernel's),
//! NBD_ATTACH_DEAD_CONN_TIMEOUT (seconds IO waits for a reconfigure; default 60).

use nbd_cli::kernel::netlink::{self, parse_device};
use nbd_cli::kernel::{negotiate, ConnectParams, ReconfigureParams};
use std::os::fd::AsRawFd;
use std::time::Duration;

const USAGE: &str = "usage: nbd-attach connect HOST:PORT EXPORT CONNECTIONS [readonly] [/dev/nbdX]
       nbd-attach disconnect N
       nbd-attach reconfigure N HOST:PORT EXPORT CONNECTIONS
       nbd-attach status N
       nbd-attach list";

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("nbd-attach: {e}");
        std::process::exit(1);
    }
}

fn env_secs(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(
            v.parse().map_err(|_| format!("{name}={v}: not a number"))?,
        )),
        Err(_) => Ok(None),
    }
}

fn device(arg: &str) -> Result<u32> {
    parse_device(arg).ok_or_else(|| format!("{arg}: not an NBD device (N or /dev/nbdN)").into())
}

fn count(arg: &str) -> Result<usize> {
    match arg.parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("{arg}: CONNECTIONS must be 1 to 64").into()),
    }
}

fn cookie(export: &str) -> String {
    std::env::var("NBD_ATTACH_COOKIE").unwrap_or_else(|_| export.to_owned())
}

fn run(args: &[String]) -> Result<()> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let dead_conn = Some(env_secs("NBD_ATTACH_DEAD_CONN_TIMEOUT")?.unwrap_or(60));
    let timeout = env_secs("NBD_ATTACH_TIMEOUT")?;
    match a.as_slice() {
        ["connect", addr, export, n, rest @ ..] => {
            let mut read_only = false;
            let mut index = None;
            for r in rest {
                match *r {
                    "readonly" => read_only = true,
                    d => index = Some(device(d)?),
                }
            }
            let (socks, info) = negotiate::connect_export_many(
                addr,
                export,
                count(n)?,
                negotiate::DEFAULT_TIMEOUT,
                None,
            )?;
            let fds = socks.iter().map(|s| s.as_raw_fd()).collect();
            let mut p = ConnectParams::from_negotiated(&info, read_only, cookie(export), fds);
            p.index = index;
            p.timeout_secs = timeout;
            p.dead_conn_timeout_secs = dead_conn;
            let i = netlink::connect(&p)?;
            drop(socks); // the kernel holds its own references
            println!("{}", netlink::device_path(i).display());
        }
        ["disconnect", d] => {
            let i = device(d)?;
            netlink::disconnect(i)?;
            if !netlink::wait_disconnected(i, Duration::from_secs(10))? {
                return Err(format!(
                    "/dev/nbd{i} still connected 10 s after disconnect (held open?)"
                )
                .into());
            }
        }
        ["reconfigure", d, addr, export, n] => {
            let index = device(d)?;
            let (socks, _info) = negotiate::connect_export_many(
                addr,
                export,
                count(n)?,
                negotiate::DEFAULT_TIMEOUT,
                None,
            )?;
            netlink::reconfigure(&ReconfigureParams {
                index,
                sockets: socks.iter().map(|s| s.as_raw_fd()).collect(),
                timeout_secs: timeout,
                dead_conn_timeout_secs: dead_conn,
                backend_id: cookie(export),
                size_bytes: None,
            })?;
            drop(socks);
        }
        ["status", d] => match netlink::status(device(d)?)? {
            Some(true) => println!("connected"),
            Some(false) => println!("disconnected"),
            None => return Err(format!("{d}: no such device").into()),
        },
        ["list"] => {
            for d in netlink::devices()? {
                let state = if d.connected {
                    "connected"
                } else {
                    "disconnected"
                };
                println!("{} {state}", d.index);
            }
        }
        _ => return Err(USAGE.into()),
    }
    Ok(())
}
