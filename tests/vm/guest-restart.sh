#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh), driven by tests/kernel.rs: restarts and an
# upgrade of the runner under load, with `nbd-cli watch` reattaching, lose no I/O.
#   ext4 on a 2-connection /dev/nbdX; fio randwrite with verify=crc32c plus randread,
#   iodepth 32; meanwhile the runner is stopped with SIGTERM and started twice, killed with
#   kill -9 and started once, and stopped and started from a replaced binary (the upgrade).
#   fio must finish with no error and its verify pass, dmesg must show no I/O error,
#   ext4 must stay writable, and `nbd-cli list` must count the four reattaches.
# Env: NBD_RUNNER, NBD_CLI (paths of the binaries). Prints GUEST-RESTART-OK at the end.
set -euo pipefail
CLI=${NBD_CLI:?path to nbd-cli}
KEY=/tmp/restart.raw
MNT=/tmp/mnt
export RUST_LOG=${RUST_LOG:-info} NO_COLOR=1
fail() {
  echo "FAIL: $*"
  echo "--- fio:"; tail -40 /tmp/fio.out 2>/dev/null || true
  echo "--- watch:"; cat /tmp/watch.log 2>/dev/null || true
  echo "--- runner log:"; tail -40 /tmp/runner.log 2>/dev/null || true
  echo "--- dmesg:"; dmesg | tail -30 || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR
# The upgrade replaces the binary the runner starts from, as a package
# manager does: a new file renamed over the old path.
mkdir -p /tmp/bin
cp "${NBD_RUNNER:?path to nbd-runner}" /tmp/bin/nbd-runner
RUNNER=/tmp/bin/nbd-runner
. "$(dirname "$0")/guest-lib.sh"
state_of() { "$CLI" info "$KEY" --json | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p'; }
reattaches() { "$CLI" info "$KEY" --json | sed -n 's/.*"reattaches": \([0-9]*\).*/\1/p'; }

rm -rf /tmp/st $KEY $MNT /tmp/runner.log /tmp/watch.log /tmp/fio.out
mkdir -p $MNT
start_runner

step "map with 2 connections, ext4, and nbd-cli watch"
"$CLI" file create $KEY size 512M
# Unanswered requests are requeued when their request timeout fires: 10 s,
# not the default 30, keeps the test short.
DEV=$("$CLI" file map $KEY connections 2 timeout 10)
N=${DEV#/dev/nbd}
mkfs.ext4 -q -F "$DEV"
mount "$DEV" $MNT
"$CLI" watch >/tmp/watch.log 2>&1 &
WP=$!
for _ in $(seq 100); do
  grep -q "watching the runner" /tmp/watch.log && break
  sleep 0.1
done
grep -q "watching the runner" /tmp/watch.log || fail "nbd-cli watch did not start"
dmesg -C

step "fio: randwrite with verify and randread, iodepth 32, while the runner restarts"
# Rate-limited so the write phase outlasts the four restarts on an emulated CPU;
# the verify pass reads back every block written after it.
fio --output=/tmp/fio.out \
  --ioengine=libaio --direct=1 --bs=4k --iodepth=32 --directory=$MNT \
  --name=write --rw=randwrite --size=40M --rate_iops=250 \
  --verify=crc32c --verify_fatal=1 --verify_backlog=2048 \
  --name=read --rw=randread --size=24M --rate_iops=250 --time_based --runtime=75 \
  >/dev/null 2>/tmp/fio.err &
FP=$!
T0=$(date +%s.%N)
since() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}'; }

# wait_mapped: until watch has reattached the device and the runner says mapped.
wait_mapped() {
  local want=$1
  echo "[$(since)s] runner started"
  for _ in $(seq 600); do
    [ "$(reattaches)" = "$want" ] && [ "$(state_of)" = mapped ] && return 0
    sleep 0.1
  done
  fail "not reattached ($want) within 60 s: state $(state_of), reattaches $(reattaches)"
}
# load_running: fio must still be running, or the restart proved nothing.
load_running() {
  kill -0 $FP 2>/dev/null || fail "fio finished before restart $1"
}

sleep 8
load_running 1
echo "[$(since)s] SIGTERM"
kill -TERM $RP
wait $RP || fail "the runner did not exit 0 on SIGTERM"
echo "[$(since)s] the runner exited"
start_runner
wait_mapped 1
echo "[$(since)s] RESTART: 1 (SIGTERM) reattached"

sleep 5
load_running 2
echo "[$(since)s] SIGTERM"
kill -TERM $RP
wait $RP || fail "the runner did not exit 0 on SIGTERM"
echo "[$(since)s] the runner exited"
start_runner
wait_mapped 2
echo "[$(since)s] RESTART: 2 (SIGTERM) reattached"

sleep 5
load_running 3
echo "[$(since)s] kill -9"
kill -9 $RP
wait $RP 2>/dev/null || true
start_runner
wait_mapped 3
echo "[$(since)s] RESTART: 3 (kill -9) reattached"

sleep 5
load_running 4
kill -TERM $RP
wait $RP || fail "the runner did not exit 0 on SIGTERM"
cp "$NBD_RUNNER" /tmp/bin/nbd-runner.new
mv -f /tmp/bin/nbd-runner.new /tmp/bin/nbd-runner
start_runner
wait_mapped 4
echo "[$(since)s] RESTART: 4 (upgrade: SIGTERM, binary replaced, start) reattached"

step "fio finishes clean"
rc=0
wait $FP || rc=$?
cat /tmp/fio.out
[ "$rc" = 0 ] || fail "fio exited $rc: $(cat /tmp/fio.err)"
[ "$(grep -c 'err= 0' /tmp/fio.out)" = 2 ] || fail "fio reports errors"
if grep -qiE "verify|bad magic|crc32c" /tmp/fio.err; then fail "fio verify: $(cat /tmp/fio.err)"; fi
grep -qE "write: IOPS=" /tmp/fio.out || fail "no write results"
echo "RESTART: fio finished with 0 errors and verify passed"

step "no I/O error at the kernel; ext4 writable"
dmesg >/tmp/dmesg.txt
if grep -iE "I/O error|EXT4-fs (error|warning)|read-only|blk_update_request|Buffer I/O" /tmp/dmesg.txt; then
  fail "the kernel saw I/O errors"
fi
echo written-after >$MNT/after
sync
echo "RESTART: dmesg shows no I/O error on nbd$N; ext4 still writable"
echo "--- the kernel's nbd messages:"
grep -iE "nbd" /tmp/dmesg.txt | sed 's/^/  /' | tail -60

step "list counts the reattaches; watch said what it did"
"$CLI" list
"$CLI" list | grep -E "^file +$KEY .* 4 \(" >/dev/null || fail "list does not show 4 reattaches"
cat /tmp/watch.log
[ "$(grep -c "reattached $DEV to file $KEY" /tmp/watch.log)" = 4 ] || fail "watch did not report 4 reattaches"
echo "RESTART: list shows 4 reattaches"

step "watch stops cleanly"
kill -TERM $WP
wait $WP || fail "watch did not exit 0 on SIGTERM"
tail -1 /tmp/watch.log | grep -q stopped || fail "watch did not say it stopped"
umount $MNT
"$CLI" file unmap "$DEV"
kill -TERM $RP
wait $RP
echo GUEST-RESTART-OK
