//! nbd-cli: the operator's tool. Talks to a runner's control route and maps
//! exports to /dev/nbdX through the kernel's netlink NBD family.

use nbd_cli::{cli_args, commands};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let inv = match cli_args::parse(&args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("nbd-cli: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = commands::run(inv) {
        // One line: the chain of causes joined.
        eprintln!("nbd-cli: {}", nbd_cli::one_line(&e));
        std::process::exit(1);
    }
}
