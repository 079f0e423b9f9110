//! nbd-cli's grammar: the seed's keyword forms exactly, with flag forms
//! (`--size`, `--host`, `--json`, ...) accepted anywhere beside them.
//!
//! ```text
//! nbd-cli <gluster|ceph|file|mem> create <KEY> [prealloc] size <SIZE> [option K=V]... [host H]
//! nbd-cli <handler> delete <KEY> [host H]
//! nbd-cli <handler> map <KEY> [/dev/nbdX] [timeout T] [readonly] [connections N] [shards LIST] [route auto|unix|tcp] [host H]
//! nbd-cli <handler> unmap </dev/nbdX|KEY> [host H]
//! nbd-cli <handler> list [map|unmap|create|dead|live|all] [host H]
//! nbd-cli [<handler>] info|stats <KEY> [host H]
//! nbd-cli <handler> resize <KEY> size <SIZE> [allow-shrink] [host H]
//! nbd-cli watch [interval SECS] [host H]
//! nbd-cli help | version | <handler> help
//! ```

use nbd_control::model::{Handler, ListFilter};
use nbd_engine::config::shardlist::parse_shard_list;
use nbd_engine::config::size::parse_size;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Global {
    /// HOST, HOST:PORT, [V6]:PORT or a unix socket path.
    pub host: Option<String>,
    pub json: bool,
    pub token_file: Option<PathBuf>,
    /// Client TLS credentials (ca-cert.pem, client-cert.pem, client-key.pem).
    pub tls_certificates: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Help(Option<Handler>),
    Version,
    Create {
        handler: Handler,
        key: String,
        size: u64,
        prealloc: bool,
        /// Handler settings for this backstore (`option KEY=VALUE`).
        options: BTreeMap<String, String>,
    },
    Delete {
        handler: Handler,
        key: String,
    },
    Map {
        handler: Handler,
        key: String,
        device: Option<String>,
        timeout: Option<u64>,
        readonly: bool,
        connections: Option<u32>,
        /// The runner shard of each connection (None: least-loaded).
        shards: Vec<Option<u32>>,
        route: IoRoute,
    },
    Unmap {
        handler: Handler,
        target: String,
    },
    List {
        handler: Option<Handler>,
        filter: ListFilter,
    },
    Info {
        key: String,
    },
    Stats {
        key: String,
    },
    Resize {
        handler: Handler,
        key: String,
        size: u64,
        /// Shrinking discards data past the new end: only when asked.
        shrink: bool,
    },
    /// Reattach the runner's dead devices until stopped.
    Watch {
        interval: std::time::Duration,
    },
}

/// Which of the runner's IO routes a map's connections take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoRoute {
    /// The unix socket when the runner is on this host, else TCP.
    #[default]
    Auto,
    /// The runner's unix socket only (this host).
    Unix,
    /// TCP (with TLS when configured), even on the runner's own host.
    Tcp,
}

impl std::str::FromStr for IoRoute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoRoute::Auto),
            "unix" => Ok(IoRoute::Unix),
            "tcp" => Ok(IoRoute::Tcp),
            _ => Err(format!("route must be auto, unix or tcp, not {s:?}")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub global: Global,
    pub command: Command,
}

/// A handler's commands, each with the bare keywords it takes after its
/// KEY: the vocabulary of [`parse`], from which the man page and the shell
/// completions are built (`cli_docs`; a test there holds the two together).
pub const HANDLER_VERBS: &[(&str, &[&str])] = &[
    ("create", &["size", "prealloc", "option", "server", "host"]),
    ("delete", &["host"]),
    (
        "map",
        &[
            "timeout",
            "readonly",
            "connections",
            "shards",
            "route",
            "host",
        ],
    ),
    ("unmap", &["host"]),
    (
        "list",
        &["map", "unmap", "create", "dead", "live", "all", "host"],
    ),
    ("info", &["host"]),
    ("stats", &["host"]),
    ("resize", &["size", "allow-shrink", "host"]),
    ("help", &[]),
];
/// Commands without a handler.
pub const TOP_VERBS: &[(&str, &[&str])] = &[
    ("watch", &["interval", "host"]),
    (
        "list",
        &["map", "unmap", "create", "dead", "live", "all", "host"],
    ),
    ("info", &["host"]),
    ("stats", &["host"]),
    ("help", &[]),
    ("version", &[]),
];

