//! The nbd-runner daemon, assembled: scheduling and CPU placement, the
//! startup exports, signals, the control plane and the engine, then an
//! orderly stop. The binary only parses flags and sets up logging.

use crate::runner_args::{Colocate, RunnerArgs, TlsArg};
use anyhow::{Context, Result};
use nbd_control::daemon;
use nbd_engine::export::ExportTable;
use nbd_engine::protocol::TlsPolicy;
use nbd_engine::server::directory::ShardDirectory;
use nbd_engine::server::{self, EngineConfig, Limits, Shutdown};
use std::io::Write;
use std::sync::Arc;

/// Serves until SIGINT/SIGTERM; a second signal exits at once.
pub fn run(args: RunnerArgs) -> Result<()> {
    let tls = tls_server(&args)?;
    let max_connections = raise_fd_limit(args.max_connections as usize, args.threads());
    // Once the flags are known good, before any thread: threads inherit the IO-flusher flag.
    if !args.no_swap_safety {
        let applied = crate::reclaim::protect();
        tracing::info!(
            io_flusher = applied.io_flusher,
            memory_locked = applied.locked,
            oom_score_adj_min = applied.oom_protected,
            "swap safety"
        );
    }
    let threads = args.threads();
    // Before any thread starts: every thread inherits both settings below.
    if let Err(e) = server::placement::set_sched_policy(args.sched.into()) {
        tracing::warn!(sched = ?args.sched, "cannot set the scheduling policy: {e}");
    }
    let listed = args.cpus.as_ref().map(|c| c.0.clone());
    if let Some(listed) = &listed {
        server::placement::check_cpus(listed).map_err(anyhow::Error::msg)?;
    }
    let shard_cpus = server::placement::shard_cpus(threads, !args.no_pin, listed.as_deref());
    // Control threads and the backend libraries' own threads stay on the
    // listed CPUs, or else on the shards' CPUs.
    if let Some(cpus) = listed.as_ref().or(shard_cpus.as_ref()) {
        if let Err(e) = server::placement::confine_current_thread(cpus) {
            tracing::warn!(?cpus, "cannot keep helper threads on the shards' CPUs: {e}");
        }
    }
    let table = Arc::new(ExportTable::new(threads));
    let directory = Arc::new(ShardDirectory::new(threads));
    let settings = args.settings();
    prepare_default_file_root(&args);
    for spec in &args.exports {
        let key = &spec.0.key;
        let opened = spec
            .open(&settings)
            .with_context(|| format!("--export {}:{key}", spec.0.handler))?;
        let export = table.add(key, opened.backend)?;
        tracing::info!(
            export = %export.name,
            handler = export.backend.handler(),
            size = export.backend.size(),
            mode = %export.backend.mode(),
            read_only = spec.0.read_only,
            "serving"
        );
    }

    let shutdown = Arc::new(Shutdown::default());
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Order matters: the first signal arms the flag, a second one exits.
        signal_hook::flag::register_conditional_shutdown(sig, 1, shutdown.flag())
            .context("installing signal handlers")?;
        signal_hook::flag::register(sig, shutdown.flag()).context("installing signal handlers")?;
    }

    // Bound first: a wrong address fails before any other route listens.
    let metrics_listener = args
        .metrics
        .map(|at| {
            std::net::TcpListener::bind(at)
                .with_context(|| format!("--metrics {at}: cannot listen"))
        })
        .transpose()?;
    let listener = server::bind(args.io_addr())?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut control = daemon::start(
        &args.daemon_config(settings, tls.as_ref().map(|t| t.config.clone())),
        table.clone(),
        addr,
        directory.clone(),
        shutdown.flag(),
    )?;
    let rpc = control.tcp_addr;
    let metrics = match metrics_listener {
        Some(listener) => {
            let bound = listener
                .local_addr()
                .context("reading the metrics address")?;
            nbd_control::metrics_http::spawn(listener, control.metrics_sources(table.clone()))
                .context("starting the metrics thread")?;
            tracing::info!(%bound, "Prometheus metrics at /metrics");
            Some(bound)
        }
        None => None,
    };
    let io_unix = control.io_unix.take();
    let io_unix_path = io_unix.as_ref().map(|(p, _)| p.clone());
    let cpus = shard_cpus
        .as_ref()
        .map_or("floating".to_owned(), |c| format!("{c:?}"));
    tracing::info!(io = %addr, %rpc, threads, %cpus, sched = ?args.sched, state_dir = %args.state_dir.display(), "nbd-runner started");
    let heartbeats = crate::service::heartbeats(threads);
    let mut supervisor = None;
    server::run(
        listener,
        EngineConfig {
            threads,
            shard_cpus,
            spin_before_park: std::time::Duration::from_micros(args.spin_us),
            limits: Limits {
                handshake_timeout: std::time::Duration::from_secs(args.handshake_timeout),
                list_exports: args.list_exports,
                max_connections,
                max_connections_per_peer: args.max_connections_per_host as usize,
                write_timeout: (args.write_timeout > 0)
                    .then(|| std::time::Duration::from_secs(args.write_timeout)),
                idle_timeout: (args.idle_timeout > 0)
                    .then(|| std::time::Duration::from_secs(args.idle_timeout)),
                colocate: (args.colocate == Colocate::Auto).then(|| args.sched.into()),
                ..Limits::default()
            },
            tls,
            unix: io_unix.map(|(_, l)| l),
            warm_reserve: if args.no_swap_safety {
                0
            } else {
                args.swap_reserve as usize
            },
            directory,
            heartbeats: heartbeats.clone(),
        },
        table.clone(),
        shutdown.clone(),
        || {
            // One machine-readable line for scripts and tests.
            let mut line = format!("nbd-runner ready io={addr} rpc={rpc}");
            if let Some(p) = &io_unix_path {
                line += &format!(" io-unix={}", p.display());
            }
            if let Some(m) = metrics {
                line += &format!(" metrics={m}");
            }
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            supervisor = Some(crate::service::Supervisor::ready(
                table.clone(),
                addr.to_string(),
                heartbeats,
                shutdown.flag(),
            ));
        },
    )?;

    for export in table.all() {
        let report = export.stats.snapshot().render();
        if !report.is_empty() {
            tracing::info!(export = %export.name, "latency\n{report}");
        }
    }
    control.close_all();
    for export in table.all() {
        table.remove(&export.name);
    }
    for sock in control.unix_path.iter().chain(&io_unix_path) {
        let _ = std::fs::remove_file(sock);
    }
    if let Some(s) = supervisor {
        s.finish();
    }
    tracing::info!("nbd-runner stopped");
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (the default soft 1,024
/// would run out under load, failing accepts and state saves alike) and
/// returns the connection cap that fits in it: two descriptors per
/// connection and room for the rest of the runner, the shards' splice
/// pipes included.
fn raise_fd_limit(wanted: usize, shards: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!("cannot raise RLIMIT_NOFILE to the hard limit: {e}");
        }
    }
    let fds = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let pipes = (shards * nbd_engine::backend::pipe::POOL_MAX * 2) as u64;
    let fits = (fds.saturating_sub(256 + pipes) / 2).max(1) as usize;
    if fits < wanted {
        tracing::info!(
            fds,
            max_connections = fits,
            "RLIMIT_NOFILE allows fewer IO connections than --max-connections"
        );
    }
    wanted.min(fits)
}

