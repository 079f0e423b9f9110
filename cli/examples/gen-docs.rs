//! Writes the man pages and shell completions of both binaries from the
//! clap definitions they use: `cargo run -p nbd-cli --example gen-docs -- DIR`
//! gives DIR/man/{nbd-runner,nbd-cli}.8 and DIR/completions/{bash,zsh,fish}/.
//! dist/build-deb.sh runs it before cargo deb packages the files.

fn main() -> std::io::Result<()> {
    let out = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/docs".into()),
    );
    nbd_cli::cli_docs::generate(&out)?;
    println!("{}", out.display());
    Ok(())
}
