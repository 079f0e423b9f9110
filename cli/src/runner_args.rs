//! nbd-runner's command line: clap flags plus the seed's keyword forms
//! (`nbd-runner threads 4 rpchost 127.0.0.1 iohost 127.0.0.1`, `help`, `version`).

use clap::Parser;
use nbd_control::factory::ExportSpec;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// `--sched`; see [`nbd_engine::server::placement::SchedPolicy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sched {
    Batch,
    Normal,
}

impl From<Sched> for nbd_engine::server::placement::SchedPolicy {
    fn from(s: Sched) -> Self {
        match s {
            Sched::Batch => Self::Batch,
            Sched::Normal => Self::Normal,
        }
    }
}

/// `--colocate`; see [`nbd_engine::server::colocate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Colocate {
    Auto,
    Off,
}

/// `--tls`, nbdkit's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsArg {
    Off,
    On,
    Require,
}

#[derive(Debug, Parser)]
#[command(
    name = "nbd-runner",
    version,
    about = "Serves block storage (file, mem; gluster and ceph with their features) over NBD",
    after_help = "Keyword forms from the original nbd-runner also work:\n  \
                  nbd-runner threads 4 rpchost 127.0.0.1 iohost 127.0.0.1\n  \
                  nbd-runner help | version\n\n\
                  Example: nbd-runner --export file:/var/lib/nbd/disk0.raw,size=10G",
    // A flag given twice (in --config and on the command line) takes the last.
    args_override_self = true
)]
pub struct RunnerArgs {
    /// TOML file of settings: keys are the long flags without the dashes
    /// (`iohost = "0.0.0.0"`, `list-exports = true`, `export = [...]`);
    /// flags on the command line override it, lists add up.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address the control route listens on (nbd-cli talks to it).
    #[arg(long, default_value = "127.0.0.1")]
    pub rpchost: IpAddr,
    /// Control route TCP port.
    #[arg(long, default_value_t = 24110)]
    pub rpcport: u16,
    /// Address the NBD IO route listens on; IPv4 or IPv6. Anything but
    /// loopback needs TLS (--tls-certificates) or an explicit --tls off.
    #[arg(long, default_value = "127.0.0.1")]
    pub iohost: IpAddr,
    /// NBD IO route TCP port (0 picks a free one).
    #[arg(long, default_value_t = 24111)]
    pub ioport: u16,
    /// IO shards, one pinned core each [default: number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Directory holding saveconfig.json, the control socket and the token.
    #[arg(long, default_value = "/etc/nbd-runner")]
    pub state_dir: PathBuf,
    /// Shared secret nbd-cli must present over TCP [default: STATE_DIR/token,
    /// created and required when rpchost is not loopback].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve a backstore from startup:
    /// HANDLER:KEY[,size=SIZE][,readonly][,OPTION=VALUE]..., e.g. mem:disk0,size=1G,
    /// file:/var/lib/img/a.raw,size=10G, gluster:VOL/a.img or ceph:rbd/img,size=10G
    /// (created when missing if size= is given). Repeatable.
    #[arg(long = "export", value_name = "SPEC")]
    pub exports: Vec<ExportSpec>,
    /// ceph.conf for ceph backstores [default: librados' search path];
    /// a backstore's `option conf=...` overrides it.
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client id (`admin` for client.admin) for ceph backstores.
    #[arg(long, value_name = "NAME")]
    pub ceph_id: Option<String>,
    /// Keyring file holding the ceph client's key (referred to by path,
    /// never copied into saveconfig.json).
    #[arg(long, value_name = "PATH")]
    pub ceph_keyring: Option<PathBuf>,
    /// glusterd that serves gluster volfiles, HOST[:PORT] [default:
    /// localhost:24007]; a backstore's `option server=...` overrides it.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub gluster_server: Option<String>,
    /// Let the kernel schedule the shards instead of pinning each to a core
    /// (helps when clients run on the same few cores; see tuning.md). When
    /// pinned, the runner's other threads (control, librados, libgfapi)
    /// stay on the shards' cores too.
    #[arg(long)]
    pub no_pin: bool,
    /// The CPUs the runner uses, e.g. `2-5,8`: one shard per listed CPU
    /// (unless --threads says how many; they take the list in order,
    /// round-robin), and the runner's other threads (control, librados,
    /// libgfapi) on the same CPUs. With --no-pin the shards float over them.
    #[arg(long, value_name = "LIST", value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// How the runner's threads are scheduled: `batch` (SCHED_BATCH: a
    /// woken runner thread does not preempt the one running, so shards and
    /// library threads sharing a core hand over whole bursts) or `normal`
    /// (SCHED_OTHER). See tuning.md.
    #[arg(long, value_enum, default_value_t = Sched::Batch)]
    pub sched: Sched,
    /// QD1 co-location: `auto` lets a client on this host that waits for
    /// each reply be woken on the shard's own CPU (the shard is SCHED_IDLE
    /// for the send of a reply that is its only request, and backs off when
    /// other work wants that CPU), so the two take turns on one core instead
    /// of waking each other across cores. `off` never changes the policy.
    /// See tuning.md.
    #[arg(long, value_enum, default_value_t = Colocate::Auto)]
    pub colocate: Colocate,
    /// Microseconds an idle shard spins for new work before it sleeps
    /// (0: sleep at once). Lowers QD1 latency at the cost of CPU; see tuning.md.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub spin_us: u64,
    /// Seconds a client may take to finish the NBD handshake before it is
    /// dropped (guards against clients that connect and stall).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Do not lock the runner's memory, mark it PR_SET_IO_FLUSHER or shield
    /// it from the OOM killer (all on by default: a runner serving a device
    /// the host swaps or writes back to must not wait on reclaim). For tests
    /// and small boxes that never swap to NBD.
    #[arg(long)]
    pub no_swap_safety: bool,
    /// Memory each shard touches at start and keeps (with swap safety on),
    /// so IO under memory pressure is served without new pages; 0 for none.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    pub swap_reserve: u64,
    /// Seconds a client may take no reply bytes before its connection is
    /// dropped (0: never); frees what a client that stopped reading holds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub write_timeout: u64,
    /// Seconds a connection with nothing in flight may send nothing before
    /// it is closed (0, the default: never; kernel devices sit idle for
    /// hours and reconnect only through nbd-cli).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub idle_timeout: u64,
    /// IO connections the runner holds at once; more are closed at accept
    /// (also kept under what RLIMIT_NOFILE allows, at two descriptors each).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// IO connections from one address at once (a kernel map uses one per
    /// connection; 64 devices of 4 connections are 256).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_host: u32,
    /// Let NBD_OPT_LIST name the exports (off by default: export names of
    /// file backstores are host paths, and any peer of the IO route may ask).
    #[arg(long)]
    pub list_exports: bool,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by
    /// default); a bare PORT listens on loopback. Anyone who reaches it
    /// sees export names and counters: keep it on loopback or a trusted
    /// network.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
    /// Directory that `file` backstores created through the control route
    /// must live beneath (no `..`, no symlinks); repeatable [default:
    /// /var/lib/nbd-runner]. `--export` paths are not restricted.
    #[arg(long = "file-root", value_name = "DIR")]
    pub file_roots: Vec<PathBuf>,
    /// Let control clients adopt block devices as `file` backstores.
    #[arg(long)]
    pub allow_block_devices: bool,
    /// Let control clients give per-backstore options that name host files
    /// or hosts (ceph conf=, keyring=, id=; gluster server=).
    #[arg(long)]
    pub allow_backstore_options: bool,
    /// RAM all `mem` backstores may claim together, e.g. 8G [default: half
    /// of the machine's memory].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem_limit: Option<u64>,
    /// TLS on the IO route (NBD STARTTLS) and the TCP control route: `off`,
    /// `on` (offered; plain clients are served too) or `require` [default:
    /// require when --tls-certificates is given, else off; a non-loopback
    /// --iohost or --rpchost must have one or the other].
    #[arg(long, value_enum)]
    pub tls: Option<TlsArg>,
    /// Directory holding ca-cert.pem, server-cert.pem and server-key.pem
    /// (0600), nbdkit's layout [default: STATE_DIR/pki].
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Clients must present a certificate signed by ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
}

