#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh), driven by tests/kernel.rs.
# Real-kernel attach through nbd_cli::kernel (the nbd-attach example) against nbd-runner:
#   connect (2 connections) -> sysfs size + backend cookie -> ext4 round trip -> disconnect ->
#   connect again, data identical -> kill -9 the runner, restart it, RECONFIGURE the same device
#   (wrong cookie refused first), data still readable and writable -> read-only map refuses writes.
# Env: NBD_RUNNER, NBD_ATTACH (paths of the binaries). Prints GUEST-ATTACH-OK at the end.
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
ATTACH=${NBD_ATTACH:?path to the nbd-attach example}
ADDR=127.0.0.1:24111
EXPORT=/tmp/disk.raw
MNT=/tmp/mnt
export RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1
T0=$(date +%s.%N)
t() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%6.2f", b - a}'; }
fail() {
  echo "FAIL: $*"
  echo "--- runner log:"; tail -30 /tmp/runner.log 2>/dev/null || true
  echo "--- dmesg (nbd):"; dmesg | grep -i -E 'nbd|block' | tail -30 || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR

. "$(dirname "$0")/guest-lib.sh"
# Timestamped steps here: this script's timings are read from the output.
step() { echo "[$(t)s] --- $*"; }
start_file_runner() { start_runner --ioport 24111 --rpcport 0 --export file:$EXPORT,size=256M; }
sysfs() { cat "/sys/block/nbd$1/$2"; }

echo "kernel $(uname -r); nbd module: $(grep -c '^nbd ' /proc/modules) loaded"
rm -rf /tmp/st $EXPORT $MNT /tmp/runner.log
mkdir -p $MNT
head -c 20M /dev/urandom >/tmp/rand.bin

step "start nbd-runner"
start_file_runner

step "connect, 2 connections"
DEV=$("$ATTACH" connect $ADDR $EXPORT 2)
N=${DEV#/dev/nbd}
echo "mapped $DEV"
expect_eq "$(sysfs "$N" size)" $((256 * 1024 * 1024 / 512)) "size in 512-byte sectors"
expect_eq "$(sysfs "$N" backend)" "$EXPORT" "backend cookie"
expect_eq "$(sysfs "$N" queue/logical_block_size)" 4096 "logical block size"
expect_eq "$(sysfs "$N" ro)" 0 "ro"
expect_eq "$("$ATTACH" status "$N")" connected "status after connect"
expect_eq "$(ls /sys/block/nbd"$N"/pid >/dev/null && echo yes)" yes "pid attribute"
echo "size $(sysfs "$N" size) sectors, backend $(sysfs "$N" backend), status connected"

step "mkfs.ext4, mount, write 20 MiB, sync, umount"
ext4_store "$DEV"

step "disconnect"
"$ATTACH" disconnect "$N"
expect_eq "$("$ATTACH" status "$N")" disconnected "status after disconnect"
[ ! -e /sys/block/nbd"$N"/backend ] || fail "backend attribute left after disconnect"

step "connect again, mount, compare"
DEV=$("$ATTACH" connect $ADDR $EXPORT 2)
N=${DEV#/dev/nbd}
echo "mapped $DEV"
ext4_same "$DEV" "after reconnect"
echo "20 MiB file identical after disconnect/connect"

step "kill -9 nbd-runner with the filesystem mounted"
kill -9 $RP
wait $RP 2>/dev/null || true
# The kernel's receive threads see the connections drop and mark them dead.
for _ in $(seq 50); do
  dmesg | grep -q "nbd$N: Receive control failed" && break
  sleep 0.1
done
echo "kernel: $(dmesg | grep "nbd$N:" | grep -v reconnected | tail -2 | sed 's/^\[[^]]*\] //' | tr '\n' ';')"
expect_eq "$("$ATTACH" status "$N")" connected "status with dead connections (config held)"

step "restart nbd-runner; reconfigure with a wrong cookie is refused"
start_file_runner
if out=$(NBD_ATTACH_COOKIE=someone-else "$ATTACH" reconfigure "$N" $ADDR $EXPORT 2 2>&1); then
  fail "reconfigure with a wrong cookie succeeded"
fi
echo "refused: $out"
grep -q "serves backend" <<<"$out" || fail "unexpected refusal: $out"

step "reconfigure /dev/nbd$N with 2 new connections"
before=$(dmesg | grep -c "nbd$N: reconnected socket" || true)
"$ATTACH" reconfigure "$N" $ADDR $EXPORT 2
after=$(dmesg | grep -c "nbd$N: reconnected socket" || true)
echo "kernel: $((after - before)) socket(s) reconnected"
[ $((after - before)) -ge 1 ] || fail "the kernel reconnected no socket"
echo 3 >/proc/sys/vm/drop_caches
cmp /tmp/rand.bin $MNT/f || fail "data differs after reconfigure"
echo "20 MiB file identical after kill -9 + restart + reconfigure"
echo after-reconfigure >$MNT/g
sync
umount $MNT
"$ATTACH" disconnect "$N"

step "read-only connect"
DEV=$("$ATTACH" connect $ADDR $EXPORT 1 readonly)
N=${DEV#/dev/nbd}
echo "mapped $DEV read-only"
expect_eq "$(sysfs "$N" ro)" 1 "ro"
if dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/tmp/dd.err; then
  fail "dd to a read-only device succeeded"
fi
echo "dd refused: $(head -1 /tmp/dd.err)"
ext4_same "$DEV" "on the read-only mapping" ro
expect_eq "$(cat $MNT/g)" after-reconfigure "file written after reconfigure"
if touch $MNT/h 2>/dev/null; then fail "write to a read-only mount succeeded"; fi
umount $MNT
"$ATTACH" disconnect "$N"

step "explicit device index"
DEV=$("$ATTACH" connect $ADDR $EXPORT 1 /dev/nbd5)
expect_eq "$DEV" /dev/nbd5 "device chosen"
if "$ATTACH" connect $ADDR $EXPORT 1 /dev/nbd5 2>/tmp/busy.err; then fail "second connect to a busy device succeeded"; fi
echo "busy: $(cat /tmp/busy.err)"
grep -q busy /tmp/busy.err || fail "busy device error unclear"
"$ATTACH" disconnect 5

step "stop nbd-runner"
kill -TERM $RP
wait $RP || fail "nbd-runner exited non-zero on SIGTERM"
echo "GUEST-ATTACH-OK in $(t)s"
