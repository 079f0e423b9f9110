//! nbd-cli's grammar as a clap `Command`, for its man page and its shell
//! completions (clap_mangen, clap_complete; `examples/gen-docs.rs`). The
//! parser itself is the seed's keyword grammar (`cli_args`), which clap
//! cannot express; this tree is built from the parser's own vocabulary
//! (handlers, [`HANDLER_VERBS`], [`TOP_VERBS`], its flags) and its help
//! text, and the tests below run every command it names through the
//! parser, so the two cannot drift apart.

use crate::cli_args::{HANDLER_VERBS, SWITCHES, TOP_VERBS, VALUE_FLAGS};
use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;
use nbd_control::model::Handler;
use std::path::Path;

const STATES: &str = "\
Backstore states (nbd-cli list and info):
  created    created, or unmapped: no device holds it
  live       mapped to /dev/nbdX, its IO connections up
  dead       mapped, but its IO connections were lost (the runner restarted
             without unmapping); `nbd-cli map` or `nbd-cli watch` reattaches it
  mapping, unmapping   a map or unmap in progress
  static     served from the runner's --export flags: never mapped or saved";

/// Bare keywords after a command's KEY, offered as completions.
fn keywords(words: &'static [&'static str]) -> Arg {
    Arg::new("WORDS")
        .num_args(0..)
        .action(ArgAction::Append)
        .value_parser(clap::builder::PossibleValuesParser::new(words))
        .help("keywords of the seed grammar (see DESCRIPTION)")
}

fn verb(name: &'static str, words: &'static [&'static str], takes_key: bool) -> Command {
    let mut c = Command::new(name).disable_help_flag(true);
    if takes_key {
        c = c.arg(Arg::new("KEY").help("backstore key (see DESCRIPTION)"));
    }
    if !words.is_empty() {
        c = c.arg(keywords(words));
    }
    c
}

/// Verbs that take a KEY (or a device) right after them.
fn takes_key(name: &str) -> bool {
    !matches!(name, "help" | "version" | "watch" | "list")
}

/// The whole grammar.
pub fn command() -> Command {
    let mut cmd = Command::new("nbd-cli")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Creates, deletes, maps, unmaps and lists nbd-runner backstores")
        .long_about(format!(
            "{}\n{STATES}",
            crate::commands::help(None).replace('\t', "    ")
        ))
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true);
    for flag in VALUE_FLAGS {
        cmd = cmd.arg(
            Arg::new(flag)
                .long(flag)
                .num_args(1)
                .global(true)
                .value_hint(match flag {
                    "token-file" | "tls-certificates" => clap::ValueHint::AnyPath,
                    "host" => clap::ValueHint::Hostname,
                    _ => clap::ValueHint::Other,
                }),
        );
    }
    for flag in SWITCHES {
        cmd = cmd.arg(
            Arg::new(flag)
                .long(flag)
                .action(ArgAction::SetTrue)
                .global(true),
        );
    }
    for h in Handler::ALL {
        let mut sub = Command::new(h.name())
            .about(format!("{h} backstores (keys: {})", h.key_form()))
            .disable_help_flag(true)
            .disable_help_subcommand(true);
        for (name, words) in HANDLER_VERBS {
            sub = sub.subcommand(verb(name, words, takes_key(name)));
        }
        cmd = cmd.subcommand(sub);
    }
    for (name, words) in TOP_VERBS {
        cmd = cmd.subcommand(verb(name, words, takes_key(name)));
    }
    cmd
}

fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, bytes)
}

/// Both binaries' man pages (`out/man/NAME.8`) and bash, zsh and fish
/// completions (`out/completions/SHELL/...`).
pub fn generate(out: &Path) -> std::io::Result<()> {
    let commands = [crate::runner_args::RunnerArgs::command(), command()];
    for cmd in commands {
        let name = cmd.get_name().to_owned();
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .section("8")
            .manual("System Administration")
            .source(format!("nbd-runner {}", env!("CARGO_PKG_VERSION")))
            .render(&mut page)?;
        write(&out.join("man").join(format!("{name}.8")), &page)?;
        for (shell, file) in [
            (Shell::Bash, name.clone()),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut script);
            if shell == Shell::Bash {
                // clap_complete 4.6 labels the subcommands of a binary
                // whose name has a '-' as if the '-' split two commands
                // ("nbd__subcmd__cli__subcmd__map" against the
                // "nbd__cli__subcmd__map" it matches on), so nothing past
                // the first word would complete. tests/completion.rs holds it.
                let text = String::from_utf8(script).expect("utf-8 script");
                let broken = name.replace('-', "__subcmd__");
                script = text.replace(&broken, &name.replace('-', "__")).into_bytes();
            }
            write(
                &out.join("completions").join(shell.to_string()).join(file),
                &script,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli_args::parse;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// A well-formed use of each command: what its KEY and keywords need.
    fn example(handler: Option<&str>, verb: &str) -> String {
        let h = handler.map_or(String::new(), |h| format!("{h} "));
        let tail = match verb {
            "create" => " k size 1M",
            "resize" => " k size 2M",
            "list" | "help" | "version" | "watch" => "",
            _ => " k",
        };
        format!("{h}{verb}{tail}")
    }

    #[test]
    fn every_command_the_tree_names_is_one_the_parser_takes() {
        let tree = command();
        let mut seen = 0;
        for sub in tree.get_subcommands() {
            let name = sub.get_name();
            if sub.has_subcommands() {
                for v in sub.get_subcommands() {
                    let line = example(Some(name), v.get_name());
                    parse(&args(&line)).unwrap_or_else(|e| panic!("{line}: {e}"));
                    seen += 1;
                }
            } else {
                let line = example(None, name);
                parse(&args(&line)).unwrap_or_else(|e| panic!("{line}: {e}"));
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            Handler::ALL.len() * HANDLER_VERBS.len() + TOP_VERBS.len()
        );
    }

    #[test]
    fn every_keyword_the_tree_offers_is_one_the_parser_knows() {
        // A keyword the parser does not know stays an unexpected word.
        let with = |verb: &str, word: &str| {
            let value = match word {
                "size" => " 1M",
                "option" => " a=b",
                "server" | "host" => " h",
                "timeout" | "connections" | "interval" => " 5",
                "shards" => " 0",
                "route" => " tcp",
                _ => "",
            };
            format!("{} {word}{value}", example(Some("gluster"), verb))
        };
        for (verb, words) in HANDLER_VERBS {
            for word in *words {
                let line = with(verb, word);
                parse(&args(&line)).unwrap_or_else(|e| panic!("{line}: {e}"));
            }
        }
        assert!(parse(&args("gluster map k frobnicate")).is_err());
        assert!(parse(&args("gluster frobnicate k")).is_err());
    }

    #[test]
    fn the_tree_is_a_valid_clap_command() {
        command().debug_assert();
    }
}
