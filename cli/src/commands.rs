//! What each nbd-cli command does: talk to a runner's control route (and
//! the kernel, for map/unmap) and print the answer. The binary only parses
//! the arguments and reports the error.

use crate::cli_args::{Command, Global, Invocation};
use crate::{cli_output, map, watch};
use anyhow::{bail, Context, Result};
use nbd_control::client::{Client, ClientError, Endpoint};
use nbd_control::model::{Handler, State};
use nbd_control::token;
use nbd_control::wire::{CreateRequest, Request, Response};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_TOKEN_FILE: &str = "/etc/nbd-runner/token";
/// Per reply frame; long requests send progress frames well within it.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one parsed command.
pub fn run(inv: Invocation) -> Result<()> {
    let Invocation { global, command } = inv;
    match command {
        Command::Help(h) => {
            print!("{}", help(h));
            return Ok(());
        }
        Command::Version => {
            println!("nbd-cli {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Watch { interval } => {
            let runner = global.host.as_deref().unwrap_or(DEFAULT_HOST).to_owned();
            // Credentials are read once: a broken token file fails now, not every pass.
            let tls = tls_config(&global)?;
            // So is a refused token; a runner that is not up yet is waited for.
            if let Err(e) = connect(&global) {
                match e.downcast_ref::<ClientError>() {
                    Some(ClientError::Refused(_)) | None => return Err(e),
                    Some(_) => {}
                }
            }
            let connect = || connect(&global);
            let mut host = watch::Live::new(&connect, tls);
            return watch::run(&mut host, &runner, interval);
        }
        _ => {}
    }
    let mut client = connect(&global)?;
    let json = global.json;
    match command {
        Command::Create {
            handler,
            key,
            size,
            prealloc,
            options,
        } => {
            let req = Request::Create(CreateRequest {
                handler,
                key,
                size,
                prealloc,
                options,
            });
            let mut shown = Progress::default();
            let answer =
                client.call_with_progress(&req, &mut |done, total| shown.show(done, total));
            shown.finish();
            let Response::Backstore(b) = answer? else {
                bail!("unexpected answer to create");
            };
            emit(json, &b, || {
                format!(
                    "created {} {} ({})\n",
                    b.handler,
                    b.key,
                    cli_output::human_size(b.size)
                )
            })
        }
        Command::Delete { handler, key } => {
            client.call(&Request::Delete {
                handler,
                key: key.clone(),
            })?;
            emit(json, &serde_json::json!({"deleted": key}), || {
                format!("deleted {key}\n")
            })
        }
        Command::Map {
            handler,
            key,
            device,
            timeout,
            readonly,
            connections,
            shards,
            route,
        } => {
            let opts = map::MapOptions {
                device,
                timeout,
                readonly,
                connections,
                shards,
                route,
                tls: tls_config(&global)?,
            };
            let dev = map::map(&mut client, handler, &key, &opts)?;
            emit(
                json,
                &serde_json::json!({"key": key, "device": dev}),
                || format!("{dev}\n"),
            )
        }
        Command::Unmap { handler, target } => {
            let dev = map::unmap(&mut client, handler, &target)?;
            let shown = dev.clone().unwrap_or_else(|| target.clone());
            emit(
                json,
                &serde_json::json!({"unmapped": target, "device": dev}),
                || format!("unmapped {shown}\n"),
            )
        }
        Command::List { handler, filter } => {
            let Response::List(items) = client.call(&Request::List { handler, filter })? else {
                bail!("unexpected answer to list");
            };
            let view: Vec<_> = items.iter().map(cli_output::JsonBackstore::of).collect();
            emit(json, &view, || cli_output::list(&items))
        }
        Command::Info { key } => {
            let Response::Backstore(b) = client.call(&Request::Info { key })? else {
                bail!("unexpected answer to info");
            };
            emit(json, &cli_output::JsonBackstore::of(&b), || {
                cli_output::info(&b)
            })
        }
        Command::Stats { key } => {
            let Response::Stats(s) = client.call(&Request::Stats { key })? else {
                bail!("unexpected answer to stats");
            };
            emit(json, &s, || cli_output::stats(&s))
        }
        Command::Resize {
            handler,
            key,
            size,
            shrink,
        } => {
            let req = Request::Resize {
                handler,
                key,
                size,
                shrink,
            };
            let Response::Resized { info, cookie } = client.call(&req)? else {
                bail!("unexpected answer to resize");
            };
            // A live device learns the new size now; a dead one when it is reattached.
            if let (State::Mapped, Some(dev)) = (info.state, &info.device) {
                map::resize_device(dev, &cookie, info.size)?;
            }
            emit(json, &info, || {
                format!(
                    "resized {} to {}{}\n",
                    info.key,
                    cli_output::human_size(info.size),
                    info.device
                        .as_deref()
                        .map_or(String::new(), |d| format!(" ({d})"))
                )
            })
        }
        Command::Help(_) | Command::Version | Command::Watch { .. } => {
            unreachable!("handled above")
        }
    }
}

/// Preallocation progress on stderr: one updating line on a terminal,
/// a line per tenth otherwise.
#[derive(Default)]
struct Progress {
    last_tenth: Option<u64>,
    drawn: bool,
}

impl Progress {
    fn show(&mut self, done: u64, total: u64) {
        let pct = done.saturating_mul(100) / total.max(1);
        let line = format!(
            "preallocating: {pct}% ({} of {})",
            cli_output::human_size(done),
            cli_output::human_size(total)
        );
        let mut err = std::io::stderr();
        if err.is_terminal() {
            let _ = write!(err, "\r{line}");
            self.drawn = true;
        } else if self.last_tenth != Some(pct / 10) {
            self.last_tenth = Some(pct / 10);
            let _ = writeln!(err, "{line}");
        }
    }

    fn finish(&self) {
        if self.drawn {
            eprintln!();
        }
    }
}

fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce() -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", human());
    }
    Ok(())
}

