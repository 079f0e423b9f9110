#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh), driven by tests/kernel.rs: the operator's
# flow with nbd-cli against nbd-runner's control route and a real kernel.
#   create -> map (2 connections) -> ext4 round trip -> unmap -> map again on shards 1,0,
#   identical, each connection on its shard (info, /proc) -> kill -9 + restart while mapped
#   -> `list dead` shows it -> map reattaches the same device on the same shards, data
#   intact -> readonly map refuses writes -> delete refused while mapped.
#   -> unmap after a restart leaves a device that now serves another backstore alone.
# Env: NBD_RUNNER, NBD_CLI, NBD_ATTACH (paths of the binaries). Prints GUEST-CLI-OK at the end.
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
CLI=${NBD_CLI:?path to nbd-cli}
ATTACH=${NBD_ATTACH:?path to the nbd-attach example}
KEY=/tmp/cli.raw
MNT=/tmp/mnt
export RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1
fail() {
  echo "FAIL: $*"
  echo "--- runner log:"; tail -30 /tmp/runner.log 2>/dev/null || true
  echo "--- dmesg (nbd):"; dmesg | grep -i nbd | tail -20 || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR
. "$(dirname "$0")/guest-lib.sh"
state_of() { "$CLI" info "$KEY" --json | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p'; }
# check_links SHARD...: info lists one link per SHARD, in order, each on that
# shard, and the shard's thread may run only on the CPUs info names.
check_links() {
  local info i=0 want shard cpus tid
  info=$("$CLI" info "$KEY")
  for want in "$@"; do
    read -r shard cpus tid <<<"$(echo "$info" | awk -v l="link $i" 'index($0, l " ") == 1 {
      gsub(/,$/, "", $6); gsub(/\)$/, "", $8); print $4, $6, $8 }')"
    expect_eq "$shard" "$want" "link $i's shard"
    expect_eq "$(awk '/^Cpus_allowed_list:/ {print $2}' /proc/$RP/task/"$tid"/status)" "$cpus" \
      "link $i's CPUs (thread $tid)"
    i=$((i + 1))
  done
  [ "$(echo "$info" | grep -c '^link ')" = $# ] || fail "links are not $*: $info"
}


rm -rf /tmp/st $KEY $MNT /tmp/runner.log
mkdir -p $MNT
head -c 20M /dev/urandom >/tmp/rand.bin
start_runner

step "swap safety: the runner's memory is locked and the OOM killer spares it"
expect_eq "$(cat /proc/$RP/oom_score_adj)" -1000 "oom_score_adj"
lck=$(awk '/^VmLck:/ {print $2}' /proc/$RP/status)
[ "${lck:-0}" -gt 0 ] || fail "VmLck is ${lck:-missing}"
if grep -E "cannot set|memory not locked" /tmp/runner.log; then fail "swap safety not all applied"; fi
echo "CLI: swap safety on (VmLck ${lck} kB, oom_score_adj -1000, IO flusher)"

step "create and map with 2 connections"
"$CLI" file create $KEY size 256M
DEV=$("$CLI" file map $KEY connections 2)
N=${DEV#/dev/nbd}
echo "mapped $DEV"
expect_eq "$(state_of)" mapped "state after map"
"$CLI" file list live | grep -q "$DEV" || fail "list live does not show $DEV"
expect_eq "$(cat /sys/block/nbd"$N"/size)" $((256 * 2048)) "size in sectors"
grep -q '^nbd-runner:' /sys/block/nbd"$N"/backend || fail "no backend cookie"
expect_eq "$("$CLI" info $KEY | awk '/^connections/ {print $2}')" 2 "IO connections"
"$CLI" info $KEY | grep -E 'state|device|connections'

step "ext4: mkfs, mount, write 20 MiB, sync, umount, unmap"
ext4_store "$DEV"
"$CLI" file unmap "$DEV"
expect_eq "$(state_of)" created "state after unmap"
[ ! -e /sys/block/nbd"$N"/backend ] || fail "device still attached after unmap"

step "map again on shards 1,0 and read back"
DEV=$("$CLI" file map $KEY shards 1,0)
N=${DEV#/dev/nbd}
"$CLI" info $KEY | grep -E '^(connections|shards|link)'
check_links 1 0
ext4_same "$DEV" "after map/unmap/map"
echo "CLI: 20 MiB file identical after unmap and map; connections on shards 1,0"

step "kill -9 the runner while mapped and mounted, restart it"
kill -9 $RP
wait $RP 2>/dev/null || true
for _ in $(seq 50); do
  [ "$(dmesg | grep -c "nbd$N: Receive control failed")" -ge 2 ] && break
  sleep 0.1
done
start_runner
"$CLI" list dead | grep -q "$DEV" || fail "list dead does not show $DEV"
expect_eq "$(state_of)" dead "state after restart"
echo "CLI: restarted runner lists $KEY dead on $DEV"

step "map reattaches the same device, on the same shards"
AGAIN=$("$CLI" file map $KEY)
expect_eq "$AGAIN" "$DEV" "reattached device"
expect_eq "$(state_of)" mapped "state after reattach"
check_links 1 0
echo 3 >/proc/sys/vm/drop_caches
cmp /tmp/rand.bin $MNT/f || fail "data differs after reattach"
echo after-reattach >$MNT/g
sync
umount $MNT
echo "CLI: reattached $DEV, data intact"

step "delete is refused while mapped; unmap by key"
if "$CLI" file delete $KEY 2>/tmp/del.err; then fail "delete of a mapped backstore succeeded"; fi
grep -q "unmap it first" /tmp/del.err || fail "unclear delete refusal: $(cat /tmp/del.err)"
"$CLI" file unmap $KEY

step "readonly map refuses writes"
DEV=$("$CLI" file map $KEY readonly)
N=${DEV#/dev/nbd}
expect_eq "$(cat /sys/block/nbd"$N"/ro)" 1 "ro"
if dd if=/dev/zero of="$DEV" bs=4096 count=1 oflag=direct 2>/tmp/dd.err; then
  fail "dd to a read-only mapping succeeded"
fi
ext4_same "$DEV" "on the read-only mapping" ro
expect_eq "$(cat $MNT/g)" after-reattach "file written after reattach"
umount $MNT
"$CLI" file unmap "$DEV"
echo "CLI: readonly map refused writes"

step "stats, delete"
"$CLI" stats $KEY | grep -q '^write' || fail "no write stats"

step "unmap after a restart leaves a device that now serves another backstore alone"
"$CLI" file create /tmp/other.raw size 16M
DEV=$("$CLI" file map $KEY)
N=${DEV#/dev/nbd}
MINE=$(cat /sys/block/nbd"$N"/backend)
kill -9 $RP
wait $RP 2>/dev/null || true
start_runner
expect_eq "$(state_of)" dead "state after restart"
# Someone detaches the dead device and attaches another export to it,
# behind this runner's back (nbd-attach, cookie "theirs").
"$ATTACH" disconnect "$DEV"
OTHER=$(NBD_ATTACH_COOKIE=theirs "$ATTACH" connect 127.0.0.1:24111 /tmp/other.raw 1 "$DEV")
expect_eq "$OTHER" "$DEV" "the other export's device"
THEIRS=$(cat /sys/block/nbd"$N"/backend)
[ "$THEIRS" != "$MINE" ] || fail "the other backstore has our cookie"
"$CLI" file unmap $KEY 2>/tmp/unmap.err
expect_eq "$(cat /sys/block/nbd"$N"/backend 2>/dev/null)" "$THEIRS" "backend after unmapping $KEY"
grep -q "another backend" /tmp/unmap.err || fail "unmap did not say why: $(cat /tmp/unmap.err)"
expect_eq "$(state_of)" created "state of $KEY after unmap"
"$ATTACH" disconnect "$DEV"
"$CLI" file delete /tmp/other.raw
echo "CLI: unmap left a device serving another backstore alone"

"$CLI" file delete $KEY
[ ! -e $KEY ] || fail "delete left the file"
kill -TERM $RP
wait $RP || fail "nbd-runner exited non-zero on SIGTERM"
echo GUEST-CLI-OK
