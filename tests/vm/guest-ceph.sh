#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh), driven by tests/kernel.rs: a kernel map of a
# ceph backstore, and a resize that reaches the kernel. The guest has no NIC, so it starts
# its own cluster on its loopback (mon + memstore OSD, no mgr) with tests/ceph/start-ceph.sh,
# then:
#   nbd-cli ceph create 64M -> map (2 connections) -> data written -> resize to 128M while
#   mapped: /dev/nbdX grows without a remap, old data intact, the new tail written and read
#   -> shrink needs allow-shrink, then the device shrinks -> unmap -> delete.
# Env: NBD_RUNNER, NBD_CLI (built with the ceph feature), REPO. Prints GUEST-CEPH-OK.
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
CLI=${NBD_CLI:?path to nbd-cli}
REPO=${REPO:?path to the repository}
KEY=rbd/vmdisk
CEPH=/tmp/ceph-vm
export RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1
fail() {
  echo "FAIL: $*"
  echo "--- runner log:"; tail -30 /tmp/runner.log 2>/dev/null || true
  echo "--- osd log:"; tail -20 $CEPH/log/osd.0.log 2>/dev/null || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR
. "$(dirname "$0")/guest-lib.sh"
MiB=$((1 << 20))
size_of() { echo $(( $(cat "/sys/block/$(basename "$1")/size") * 512 )); }

step "a ceph cluster inside the guest"
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
# The OSD files itself in the crush map under the hostname; the guest's is "(none)".
echo nbd-vm >/proc/sys/kernel/hostname
CEPH_WITH_MGR=0 CEPH_OSD_BYTES=$((1 << 30)) CEPH_WAIT_TIMEOUT=240 \
  bash "$REPO/tests/ceph/start-ceph.sh" $CEPH 2>&1 | tail -2

step "runner, create 64M, map with 2 connections"
start_runner --ceph-conf $CEPH/ceph.conf
"$CLI" ceph create $KEY size 64M
DEV=$("$CLI" ceph map $KEY connections 2)
echo "mapped $DEV"
[ "$(size_of "$DEV")" = $((64 * MiB)) ] || fail "kernel size $(size_of "$DEV") after map"
head -c $((8 * MiB)) /dev/urandom >/tmp/head.bin
dd if=/tmp/head.bin of="$DEV" bs=1M oflag=direct status=none

step "grow to 128M while mapped"
"$CLI" ceph resize $KEY size 128M
[ "$(size_of "$DEV")" = $((128 * MiB)) ] || fail "kernel size $(size_of "$DEV") after growing"
[ "$(blockdev --getsize64 "$DEV")" = $((128 * MiB)) ] || fail "blockdev disagrees after growing"
head -c $((4 * MiB)) /dev/urandom >/tmp/tail.bin
# The new range, past the old end, through the same device.
dd if=/tmp/tail.bin of="$DEV" bs=1M seek=120 oflag=direct status=none
cmp <(dd if="$DEV" bs=1M skip=120 count=4 iflag=direct status=none) /tmp/tail.bin \
  || fail "the grown range did not read back"
cmp <(dd if="$DEV" bs=1M count=8 iflag=direct status=none) /tmp/head.bin \
  || fail "data before the old end changed"
rbd -c $CEPH/ceph.conf info $KEY | grep -q "size 128 MiB" || fail "librbd image not 128 MiB"
echo "CEPH: the kernel sees 128 MiB after resize, data intact"

step "shrink to 96M needs allow-shrink, then reaches the kernel"
if "$CLI" ceph resize $KEY size 96M 2>/tmp/shrink.err; then fail "shrink without allow-shrink"; fi
grep -q allow-shrink /tmp/shrink.err || fail "shrink refusal does not say how: $(cat /tmp/shrink.err)"
[ "$(size_of "$DEV")" = $((128 * MiB)) ] || fail "a refused shrink changed the device"
"$CLI" ceph resize $KEY size 96M allow-shrink
[ "$(size_of "$DEV")" = $((96 * MiB)) ] || fail "kernel size $(size_of "$DEV") after shrinking"
cmp <(dd if="$DEV" bs=1M count=8 iflag=direct status=none) /tmp/head.bin \
  || fail "data changed by the shrink"
if dd if=/dev/zero of="$DEV" bs=1M seek=100 count=1 oflag=direct status=none 2>/dev/null; then
  fail "a write past the new end was accepted"
fi
echo "CEPH: the kernel sees 96 MiB after shrink"

step "unmap, delete"
"$CLI" ceph unmap $KEY
"$CLI" ceph delete $KEY
if rbd -c $CEPH/ceph.conf info $KEY >/dev/null 2>&1; then fail "delete left the image"; fi
kill -TERM $RP
wait $RP || fail "nbd-runner exited non-zero on SIGTERM"
echo GUEST-CEPH-OK