/// Flags that take a value (`--NAME VALUE` or `--NAME=VALUE`), anywhere.
pub const VALUE_FLAGS: [&str; 12] = [
    "host",
    "token-file",
    "tls-certificates",
    "size",
    "option",
    "server",
    "timeout",
    "connections",
    "device",
    "interval",
    "route",
    "shards",
];
/// Flags that stand alone, anywhere.
pub const SWITCHES: [&str; 6] = [
    "json",
    "prealloc",
    "readonly",
    "allow-shrink",
    "help",
    "version",
];

/// The arguments: `--flag` forms pulled out wherever they are, and the bare
/// words in order. Bare keywords (`size 1G`, `host H`, `readonly`) count
/// only where the seed grammar puts them, after a command's KEY, so a
/// backstore may be named `size` or `host`.
struct Words {
    rest: Vec<String>,
    flags: Vec<(String, Option<String>)>,
    /// Past the positionals: bare keywords are recognized from here on.
    tail: bool,
    global: Global,
}

impl Words {
    fn new(args: &[String]) -> Result<Words, String> {
        let mut w = Words {
            rest: Vec::new(),
            flags: Vec::new(),
            tail: false,
            global: Global::default(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let short = match a.as_str() {
                "-h" => Some("help"),
                "-V" => Some("version"),
                _ => None,
            };
            let Some(flag) = a.strip_prefix("--").or(short) else {
                w.rest.push(a.clone());
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (flag, None),
            };
            if VALUE_FLAGS.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => it.next().cloned().ok_or(format!("{name} needs a value"))?,
                };
                w.flags.push((name.to_owned(), Some(value)));
            } else if SWITCHES.contains(&name) && inline.is_none() {
                w.flags.push((name.to_owned(), None));
            } else {
                w.rest.push(a.clone()); // refused where it stands
            }
        }
        Ok(w)
    }

    /// From here on bare keywords count (the positionals are taken).
    fn keywords(&mut self) {
        self.tail = true;
    }

    /// The value of `--name` or (in the tail) `name VALUE`; the last wins.
    fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        Ok(self.values(name)?.pop())
    }

    /// Every value of `--name` and (in the tail) `name VALUE`, in order.
    fn values(&mut self, name: &str) -> Result<Vec<String>, String> {
        let mut found: Vec<String> = Vec::new();
        self.flags.retain(|(n, v)| {
            let hit = n == name && v.is_some();
            if hit {
                found.push(v.clone().unwrap_or_default());
            }
            !hit
        });
        let mut i = 0;
        while self.tail && i < self.rest.len() {
            if self.rest[i] == name {
                if i + 1 >= self.rest.len() {
                    return Err(format!("{name} needs a value"));
                }
                found.push(self.rest.remove(i + 1));
                self.rest.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// `--name` or (in the tail) a bare `name`.
    fn switch(&mut self, name: &str) -> bool {
        let before = self.flags.len() + self.rest.len();
        self.flags.retain(|(n, v)| !(n == name && v.is_none()));
        if self.tail {
            self.rest.retain(|w| w != name);
        }
        self.flags.len() + self.rest.len() != before
    }

    /// The next bare word, whatever it is: a KEY may be named like a keyword.
    fn positional(&mut self, what: &str) -> Result<String, String> {
        if self.rest.is_empty() {
            return Err(format!("missing {what}"));
        }
        let w = self.rest.remove(0);
        if w.starts_with("--") {
            return Err(format!("missing {what} (found option {w})"));
        }
        Ok(w)
    }

    fn done(mut self) -> Result<Global, String> {
        // `host H` and `json` close the seed's lines.
        self.keywords();
        if let Some(h) = self.value("host")? {
            self.global.host = Some(h);
        }
        self.global.json |= self.switch("json");
        if let Some((name, _)) = self.flags.first() {
            return Err(format!("--{name} does not apply here"));
        }
        match self.rest.first() {
            Some(w) => Err(format!("unexpected argument {w:?}")),
            None => Ok(self.global),
        }
    }
}

fn number<T: std::str::FromStr>(what: &str, v: Option<String>) -> Result<Option<T>, String> {
    v.map(|s| {
        s.parse()
            .map_err(|_| format!("{what} must be a positive number, not {s:?}"))
    })
    .transpose()
}

/// Parses everything after the program name.
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let mut words = Words::new(args)?;
    words.global.host = words.value("host")?;
    words.global.token_file = words.value("token-file")?.map(PathBuf::from);
    words.global.tls_certificates = words.value("tls-certificates")?.map(PathBuf::from);
    words.global.json = words.switch("json");
    if words.switch("help") {
        let handler = words.rest.first().and_then(|w| w.parse().ok());
        return Ok(Invocation {
            global: words.global,
            command: Command::Help(handler),
        });
    }
    if words.switch("version") {
        words.rest.insert(0, "version".into());
    }
    let first = words.positional("a command (try: nbd-cli help)")?;
    let command = match first.as_str() {
        "help" => Command::Help(None),
        "version" => Command::Version,
        "info" => Command::Info {
            key: words.positional("KEY")?,
        },
        "stats" => Command::Stats {
            key: words.positional("KEY")?,
        },
        "list" => list(&mut words, None)?,
        "watch" => {
            words.keywords();
            let secs: Option<f64> = number("interval", words.value("interval")?)?;
            let interval = match secs {
                None => crate::watch::DEFAULT_INTERVAL,
                Some(s) if (0.1..=3600.0).contains(&s) => std::time::Duration::from_secs_f64(s),
                Some(s) => return Err(format!("interval must be 0.1 to 3600 seconds, not {s}")),
            };
            Command::Watch { interval }
        }
        h => {
            let handler: Handler = h.parse()?;
            handler_command(&mut words, handler)?
        }
    };
    Ok(Invocation {
        global: words.done()?,
        command,
    })
}

fn list(words: &mut Words, handler: Option<Handler>) -> Result<Command, String> {
    // The filter is optional: `list host H` lists all.
    let filter = match words.rest.first().map(String::as_str) {
        None | Some("host" | "json") => ListFilter::All,
        Some(_) => words.rest.remove(0).parse()?,
    };
    Ok(Command::List { handler, filter })
}

fn handler_command(words: &mut Words, handler: Handler) -> Result<Command, String> {
    let verb = words.positional(&format!(
        "a {handler} command (create, delete, map, unmap, list, info, stats, help)"
    ))?;
    Ok(match verb.as_str() {
        "help" => Command::Help(Some(handler)),
        "create" => {
            let key = words.positional("KEY")?;
            words.keywords();
            let size = words.value("size")?;
            let prealloc = words.switch("prealloc");
            let mut options = BTreeMap::new();
            for kv in words.values("option")? {
                let (k, v) = kv
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| format!("option needs KEY=VALUE, not {kv:?}"))?;
                options.insert(k.to_owned(), v.to_owned());
            }
            // `server H[:PORT]`: sugar for `option server=H[:PORT]`.
            if handler == Handler::Gluster {
                if let Some(server) = words.value("server")? {
                    options.insert("server".into(), server);
                }
            }
            let size = size.ok_or("create needs size SIZE (e.g. size 10G)")?;
            Command::Create {
                handler,
                key,
                size: parse_size(&size).map_err(|e| e.to_string())?,
                prealloc,
                options,
            }
        }
        "resize" => {
            let key = words.positional("KEY")?;
            words.keywords();
            let size = words.value("size")?;
            let shrink = words.switch("allow-shrink");
            let size = size.ok_or("resize needs size SIZE (e.g. size 20G)")?;
            Command::Resize {
                handler,
                key,
                size: parse_size(&size).map_err(|e| e.to_string())?,
                shrink,
            }
        }
        "delete" => Command::Delete {
            handler,
            key: words.positional("KEY")?,
        },
        "map" => {
            let key = words.positional("KEY")?;
            let mut device = match words.rest.first() {
                Some(w) if w.starts_with("/dev/") => Some(words.rest.remove(0)),
                _ => None,
            };
            words.keywords();
            let timeout = number("timeout", words.value("timeout")?)?;
            let connections = number("connections", words.value("connections")?)?;
            if connections == Some(0) {
                return Err("connections must be at least 1".into());
            }
            let readonly = words.switch("readonly");
            let shards = match words.value("shards")? {
                Some(list) => parse_shard_list(&list).map_err(|e| e.to_string())?,
                None => Vec::new(),
            };
            let route = words
                .value("route")?
                .map_or(Ok(IoRoute::Auto), |r| r.parse())?;
            if let Some(d) = words.value("device")? {
                device = Some(d);
            }
            if let Some(d) = &device {
                if crate::kernel::netlink::parse_device(d).is_none() {
                    return Err(format!("bad device {d:?} (expected /dev/nbdN)"));
                }
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
            }
        }
        "unmap" => Command::Unmap {
            handler,
            target: words.positional("/dev/nbdX or KEY")?,
        },
        "list" => list(words, Some(handler))?,
        "info" => Command::Info {
            key: words.positional("KEY")?,
        },
        "stats" => Command::Stats {
            key: words.positional("KEY")?,
        },
        other => {
            return Err(format!(
                "unknown {handler} command {other:?} (try: nbd-cli {handler} help)"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Invocation, String> {
        let args: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse(&args)
    }

    fn cmd(s: &str) -> Command {
        p(s).unwrap_or_else(|e| panic!("{s}: {e}")).command
    }

    #[test]
    fn resize_grammar() {
        assert_eq!(
            cmd("ceph resize rbd/disk0 size 2G"),
            Command::Resize {
                handler: Handler::Ceph,
                key: "rbd/disk0".into(),
                size: 2 << 30,
                shrink: false
            }
        );
        assert!(matches!(
            cmd("ceph resize --size=1M rbd/disk0 --allow-shrink"),
            Command::Resize {
                shrink: true,
                size: 1048576,
                ..
            }
        ));
        assert!(p("ceph resize rbd/disk0").is_err());
    }

    #[test]
    fn gluster_server_keyword_is_an_option() {
        let Command::Create { options, .. } =
            cmd("gluster create vol/a.img size 1G server gl1:24008 option x=y")
        else {
            panic!("not a create");
        };
        assert_eq!(options.get("server").map(String::as_str), Some("gl1:24008"));
        assert_eq!(options.get("x").map(String::as_str), Some("y"));
        // Other handlers have no such keyword.
        assert!(p("mem create a size 1M server gl1").is_err());
    }

    #[test]
    fn seed_grammar() {
        assert_eq!(
            cmd("gluster create vol/a.img prealloc size 1.5G host 10.0.0.1"),
            Command::Create {
                handler: Handler::Gluster,
                key: "vol/a.img".into(),
                size: 3 << 29,
                prealloc: true,
                options: BTreeMap::new()
            }
        );
        assert_eq!(
            p("file create /img/a size 10M host node1:9000")
                .unwrap()
                .global
                .host
                .as_deref(),
            Some("node1:9000")
        );
        assert_eq!(
            cmd("mem map disk0 /dev/nbd3 timeout 30 readonly connections 4"),
            Command::Map {
                handler: Handler::Mem,
                key: "disk0".into(),
                device: Some("/dev/nbd3".into()),
                timeout: Some(30),
                readonly: true,
                connections: Some(4),
                shards: vec![],
                route: IoRoute::Auto,
            }
        );
        assert!(matches!(
            cmd("mem map disk0 connections 3 shards 1,0,auto"),
            Command::Map { connections: Some(3), ref shards, .. }
                if *shards == [Some(1), Some(0), None]
        ));
        assert!(matches!(
            cmd("mem map shards --shards=0-1"),
            Command::Map { ref key, ref shards, .. }
                if key == "shards" && *shards == [Some(0), Some(1)]
        ));
        assert!(matches!(
            cmd("mem map disk0 route tcp"),
            Command::Map {
                route: IoRoute::Tcp,
                ..
            }
        ));
        assert!(matches!(
            cmd("mem map route --route=unix"),
            Command::Map { ref key, route: IoRoute::Unix, .. } if key == "route"
        ));
        assert_eq!(
            cmd("ceph unmap /dev/nbd0"),
            Command::Unmap {
                handler: Handler::Ceph,
                target: "/dev/nbd0".into()
            }
        );
        assert_eq!(
            cmd("file delete /img/a"),
            Command::Delete {
                handler: Handler::File,
                key: "/img/a".into()
            }
        );
        assert_eq!(
            cmd("gluster list dead"),
            Command::List {
                handler: Some(Handler::Gluster),
                filter: ListFilter::Dead
            }
        );
        assert_eq!(
            cmd("mem list"),
            Command::List {
                handler: Some(Handler::Mem),
                filter: ListFilter::All
            }
        );
        assert_eq!(cmd("help"), Command::Help(None));
        assert_eq!(cmd("ceph help"), Command::Help(Some(Handler::Ceph)));
        assert_eq!(cmd("version"), Command::Version);
    }

    #[test]
    fn flag_forms() {
        let inv = p("--json --host [::1]:24110 mem create disk0 --size=1G --prealloc").unwrap();
        assert!(inv.global.json);
        assert_eq!(inv.global.host.as_deref(), Some("[::1]:24110"));
        assert!(
            matches!(inv.command, Command::Create { size, prealloc: true, .. } if size == 1 << 30)
        );
        assert_eq!(
            cmd("mem map disk0 --device /dev/nbd1 --readonly"),
            Command::Map {
                handler: Handler::Mem,
                key: "disk0".into(),
                device: Some("/dev/nbd1".into()),
                timeout: None,
                readonly: true,
                connections: None,
                shards: vec![],
                route: IoRoute::Auto,
            }
        );
        assert_eq!(
            cmd("info disk0"),
            Command::Info {
                key: "disk0".into()
            }
        );
        assert_eq!(
            cmd("mem stats disk0 --json"),
            Command::Stats {
                key: "disk0".into()
            }
        );
        assert_eq!(cmd("--version"), Command::Version);
        assert_eq!(
            cmd("list live"),
            Command::List {
                handler: None,
                filter: ListFilter::Live
            }
        );
    }

    /// Keywords count only where the seed grammar puts them: a backstore
    /// may be named like one.
    #[test]
    fn keys_named_like_keywords() {
        assert!(matches!(
            cmd("mem create size size 1M"),
            Command::Create { ref key, size: 1048576, .. } if key == "size"
        ));
        let inv = p("mem create host size 1M host 127.0.0.1:9").unwrap();
        assert!(matches!(inv.command, Command::Create { ref key, .. } if key == "host"));
        assert_eq!(inv.global.host.as_deref(), Some("127.0.0.1:9"));
        assert_eq!(
            cmd("mem delete json"),
            Command::Delete {
                handler: Handler::Mem,
                key: "json".into()
            }
        );
        assert!(
            matches!(cmd("mem map readonly readonly"), Command::Map { ref key, readonly: true, .. } if key == "readonly")
        );
        assert!(matches!(
            cmd("gluster create vol/host size 1M server host:24007"),
            Command::Create { ref key, ref options, .. }
                if key == "vol/host" && options["server"] == "host:24007"
        ));
        assert!(matches!(cmd("info size"), Command::Info { ref key } if key == "size"));
        // `list host H`: the filter is optional.
        let inv = p("mem list host h:1").unwrap();
        assert_eq!(inv.global.host.as_deref(), Some("h:1"));
        assert!(matches!(
            inv.command,
            Command::List {
                filter: ListFilter::All,
                ..
            }
        ));
    }

    #[test]
    fn watch_grammar() {
        let watch = |s| Command::Watch {
            interval: std::time::Duration::from_secs_f64(s),
        };
        assert_eq!(cmd("watch"), watch(1.0));
        assert_eq!(cmd("watch interval 0.5"), watch(0.5));
        assert_eq!(cmd("watch --interval=5"), watch(5.0));
        let inv = p("watch host 10.0.0.2:24110 interval 2").unwrap();
        assert_eq!(inv.command, watch(2.0));
        assert_eq!(inv.global.host.as_deref(), Some("10.0.0.2:24110"));
    }

    #[test]
    fn mistakes_get_one_line_reasons() {
        for (input, want) in [
            ("", "missing a command"),
            ("nfs create x size 1G", "unknown handler"),
            ("mem create disk0", "needs size"),
            ("mem create disk0 size 12Q", "invalid size"),
            ("mem create size 1G", "needs size"),
            ("mem create", "missing KEY"),
            (
                "mem create a size 1M --bogus",
                "unexpected argument \"--bogus\"",
            ),
            ("mem delete a --size 1M", "--size does not apply"),
            ("host 127.0.0.1:1 mem list", "unknown handler \"host\""),
            ("mem map disk0 connections 0", "at least 1"),
            ("mem map disk0 timeout soon", "positive number"),
            ("mem map disk0 route udp", "auto, unix or tcp"),
            ("mem map disk0 shards one", "not a shard index or auto"),
            ("mem map disk0 shards", "shards needs a value"),
            ("mem map disk0 /dev/sda", "bad device"),
            ("mem map disk0 --device /dev/sda", "bad device"),
            ("mem list sideways", "unknown list filter"),
            ("mem frobnicate", "unknown mem command"),
            ("mem delete a b", "unexpected argument"),
            ("mem create a size", "size needs a value"),
            ("mem create a size 1M option nokey", "KEY=VALUE"),
            ("watch interval 0", "0.1 to 3600"),
            ("watch interval NaN", "0.1 to 3600"),
            ("watch interval soon", "positive number"),
            ("watch /dev/nbd0", "unexpected argument"),
            ("watch --size 1G", "--size does not apply"),
        ] {
            let err = p(input).unwrap_err();
            assert!(err.contains(want), "{input:?}: {err}");
            assert!(!err.contains('\n'), "{input:?}: multi-line error");
        }
    }
}
