#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh with VM_DISK), driven by tests/kernel.rs: swap
# on an NBD device the runner serves, under memory pressure, without the reclaim deadlock.
#   The backstore is the virtio disk /dev/vda itself (a host file; not in guest RAM: / is a
#   tmpfs overlay), served direct; /dev/nbdX is the guest's only swap; a memory hog takes well more than the
#   guest's free RAM, writes a pattern into every page and checks it all back. The guest
#   stays up, the hog finishes, and the runner has its memory locked and oom_score_adj -1000.
# Env: NBD_RUNNER, NBD_CLI. Prints GUEST-SWAP-OK at the end.
#
# Why the map takes the runner's unix socket: the kernel sends swap writes from its memory
# reserves, and TCP over loopback drops those at the runner's socket (PFMemallocDrop), so
# over TCP the swap writes time out and every allocating task waits on the swap device. And
# why direct IO on a block device: buffered writes would need page cache while the kernel is
# reclaiming it, and a file on ext4 puts the journal in the write path (block allocation,
# timestamps), whose commit thread was seen in reclaim waiting on this very swap device.
# Under QEMU's emulation swap moves at a few MB/s, so reclaim waits of tens of seconds are
# normal here; the hung-task detector is left at 120 s, and a report means a real hang.
# Why nothing on the runner's IO path may fault in a page: under this pressure free memory
# sits at the minimum watermark, where the runner's allocations wait for reclaim, which
# waits for the runner (the runner's --swap-reserve and its in-flight bound; README).
# By hand (swap-monitor.py prints the kernel stacks if swap stops moving; add
# VM_APPEND="loglevel=7 sysrq_always_enabled=1" VM_MONITOR=/tmp/mon.sock to read the
# hung-task reports and send sysrq keys with QEMU's `sendkey alt-sysrq-t`):
#   truncate -s 2G target/nbd-vm/scratch.img
#   VM_DISK=$PWD/target/nbd-vm/scratch.img VM_MEM=1G VM_TIMEOUT=600 \
#     bash tests/vm/run-in-vm.sh "NBD_RUNNER=$PWD/target/debug/nbd-runner \
#       NBD_CLI=$PWD/target/debug/nbd-cli bash $PWD/tests/vm/guest-swap.sh"
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
CLI=${NBD_CLI:?path to nbd-cli}
KEY=/dev/vda
export RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1
fail() {
  echo "FAIL: $*"
  echo "--- runner log:"; tail -30 /tmp/runner.log 2>/dev/null || true
  echo "--- meminfo:"; grep -E "MemFree|MemAvail|Swap" /proc/meminfo || true
  echo "--- dmesg:"; dmesg | tail -30 || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR
. "$(dirname "$0")/guest-lib.sh"
kb() { awk -v k="$1:" '$1 == k {print $2}' /proc/meminfo; }

step "the virtio disk is the backstore"
modprobe virtio_blk
for _ in $(seq 50); do [ -b $KEY ] && break; sleep 0.1; done
[ -b $KEY ] || fail "no $KEY (run-in-vm.sh needs VM_DISK)"
rm -rf /tmp/st /tmp/runner.log
start_runner --allow-block-devices

step "the runner's memory is locked and the OOM killer spares it"
expect_eq "$(cat /proc/$RP/oom_score_adj)" -1000 "oom_score_adj"
lck=$(awk '/^VmLck:/ {print $2}' /proc/$RP/status)
[ "${lck:-0}" -gt 0 ] || fail "VmLck is ${lck:-missing}"
echo "SWAP: runner VmLck ${lck} kB, oom_score_adj -1000"

step "direct IO: refused on tmpfs, and swap on the mapped device"
# Buffered writes would allocate page cache while the kernel reclaims memory
# by swapping to this very device: the runner serves swap with O_DIRECT.
if "$CLI" file create /tmp/tmpfs.raw size 16M option direct=on 2>/tmp/direct.err; then
  fail "direct=on on tmpfs was accepted"
fi
grep -q "refuses O_DIRECT" /tmp/direct.err || fail "unclear refusal: $(cat /tmp/direct.err)"
echo "SWAP: direct on tmpfs refused: $(cat /tmp/direct.err)"
# Adopted at its own size: a block device has no filesystem journal in its write path.
"$CLI" file create $KEY size "$(blockdev --getsize64 $KEY)" option direct=on
"$CLI" info $KEY | grep -q "O_DIRECT" || fail "info does not show direct IO"
DEV=$("$CLI" file map $KEY)
mkswap -q "$DEV" >/dev/null
ss -xp | grep -q "nbd-io.sock" || fail "the map does not use the runner's unix socket: $(ss -xp)"
swapon "$DEV"
grep -q "^$DEV " /proc/swaps || fail "$DEV is not in /proc/swaps"
swapon --show

step "a memory hog well past free RAM, under a memory limit"
echo 120 >/proc/sys/kernel/hung_task_timeout_secs
free_kb=$(kb MemAvailable)
# Past what is available by 256 MiB, within the swap.
hog_mb=$((free_kb / 1024 + 256))
# The supported setup: what can drive the host into swap runs under a memory limit
# (cgroup v2 memory.max; systemd's MemoryMax=) that leaves the runner headroom, so its
# own reclaim swaps it out while free memory stays above the minimum watermark. Without
# a limit (SWAP_GLOBAL=1, by hand) free memory falls to the minimum, where the runner's
# kernel-side allocations (the bvec array of an O_DIRECT write, the socket buffer of a
# reply) wait for reclaim that waits for them: seen here as a shard in pwrite ->
# __blkdev_direct_IO_simple -> kmalloc -> direct reclaim, with the hog and kswapd waiting
# on the bio pool. No userspace server can take the kernel's reserves for those; the
# README says so.
limit_mb=$((free_kb / 1024 - 128))
HOG_CG=/sys/fs/cgroup/swap-hog
if [ "${SWAP_GLOBAL:-0}" = 1 ]; then
  echo "MemAvailable $((free_kb / 1024)) MiB; the hog takes $hog_mb MiB, no limit"
  HOG_CG=
else
  mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
  echo +memory >/sys/fs/cgroup/cgroup.subtree_control
  mkdir -p $HOG_CG
  # Past memory.high the hog is throttled while its own reclaim swaps it out; memory.max
  # is the hard stop (an OOM kill there fails the test).
  echo $(((limit_mb - 64) << 20)) >$HOG_CG/memory.high
  echo $((limit_mb << 20)) >$HOG_CG/memory.max
  echo "MemAvailable $((free_kb / 1024)) MiB; the hog takes $hog_mb MiB under memory.high $((limit_mb - 64)) MiB"
fi
python3 "$(dirname "$0")/swap-monitor.py" "$RP" "${DEV#/dev/}" &
MON=$!
# The hog joins its cgroup before it starts (a child of this shell, moved first).
bash -c '[ -z "$1" ] || echo $$ >"$1/cgroup.procs"; shift; exec python3 - "$@"' \
  hog "$HOG_CG" "$hog_mb" <<'EOF'
import mmap, sys
n = int(sys.argv[1]) << 20
page = 4096
# Anonymous memory, untouched until written (a bytearray would zero it all first).
b = mmap.mmap(-1, n)
for i in range(0, n, page):
    b[i] = (i // page) % 251
    b[i + page - 1] = (i // page) % 241
# Back to front: what is still in RAM first, so each swapped page comes back once.
bad = sum(1 for i in range(n - page, -1, -page)
          if b[i] != (i // page) % 251 or b[i + page - 1] != (i // page) % 241)
if bad:
    sys.exit(f"hog: {bad} pages came back wrong")
mem = dict(l.split(":") for l in open("/proc/meminfo"))
kb = lambda k: int(mem[k].split()[0])
print(f"hog: {n >> 20} MiB written and read back; swap in use "
      f"{(kb('SwapTotal') - kb('SwapFree')) >> 10} MiB")
EOF
kill $MON
kill -0 $RP || fail "the runner died under memory pressure"
if [ -n "$HOG_CG" ]; then
  grep -E "^(oom|oom_kill) " $HOG_CG/memory.events
  awk '$1 == "oom_kill" && $2 > 0 {exit 1}' $HOG_CG/memory.events || fail "the hog's cgroup OOM-killed"
fi
echo "SWAP: the hog finished through swap on $DEV; the runner stayed up"

step "the kernel saw no swap or nbd errors"
dmesg >/tmp/dmesg.txt
if grep -iE "I/O error|Write-error on swap|Read-error on swap|Out of memory|oom-kill|blocked for more than" /tmp/dmesg.txt; then
  fail "kernel errors under swap"
fi
lck=$(awk '/^VmLck:/ {print $2}' /proc/$RP/status)
[ "${lck:-0}" -gt 0 ] || fail "VmLck is ${lck:-missing} after the hog"
out=$(awk '$1 == "pswpout" {print $2}' /proc/vmstat)
# "Well into swap": at least a quarter of the guest's RAM went out.
[ "$((out * 4))" -gt "$(($(kb MemTotal) / 4))" ] || fail "only $out pages were swapped out"
echo "SWAP: no kernel errors; $((out * 4 / 1024)) MiB swapped out through $DEV"

swapoff "$DEV"
"$CLI" file unmap "$DEV"
kill -TERM $RP
wait $RP
echo GUEST-SWAP-OK