/// The TLS mode a runner's flags come to, and where its credentials are.
#[derive(Debug, PartialEq, Eq)]
pub struct TlsChoice {
    pub mode: TlsArg,
    pub dir: PathBuf,
    pub verify_peer: bool,
}

/// Where control-route file backstores live unless `--file-root` says otherwise.
pub const DEFAULT_FILE_ROOT: &str = "/var/lib/nbd-runner";

fn parse_size(s: &str) -> Result<u64, String> {
    nbd_engine::config::size::parse_size(s).map_err(|e| e.to_string())
}

/// `--cpus`, parsed (one value: clap reads a bare Vec as many).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    nbd_engine::config::cpulist::parse_cpu_list(s)
        .map(CpuList)
        .map_err(|e| e.to_string())
}

/// Half of physical memory: room for the page cache and everything else.
fn default_mem_limit() -> u64 {
    let info = rustix::system::sysinfo();
    (info.totalram as u64).saturating_mul(u64::from(info.mem_unit.max(1))) / 2
}

impl RunnerArgs {
    /// Runner-wide handler settings (`HANDLER.NAME` = value) from the flags.
    /// What the control plane's bootstrap needs from the flags.
    pub fn daemon_config(
        &self,
        settings: nbd_control::factory::Settings,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    ) -> nbd_control::daemon::DaemonConfig {
        nbd_control::daemon::DaemonConfig {
            state_dir: self.state_dir.clone(),
            rpchost: self.rpchost,
            rpcport: self.rpcport,
            token_file: self.token_file.clone(),
            settings,
            tls,
        }
    }

