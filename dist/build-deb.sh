#!/usr/bin/env bash
# Builds the Debian package: target/debian/nbd-runner_VERSION_ARCH.deb.
# Needs cargo-deb (cargo install cargo-deb) and, for the gluster and ceph
# handlers, libglusterfs-dev and librbd-dev (tests/run.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
# Man pages and completions from the binaries' own clap definitions.
cargo run --quiet -p nbd-cli --example gen-docs -- target/docs >/dev/null
cargo deb -p nbd-cli "$@"