/// The IO route's TLS from the flags; the same credentials serve the
/// control route.
fn tls_server(args: &RunnerArgs) -> Result<Option<server::TlsServer>> {
    let choice = args.tls_choice().map_err(anyhow::Error::msg)?;
    let policy = match choice.mode {
        TlsArg::Off => return Ok(None),
        TlsArg::On => TlsPolicy::On,
        TlsArg::Require => TlsPolicy::Require,
    };
    let config = nbd_control::tls::server_config(&choice.dir, choice.verify_peer)
        .context("--tls-certificates")?;
    tracing::info!(dir = %choice.dir.display(), ?policy, verify_peer = choice.verify_peer, "TLS on the IO and control routes");
    Ok(Some(server::TlsServer { policy, config }))
}

/// Creates the default file root (0700) when the operator named none and it
/// is missing; a runner that cannot (not root) still starts, and its file
/// creates say where they must go.
fn prepare_default_file_root(args: &RunnerArgs) {
    use std::os::unix::fs::DirBuilderExt;
    if !args.file_roots.is_empty() {
        return;
    }
    let root = std::path::Path::new(crate::runner_args::DEFAULT_FILE_ROOT);
    if root.exists() {
        return;
    }
    if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(root) {
        tracing::warn!(root = %root.display(), "cannot create the default file root: {e}");
    }
}