    /// Runner-wide backstore settings: handler defaults, what control
    /// clients may name, and the one memory budget every mem backstore
    /// (startup exports included) draws from.
    pub fn settings(&self) -> nbd_control::factory::Settings {
        let roots = if self.file_roots.is_empty() {
            vec![PathBuf::from(DEFAULT_FILE_ROOT)]
        } else {
            self.file_roots.clone()
        };
        nbd_control::factory::Settings {
            defaults: self.handler_defaults(),
            file_roots: nbd_control::confine::FileRoots {
                roots,
                allow_block_devices: self.allow_block_devices,
            },
            allow_backstore_options: self.allow_backstore_options,
            mem: nbd_engine::backend::MemBudget::new(
                self.mem_limit.unwrap_or_else(default_mem_limit),
            ),
        }
    }

    pub fn handler_defaults(&self) -> nbd_control::factory::HandlerDefaults {
        let mut d = nbd_control::factory::HandlerDefaults::default();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        for (k, v) in [
            ("ceph.conf", path(&self.ceph_conf)),
            ("ceph.id", self.ceph_id.clone()),
            ("ceph.keyring", path(&self.ceph_keyring)),
        ] {
            if let Some(v) = v {
                d.insert(k.into(), v);
            }
        }
        if let Some(s) = &self.gluster_server {
            d.insert("gluster.server".into(), s.clone());
        }
        d
    }

    /// Applies the safe default: plain text only on loopback unless the
    /// operator wrote `--tls off`.
    pub fn tls_choice(&self) -> Result<TlsChoice, String> {
        let mode = match (self.tls, &self.tls_certificates) {
            (Some(m), _) => m,
            (None, Some(_)) => TlsArg::Require,
            (None, None) => {
                if let Some(host) = [self.iohost, self.rpchost]
                    .into_iter()
                    .find(|h| !h.is_loopback())
                {
                    return Err(format!(
                        "{host} is not a loopback address and TLS is not configured: give \
                         --tls-certificates DIR to require TLS, or --tls off to serve in \
                         plain text to the network"
                    ));
                }
                TlsArg::Off
            }
        };
        if mode == TlsArg::Off && self.tls_verify_peer {
            return Err("--tls-verify-peer needs TLS; drop --tls off".into());
        }
        let dir = self
            .tls_certificates
            .clone()
            .unwrap_or_else(|| self.state_dir.join("pki"));
        Ok(TlsChoice {
            mode,
            dir,
            verify_peer: self.tls_verify_peer,
        })
    }

    pub fn io_addr(&self) -> SocketAddr {
        SocketAddr::new(self.iohost, self.ioport)
    }

