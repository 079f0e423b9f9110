#!/usr/bin/env bash
# The Debian package, for real (root): builds it with cargo deb, installs it
# with dpkg -i, and checks what an operator would use from the installed
# paths: the binaries, man pages, units (systemd-analyze verify), bash
# completion, the config and state directory modes, that nothing was
# enabled, and that the installed runner starts with the installed config.
# Then removes it. Run by tests/run.sh after the gluster and ceph setup
# (the package links Debian's libgfapi and librbd).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "package: $*" >&2; }
fail() { echo "package: FAIL: $*" >&2; exit 1; }

command -v cargo-deb >/dev/null || cargo install --quiet --locked cargo-deb@3.8.0
dist/build-deb.sh --quiet >/dev/null
deb=$(ls -t target/debian/nbd-runner_*.deb | head -1)
say "built $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb --info "$deb" | grep -E "^ (Package|Depends):" >&2
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" >/dev/null

v=$(/usr/sbin/nbd-runner --version)
[ "$v" = "nbd-runner $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" ] || fail "version: $v"
/usr/sbin/nbd-cli version >/dev/null || fail "nbd-cli version"
say "$v"
for page in nbd-runner nbd-cli; do
  p=$(man -w "$page") || fail "man -w $page"
  [ "$p" = "/usr/share/man/man8/$page.8.gz" ] || [ "$p" = "/usr/share/man/man8/$page.8" ] || fail "man -w $page: $p"
  say "man -w $page: $p"
done
systemd-analyze verify /lib/systemd/system/nbd-runner.service /lib/systemd/system/nbd-cli-watch.service \
  || fail "systemd-analyze verify"
say "systemd-analyze verify: both units accepted"
[ "$(stat -c %a /etc/nbd-runner)" = 700 ] || fail "/etc/nbd-runner is $(stat -c %a /etc/nbd-runner)"
[ "$(stat -c %a /var/lib/nbd-runner)" = 700 ] || fail "/var/lib/nbd-runner is $(stat -c %a /var/lib/nbd-runner)"
[ "$(stat -c %a /etc/nbd-runner/nbd-runner.toml)" = 600 ] || fail "config mode"
# postinst enables and starts nothing.
if ls /etc/systemd/system/*.wants/nbd-* 2>/dev/null; then fail "a unit was enabled"; fi
say "state 0700, config 0600, no unit enabled"

# The installed completion, through bash's own completion machinery.
got=$(bash --norc -c '
  source /usr/share/bash-completion/completions/nbd-cli
  fn=$(complete -p nbd-cli | sed -n "s/.* -F \([^ ]*\) .*/\1/p")
  COMP_WORDS=(nbd-cli gluster ma); COMP_CWORD=2; COMP_LINE="nbd-cli gluster ma"; COMP_POINT=${#COMP_LINE}
  "$fn" nbd-cli ma gluster; printf "%s\n" "${COMPREPLY[@]}"')
[ "$got" = map ] || fail "bash completion of 'nbd-cli gluster ma': $got"
say "bash: 'nbd-cli gluster ma' completes to map"

# The installed runner with the installed (all-defaults) config.
st=$(mktemp -d)
out=$(mktemp)
/usr/sbin/nbd-runner --config /etc/nbd-runner/nbd-runner.toml --state-dir "$st" \
  --ioport 0 --rpcport 0 --no-swap-safety --export mem:pkg,size=1M >"$out" 2>"$st.log" &
pid=$!
for _ in $(seq 100); do grep -q "nbd-runner ready" "$out" && break; sleep 0.1; done
grep -q "nbd-runner ready" "$out" || { cat "$st.log" >&2; fail "the installed runner did not start"; }
io=$(sed -n 's/.* io=\([^ ]*\).*/\1/p' "$out")
nbdinfo --size "nbd://$io/pkg" | grep -qx 1048576 || fail "nbdinfo on the installed runner"
kill -TERM "$pid"; wait "$pid" || fail "the installed runner's exit"
rm -rf "$st" "$st.log" "$out"
say "the installed runner serves with the installed config"

dpkg -r nbd-runner >/dev/null
[ ! -e /usr/sbin/nbd-runner ] || fail "dpkg -r left the binary"
say "removed; /etc/nbd-runner kept (state)"
echo "PACKAGE-OK"
