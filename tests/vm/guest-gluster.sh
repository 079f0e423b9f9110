#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh), driven by tests/kernel.rs: a kernel map of a
# gluster backstore. The guest has no NIC, so it runs its own glusterd on its loopback
# (packages from the host's root, state and brick on tmpfs), then:
#   nbd-cli gluster create -> map (2 connections) -> ext4 round trip -> unmap -> map,
#   identical -> unmap -> delete.
# Env: NBD_RUNNER, NBD_CLI (built with the gluster feature), REPO. Prints GUEST-GLUSTER-OK.
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
CLI=${NBD_CLI:?path to nbd-cli}
REPO=${REPO:?path to the repository}
VOL=nbdvm
KEY=$VOL/disk.img
MNT=/tmp/mnt
export RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1
fail() {
  echo "FAIL: $*"
  echo "--- runner log:"; tail -30 /tmp/runner.log 2>/dev/null || true
  echo "--- glusterd log:"; tail -20 /tmp/gluster-vm/glusterd.log 2>/dev/null || true
  echo "--- brick log:"; tail -20 /var/log/glusterfs/bricks/*.log 2>/dev/null || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR

. "$(dirname "$0")/guest-lib.sh"
step "glusterd and a tmpfs brick inside the guest"
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd   # bash process substitution needs it
# The host's glusterd state is visible through the overlay; start from nothing.
rm -rf /var/lib/glusterd && mkdir -p /var/lib/glusterd /var/log/glusterfs /run/gluster
# ext4 on a loop device: the brick needs xattrs tmpfs lacks on this kernel.
truncate -s 1G /tmp/brick.img
mkfs.ext4 -q -F /tmp/brick.img
modprobe loop 2>/dev/null || true
LOOP=$(losetup -f --show /tmp/brick.img)
mkdir -p /brick && mount -t ext4 "$LOOP" /brick
GLUSTER_NO_PROBE=1 GLUSTER_STATE_DIR=/tmp/gluster-vm GLUSTER_TIMEOUT=120 \
  bash "$REPO/tests/gluster/start-gluster.sh" $VOL /brick/b 2>&1 | tail -3

step "runner, create, map with 2 connections"
mkdir -p $MNT
start_runner --gluster-server 127.0.0.1
"$CLI" gluster create $KEY size 256M
DEV=$("$CLI" gluster map $KEY connections 2)
echo "mapped $DEV"
[ -f /brick/b/disk.img ] || fail "no image on the brick"

step "ext4 round trip through gluster"
head -c 20M /dev/urandom >/tmp/rand.bin
ext4_store "$DEV"
"$CLI" gluster unmap "$DEV"
DEV=$("$CLI" gluster map $KEY)
ext4_same "$DEV" "after unmap and map"
umount $MNT
echo "GLUSTER: 20 MiB file identical after unmap and map"
"$CLI" gluster unmap $KEY
"$CLI" gluster delete $KEY
[ ! -e /brick/b/disk.img ] || fail "delete left the image on the brick"
kill -TERM $RP
wait $RP || fail "nbd-runner exited non-zero on SIGTERM"
echo GUEST-GLUSTER-OK