fn connect(global: &Global) -> Result<Client> {
    let endpoint = Endpoint::parse(global.host.as_deref().unwrap_or(DEFAULT_HOST))
        .map_err(anyhow::Error::msg)?;
    let token_file = global
        .token_file
        .clone()
        .or_else(|| std::env::var_os("NBD_RUNNER_TOKEN_FILE").map(PathBuf::from));
    let token = match token_file {
        Some(p) => Some(token::read(&p)?),
        // The local default, if this user may read it, and only to this host:
        // a token sent elsewhere would hand that host our runner.
        None if endpoint.is_local() => token::read(std::path::Path::new(DEFAULT_TOKEN_FILE)).ok(),
        None => bail!(
            "{endpoint} is another host: give its token with --token-file FILE or \
             NBD_RUNNER_TOKEN_FILE (the local default token is only sent to this host)"
        ),
    };
    let tls = match endpoint {
        Endpoint::Tcp { .. } => tls_config(global)?,
        Endpoint::Unix(_) => None,
    };
    Client::connect_tls(&endpoint, token, TIMEOUT, tls).context("control route")
}

/// `--tls-certificates` or NBD_RUNNER_TLS_CERTIFICATES: TLS on both routes.
fn tls_config(global: &Global) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
    let dir = global
        .tls_certificates
        .clone()
        .or_else(|| std::env::var_os("NBD_RUNNER_TLS_CERTIFICATES").map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty());
    dir.map(|d| nbd_control::tls::client_config(&d).context("--tls-certificates"))
        .transpose()
}

pub fn help(handler: Option<Handler>) -> String {
    let h = handler.map_or("<gluster|ceph|file|mem>".to_owned(), |h| h.to_string());
    let key = handler.map_or("KEY".to_owned(), |h| format!("<{}>", h.key_form()));
    let mut s = format!(
        "Usage:\n\
         \tnbd-cli {h} create {key} [prealloc] size <SIZE> [option K=V]... [host <RUNNER_HOST>]\n\
         \t\tCreate a backstore. SIZE takes B, K/KiB, M/MiB, G/GiB, T, P, E and decimals (1.5G).\n\
         \tnbd-cli {h} delete {key} [host <RUNNER_HOST>]\n\
         \t\tDelete a backstore (refused while it is mapped).\n\
         \tnbd-cli {h} map {key} [/dev/nbdX] [timeout T] [readonly] [connections N] [shards LIST] [route auto|unix|tcp] [host <RUNNER_HOST>]\n\
         \t\tAttach it to /dev/nbdX (root); a dead backstore is reattached to its old device.\n\
         \t\tshards LIST puts connection i on the i-th listed runner shard (0,1 or 0-3; auto: least-loaded).\n\
         \tnbd-cli {h} unmap </dev/nbdX|{key}> [host <RUNNER_HOST>]\n\
         \tnbd-cli {h} list [map|unmap|create|dead|live|all] [host <RUNNER_HOST>]\n\
         \tnbd-cli [{h}] info {key}     size, flags, state, device, each connection's shard and CPU\n\
         \tnbd-cli [{h}] stats {key}    IOPS and latency percentiles per operation\n\
         \tnbd-cli {h} resize {key} size <SIZE> [allow-shrink]\n\
         \t\tGrow the backstore (ceph); a mapped device sees the new size. Shrinking\n\
         \t\tdiscards data past the new end and needs allow-shrink.\n\
         \tnbd-cli watch [interval SECS] [host <RUNNER_HOST>]\n\
         \t\tStay running (root): reattach the runner's dead devices on this host when it\n\
         \t\tanswers again (every SECS, default 1, and on the kernel's link-dead events).\n\
         \tnbd-cli help | version | {h} help\n\n\
         Options anywhere: --host HOST[:PORT] (default 127.0.0.1:24110, or a unix socket path),\n\
         --json, --token-file PATH (TCP needs the runner's token; the local default is read for loopback),\n\
         --tls-certificates DIR (ca-cert.pem, client-cert.pem, client-key.pem: TLS to the runner),\n\
         --size SIZE, --prealloc, --readonly, --timeout T, --connections N, --shards LIST, --route R, --device /dev/nbdX.\n"
    );
    if let Some(h) = handler {
        s.push_str(&format!("\n{h} keys are {}.\n", h.key_form()));
    }
    if handler == Some(Handler::File) {
        s.push_str(
            "create takes option direct=on: O_DIRECT, no page cache, a 4 KiB minimum block size \
             (refused on filesystems without O_DIRECT).\n",
        );
    }
    if handler == Some(Handler::Ceph) {
        s.push_str(
            "Keys may also be POOL/NAMESPACE/IMAGE, and either with @SNAP: a snapshot, served \
             read-only (create adopts it at its size; delete forgets it and removes nothing).\n\
             create takes option K=V for: conf=PATH, id=NAME, keyring=PATH\n(defaults: the runner's \
             --ceph-conf/--ceph-id/--ceph-keyring), object_size=4M, features=layering,exclusive-lock,...,\n\
             mount_timeout=SECS, op_timeout=SECS, rbd_cache=true|false, and encryption=luks1|luks2 with\n\
             passphrase_file=PATH (0600; librbd's LUKS, formatted when the runner creates the image).\n\
             list --json and info --json add pool, namespace, image and snapshot (also snap) for ceph backstores.\n",
        );
    }
    s
}
