#!/bin/bash
# Runs INSIDE the VM booted with VM_INIT=systemd (the host's systemd as PID 1),
# driven by tests/kernel.rs once tests/package.sh has built the package: the
# Debian package installed with dpkg -i, nbd-runner.service started and
# stopped by systemctl (Type=notify: "active" only once the runner said
# READY=1), a device mapped through it, and after `systemctl stop` the
# device reattached by nbd-cli-watch.service once the runner is started
# again, its data intact.
# Env: NBD_DEB (the .deb). Prints GUEST-SYSTEMD-OK at the end.
set -euo pipefail
DEB=${NBD_DEB:?path to the nbd-runner .deb}
export NO_COLOR=1
KEY=/var/lib/nbd-runner/sd.raw
fail() {
  echo "FAIL: $*"
  echo "--- systemctl status:"; systemctl --no-pager status nbd-runner nbd-cli-watch 2>&1 | tail -40 || true
  echo "--- journal:"; journalctl --no-pager -n 60 -u nbd-runner -u nbd-cli-watch 2>&1 || true
  echo "--- dmesg:"; dmesg | tail -20 || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR
. "$(dirname "$0")/guest-lib.sh"
# nbd-cli finds the installed runner by its defaults (/etc/nbd-runner).
unset NBD_RUNNER_TOKEN_FILE

step "systemd is PID 1"
expect_eq "$(cat /proc/1/comm)" systemd "PID 1"
echo "SYSTEMD: PID 1 is $(systemctl --version | head -1)"

step "the package installs and enables nothing"
DEBIAN_FRONTEND=noninteractive dpkg -i "$DEB" >/dev/null
expect_eq "$(systemctl is-enabled nbd-runner 2>&1 || true)" disabled "nbd-runner.service after dpkg -i"
expect_eq "$(systemctl is-active nbd-runner 2>&1 || true)" inactive "nbd-runner.service after dpkg -i"

step "systemctl start: active once READY=1"
# One shard: the guest is small.
echo 'NBD_RUNNER_OPTS="--threads 1"' >/etc/default/nbd-runner
systemctl start nbd-runner
expect_eq "$(systemctl is-active nbd-runner)" active "nbd-runner.service"
status=$(systemctl show -p StatusText --value nbd-runner)
case "$status" in "serving 0 backstore(s)"*) ;; *) fail "StatusText: $status";; esac
expect_eq "$(systemctl show -p WatchdogUSec --value nbd-runner)" 30s "WatchdogUSec"
echo "SYSTEMD: nbd-runner.service active, status: $status"
[ -S /etc/nbd-runner/nbd-runner.sock ] || fail "no control socket: $(ls -la /etc/nbd-runner)"
pid=$(systemctl show -p MainPID --value nbd-runner)
grep -q "CapBnd:.*" /proc/$pid/status
echo "SYSTEMD: runner capabilities $(grep CapEff /proc/$pid/status), VmLck $(awk '/VmLck/ {print $2 $3}' /proc/$pid/status), oom_score_adj $(cat /proc/$pid/oom_score_adj)"
expect_eq "$(cat /proc/$pid/oom_score_adj)" -1000 "oom_score_adj under the unit"

step "a device through the unit's runner"
nbd-cli file create $KEY size 64M >/dev/null
DEV=$(nbd-cli file map $KEY)
head -c 4M /dev/urandom >/tmp/pat
dd if=/tmp/pat of="$DEV" bs=1M oflag=direct status=none
sync
systemctl show -p StatusText --value nbd-runner

step "systemctl stop leaves the device; the watcher reattaches it after start"
systemctl start nbd-cli-watch
expect_eq "$(systemctl is-active nbd-cli-watch)" active "nbd-cli-watch.service"
systemctl stop nbd-runner
expect_eq "$(systemctl is-active nbd-runner || true)" inactive "nbd-runner.service after stop"
[ "$(cat /sys/block/${DEV#/dev/}/size)" -gt 0 ] || fail "$DEV lost its size at the runner's stop"
echo "SYSTEMD: stopped; $DEV still attached ($(cat /sys/block/${DEV#/dev/}/size) sectors)"
systemctl start nbd-runner
for _ in $(seq 300); do
  nbd-cli file list live 2>/dev/null | grep -q "$KEY" && break
  sleep 0.2
done
nbd-cli file list live | grep -q "$KEY" || fail "not reattached: $(nbd-cli file list all 2>&1)"
cmp <(dd if="$DEV" bs=1M count=4 iflag=direct status=none) /tmp/pat || fail "data differs after the restart"
echo "SYSTEMD: reattached by nbd-cli-watch.service, data intact"
journalctl --no-pager -u nbd-cli-watch | grep -i "reattach" | tail -2 || true

step "clean up"
systemctl stop nbd-cli-watch
nbd-cli file unmap "$DEV" >/dev/null
systemctl stop nbd-runner
echo "GUEST-SYSTEMD-OK"
