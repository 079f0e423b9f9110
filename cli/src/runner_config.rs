//! `nbd-runner --config FILE`: a TOML file whose keys are the runner's long
//! flags without the dashes (`iohost = "0.0.0.0"`, `threads = 4`,
//! `list-exports = true`, `export = ["mem:a,size=1G", ...]`). The file's
//! settings go in front of the command line's flags, which therefore
//! override them (lists, `export` and `file-root`, add up). The same clap
//! definitions check both, so a key means exactly what its flag means.

use clap::CommandFactory;
use std::path::Path;

/// The largest config file read: settings, not data.
const MAX_CONFIG: u64 = 1 << 20;

/// `args` (already [`normalize`](crate::runner_args::normalize)d) with the
/// settings of the `--config` file they name, if any, in front of them.
pub fn with_config(args: Vec<String>) -> Result<Vec<String>, String> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let text = read(Path::new(&path)).map_err(|e| format!("--config {path}: {e}"))?;
    let settings = to_flags(&text).map_err(|e| format!("--config {path}: {e}"))?;
    let mut out = Vec::with_capacity(args.len() + settings.len());
    let mut args = args.into_iter();
    out.extend(args.next());
    out.extend(settings);
    out.extend(args);
    Ok(out)
}

fn config_path(args: &[String]) -> Option<String> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.to_owned());
        }
    }
    None
}

fn read(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX_CONFIG + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_CONFIG {
        return Err(format!("larger than {MAX_CONFIG} bytes"));
    }
    Ok(text)
}

/// The line (1-based) a byte offset of `text` is on.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The flags a config file's text stands for.
pub fn to_flags(text: &str) -> Result<Vec<String>, String> {
    let doc: toml::Spanned<toml::Table> = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let msg = e.message().trim().to_owned();
        match line {
            Some(l) => format!("line {l}: {msg}"),
            None => msg,
        }
    })?;
    let cmd = crate::runner_args::RunnerArgs::command();
    let mut flags = Vec::new();
    for (key, value) in doc.get_ref() {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| !matches!(key.as_str(), "config" | "help" | "version"))
            .ok_or_else(|| {
                format!("unknown setting {key:?} (settings are nbd-runner's long flags without the dashes)")
            })?;
        let takes_value = arg.get_action().takes_values();
        let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!("{key}: takes a string or a number")),
            }
        };
        match value {
            toml::Value::Boolean(on) if !takes_value => {
                if *on {
                    flags.push(format!("--{key}"));
                }
            }
            _ if !takes_value => return Err(format!("{key}: a switch, takes true or false")),
            toml::Value::Array(items) if repeatable => {
                for v in items {
                    flags.push(format!("--{key}={}", scalar(v)?));
                }
            }
            toml::Value::Array(_) => return Err(format!("{key}: takes one value, not a list")),
            v => flags.push(format!("--{key}={}", scalar(v)?)),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner_args::RunnerArgs;
    use clap::Parser;

    fn parse(config: &str, cli: &[&str]) -> Result<RunnerArgs, String> {
        let mut args = vec!["nbd-runner".to_owned()];
        args.extend(cli.iter().map(|s| s.to_string()));
        let mut all = vec![args[0].clone()];
        all.extend(to_flags(config)?);
        all.extend(args.into_iter().skip(1));
        RunnerArgs::try_parse_from(all).map_err(|e| e.to_string())
    }

    #[test]
    fn settings_are_the_long_flags() {
        let a = parse(
            "iohost = \"::1\"\nthreads = 3\nlist-exports = true\nno-pin = false\n\
             export = [\"mem:a,size=1M\", \"mem:b,size=1M\"]\nmem-limit = \"2G\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(a.iohost.to_string(), "::1");
        assert_eq!(a.threads, Some(3));
        assert!(a.list_exports && !a.no_pin);
        assert_eq!(a.exports.len(), 2);
        assert_eq!(a.mem_limit, Some(2 << 30));
    }

    #[test]
    fn flags_override_the_file_and_lists_add_up() {
        let a = parse(
            "threads = 3\nioport = 1\nexport = [\"mem:a,size=1M\"]\n",
            &["--threads", "5", "--export", "mem:b,size=1M"],
        )
        .unwrap();
        assert_eq!(a.threads, Some(5));
        assert_eq!(a.ioport, 1);
        assert_eq!(a.exports.len(), 2);
    }

    #[test]
    fn mistakes_get_one_line_naming_the_key_or_line() {
        let e = |c: &str| parse(c, &[]).unwrap_err();
        assert!(e("iohots = \"x\"").contains("unknown setting \"iohots\""));
        assert!(e("config = \"/x\"").contains("unknown setting \"config\""));
        assert!(e("threads = [1, 2]").contains("threads: takes one value"));
        assert!(e("list-exports = \"yes\"").contains("list-exports: a switch"));
        assert!(e("export = [{ a = 1 }]").contains("export: takes a string"));
        assert!(e("a = 1\nb = = 2\n").starts_with("line 2:"));
        // clap checks the values the same way it checks flags.
        assert!(e("threads = 0").contains("--threads"));
        for msg in [e("iohots = 1"), e("a = 1\nb = = 2\n")] {
            assert_eq!(msg.lines().count(), 1, "{msg}");
        }
    }

    #[test]
    fn the_path_is_found_in_both_spellings() {
        let v = |s: &[&str]| config_path(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(v(&["r", "--config", "/a"]), Some("/a".into()));
        assert_eq!(
            v(&["r", "--threads", "2", "--config=/b"]),
            Some("/b".into())
        );
        assert_eq!(v(&["r", "--threads", "2"]), None);
    }
}