    /// `--threads`, else one per `--cpus` CPU, else one per CPU.
    pub fn threads(&self) -> usize {
        self.threads
            .map(usize::from)
            .unwrap_or_else(|| match &self.cpus {
                Some(cpus) => cpus.0.len(),
                None => std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1),
            })
    }
}

/// Keywords the seed accepted without dashes, and whether they take a value.
const KEYWORDS: &[(&str, bool)] = &[
    ("help", false),
    ("version", false),
    ("threads", true),
    ("rpchost", true),
    ("rpcport", true),
    ("iohost", true),
    ("ioport", true),
    ("state-dir", true),
    ("export", true),
    ("token-file", true),
    ("ceph-conf", true),
    ("ceph-id", true),
    ("ceph-keyring", true),
    ("gluster-server", true),
    ("file-root", true),
    ("mem-limit", true),
    ("tls", true),
    ("tls-certificates", true),
    ("max-connections", true),
    ("max-connections-per-host", true),
    ("write-timeout", true),
    ("idle-timeout", true),
];

/// Rewrites keyword forms into flags, leaving values untouched.
pub fn normalize<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let mut out = Vec::new();
    let mut expect_value = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || expect_value {
            expect_value = false;
            out.push(arg);
            continue;
        }
        match KEYWORDS.iter().find(|(k, _)| *k == arg) {
            Some((k, takes)) => {
                out.push(format!("--{k}"));
                expect_value = *takes;
            }
            None => {
                expect_value = arg.starts_with("--")
                    && !arg.contains('=')
                    && KEYWORDS.iter().any(|(k, t)| *t && arg[2..] == **k);
                out.push(arg);
            }
        }
    }
    out
}

