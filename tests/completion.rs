//! The generated shell completions and man pages, checked by the programs
//! that read them: bash completes through the function `complete -p`
//! names, fish through `complete -C`, zsh parses its script, and man
//! renders both pages.

mod common;
use std::process::Command;

fn generated() -> tempfile::TempDir {
    let dir = common::scratch();
    nbd_cli::cli_docs::generate(dir.path()).expect("generate man pages and completions");
    dir
}

/// What bash offers for the last word of `line`, from the generated script.
fn bash_complete(script: &std::path::Path, line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split(' ').collect();
    let program = format!(
        r#"source "$1"
spec=$(complete -p {bin}) || exit 3
fn=$(sed -n 's/.* -F \([^ ]*\) .*/\1/p' <<<"$spec")
[ -n "$fn" ] || exit 4
COMP_LINE="$2"; COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<<"$2"
case "$2" in *' ') COMP_WORDS+=("");; esac
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
cur=${{COMP_WORDS[COMP_CWORD]}}
prev=${{COMP_WORDS[COMP_CWORD-1]}}
"$fn" {bin} "$cur" "$prev"
printf '%s\n' "${{COMPREPLY[@]}}""#,
        bin = words[0]
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program, "complete"])
        .arg(script)
        .arg(line)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completes_handlers_commands_keywords_and_flags() {
    let dir = generated();
    let cli = dir.path().join("completions/bash/nbd-cli");
    assert_eq!(bash_complete(&cli, "nbd-cli gluster ma"), ["map"]);
    assert_eq!(bash_complete(&cli, "nbd-cli glu"), ["gluster"]);
    let handlers = bash_complete(&cli, "nbd-cli ");
    for h in ["gluster", "ceph", "file", "mem", "watch", "list"] {
        assert!(handlers.iter().any(|w| w == h), "{h} in {handlers:?}");
    }
    assert_eq!(
        bash_complete(&cli, "nbd-cli ceph map rbd/img read"),
        ["readonly"]
    );
    assert_eq!(bash_complete(&cli, "nbd-cli file list de"), ["dead"]);
    let runner = dir.path().join("completions/bash/nbd-runner");
    let flags = bash_complete(&runner, "nbd-runner --tls-");
    for f in ["--tls-certificates", "--tls-verify-peer"] {
        assert!(flags.iter().any(|w| w == f), "{f} in {flags:?}");
    }
    assert!(bash_complete(&runner, "nbd-runner --metr").contains(&"--metrics".to_owned()));
}

#[test]
fn zsh_and_fish_accept_their_scripts_and_fish_completes_them() {
    let dir = generated();
    for (shell, file) in [("zsh", "zsh/_nbd-cli"), ("fish", "fish/nbd-cli.fish")] {
        let path = dir.path().join("completions").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("gluster") && text.contains("map"), "{file}");
        // The shell itself parses the script (.ci/run installs zsh and fish).
        let out = Command::new(shell)
            .arg("-n")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{shell}: {e} (.ci/run installs it)"));
        assert!(
            out.status.success(),
            "{shell} -n {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // fish's own completion engine, on the generated script.
    let fish = dir.path().join("completions/fish/nbd-cli.fish");
    let out = Command::new("fish")
        .arg("-c")
        .arg(format!(
            "source {}; complete -C 'nbd-cli gluster ma'",
            fish.display()
        ))
        .output()
        .expect("fish");
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.lines().any(|l| l.split('\t').next() == Some("map")),
        "fish completes 'nbd-cli gluster ma' to: {got:?}"
    );
}

#[test]
fn man_renders_both_pages() {
    let dir = generated();
    for (page, want) in [
        (
            "nbd-runner.8",
            vec!["--metrics", "--config", "--cpus", "--tls-certificates"],
        ),
        (
            "nbd-cli.8",
            vec!["map KEY", "watch", "dead", "live", "connections"],
        ),
    ] {
        let path = dir.path().join("man").join(page);
        let out = Command::new("man")
            .args(["-l", "-P", "cat"])
            .arg(&path)
            .env("MANWIDTH", "200")
            .output()
            .expect("man (man-db)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "man -l {page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for w in want {
            assert!(text.contains(w), "{page} lacks {w:?}:\n{text}");
        }
    }
}