/// `--metrics`: `PORT` (loopback), `ADDR:PORT` or `[V6]:PORT`.
fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let (host, port) = nbd_engine::config::hostport::split_host_port(s)?;
    let port = port
        .ok_or("needs a port: PORT or ADDR:PORT")?
        .parse::<u16>()
        .map_err(|_| format!("bad port in {s:?}"))?;
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunnerArgs, clap::Error> {
        let v = normalize(args.iter().map(|s| s.to_string()));
        RunnerArgs::try_parse_from(v)
    }

    #[test]
    fn seed_keyword_forms() {
        let a = parse(&[
            "nbd-runner",
            "threads",
            "4",
            "rpchost",
            "127.0.0.1",
            "iohost",
            "::1",
        ])
        .unwrap();
        assert_eq!(a.threads(), 4);
        assert_eq!(a.rpchost.to_string(), "127.0.0.1");
        assert_eq!(a.io_addr().to_string(), "[::1]:24111");
    }

    #[test]
    fn defaults() {
        let a = parse(&["nbd-runner"]).unwrap();
        assert_eq!(a.rpcport, 24110);
        assert_eq!(a.ioport, 24111);
        assert_eq!(a.rpchost.to_string(), "127.0.0.1");
        assert_eq!(a.state_dir, PathBuf::from("/etc/nbd-runner"));
        assert!(a.threads() >= 1);
        assert_eq!(a.sched, Sched::Batch);
        assert!(!a.no_pin);
        assert_eq!(a.iohost.to_string(), "127.0.0.1");
        assert_eq!(a.tls_choice().unwrap().mode, TlsArg::Off);
    }

    #[test]
    fn plain_text_beyond_loopback_must_be_asked_for() {
        for host in [["--iohost", "0.0.0.0"], ["--rpchost", "10.1.2.3"]] {
            let a = parse(&["nbd-runner", host[0], host[1]]).unwrap();
            let e = a.tls_choice().unwrap_err();
            assert!(e.contains("--tls off") && e.contains(host[1]), "{e}");
            let a = parse(&["nbd-runner", host[0], host[1], "--tls", "off"]).unwrap();
            assert_eq!(a.tls_choice().unwrap().mode, TlsArg::Off);
        }
        let a = parse(&["nbd-runner", "--iohost", "::", "--tls-certificates", "/pki"]).unwrap();
        let c = a.tls_choice().unwrap();
        assert_eq!((c.mode, c.dir), (TlsArg::Require, PathBuf::from("/pki")));
        let a = parse(&["nbd-runner", "--tls", "on"]).unwrap();
        assert_eq!(
            a.tls_choice().unwrap().dir,
            PathBuf::from("/etc/nbd-runner/pki")
        );
        let a = parse(&["nbd-runner", "--tls", "off", "--tls-verify-peer"]).unwrap();
        assert!(a.tls_choice().is_err());
    }

    #[test]
    fn flags_and_exports() {
        let a = parse(&[
            "nbd-runner",
            "--ioport",
            "0",
            "--export",
            "mem:disk0,size=1G",
            "--export=file:/tmp/x.raw,size=1M,readonly",
        ])
        .unwrap();
        assert_eq!(a.exports.len(), 2);
        assert_eq!(a.exports[0].0.size, Some(1 << 30));
        assert!(a.exports[1].0.read_only);
    }

    #[test]
    fn a_value_named_like_a_keyword_stays_a_value() {
        // An export literally named "threads" must not become a flag.
        let v = normalize(["nbd-runner", "--export", "threads"].map(String::from));
        assert_eq!(v, ["nbd-runner", "--export", "threads"]);
        let v = normalize(["nbd-runner", "export", "mem:help,size=1M"].map(String::from));
        assert_eq!(v, ["nbd-runner", "--export", "mem:help,size=1M"]);
    }

    #[test]
    fn gluster_server_default_for_handlers() {
        let a = parse(&["nbd-runner", "gluster-server", "gl1:24008"]).unwrap();
        let d = a.handler_defaults();
        assert_eq!(
            d.get("gluster.server").map(String::as_str),
            Some("gl1:24008")
        );
        assert!(parse(&["nbd-runner"])
            .unwrap()
            .handler_defaults()
            .is_empty());
    }

    #[test]
    fn ceph_defaults_for_handlers() {
        let a = parse(&[
            "nbd-runner",
            "--ceph-conf",
            "/c/ceph.conf",
            "ceph-id",
            "nbd",
        ])
        .unwrap();
        let d = a.handler_defaults();
        assert_eq!(d.get("ceph.conf").map(String::as_str), Some("/c/ceph.conf"));
        assert_eq!(d.get("ceph.id").map(String::as_str), Some("nbd"));
        assert!(!d.contains_key("ceph.keyring"));
    }

    #[test]
    fn help_and_version_keywords() {
        assert_eq!(
            parse(&["nbd-runner", "help"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayHelp
        );
        assert_eq!(
            parse(&["nbd-runner", "version"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion
        );
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let e = parse(&["nbd-runner", "--export", "mem:disk0"]).unwrap_err();
        assert!(e.to_string().contains("size"), "{e}");
        assert!(parse(&["nbd-runner", "threads", "0"]).is_err());
        assert!(parse(&["nbd-runner", "--iohost", "not-an-ip"]).is_err());
        assert!(parse(&["nbd-runner", "bogus"]).is_err());
        let e = parse(&["nbd-runner", "--colocate", "always"]).unwrap_err();
        assert!(
            e.to_string().contains("auto") && e.to_string().contains("off"),
            "{e}"
        );
        assert_eq!(parse(&["nbd-runner"]).unwrap().colocate, Colocate::Auto);
        let e = parse(&["nbd-runner", "--sched", "fifo"]).unwrap_err();
        assert!(e.to_string().contains("batch"), "{e}");
        assert_eq!(
            parse(&["nbd-runner", "--sched", "normal"]).unwrap().sched,
            Sched::Normal
        );
    }

    #[test]
    fn metrics_addresses() {
        let p = |s: &str| super::parse_metrics_addr(s);
        assert_eq!(p("9187").unwrap().to_string(), "127.0.0.1:9187");
        assert_eq!(p("0.0.0.0:9187").unwrap().to_string(), "0.0.0.0:9187");
        assert_eq!(p("[::1]:9187").unwrap().to_string(), "[::1]:9187");
        assert!(p("127.0.0.1").unwrap_err().contains("needs a port"));
        assert!(p("host:9187").unwrap_err().contains("not an IP address"));
        assert!(p("1.2.3.4:99999").unwrap_err().contains("bad port"));
    }
}
