#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh with VM_DISK), driven by tests/kernel.rs: swap on
# an NBD device the runner serves, under memory pressure, without the reclaim deadlock.
#   The runner's backing file sits on the virtio disk /dev/vda (not in guest RAM: / is a
#   tmpfs overlay); /dev/nbdX is the guest's only swap; a memory hog takes well more than the
#   guest's free RAM, writes a pattern into every page and checks it all back. The guest
#   stays up, the hog finishes, and the runner has its memory locked and oom_score_adj -1000.
# Env: NBD_RUNNER, NBD_CLI. Prints GUEST-SWAP-OK at the end.
#
# NOT IN CI YET: it hangs. With the runner in the same guest, the swap writes the kernel sends
# under memory pressure come from its reserves, and TCP over loopback drops them at the
# runner's socket (PFMemallocDrop); they time out (30 s), the connections are declared dead,
# and every allocating task waits on the swap device (hung-task reports show kswapd, jbd2 and
# the hog in __swap_writepage). The planned fix is a unix-socket IO route for local maps.
# Run by hand, with the hung-task reports on the console:
#   truncate -s 2G target/nbd-vm/scratch.img
#   VM_DISK=$PWD/target/nbd-vm/scratch.img VM_MEM=1G VM_APPEND=loglevel=8 VM_TIMEOUT=200 \
#     bash tests/vm/run-in-vm.sh "NBD_RUNNER=$PWD/target/debug/nbd-runner \
#       NBD_CLI=$PWD/target/debug/nbd-cli bash $PWD/tests/vm/guest-swap.sh"
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
CLI=${NBD_CLI:?path to nbd-cli}
DISK=/tmp/disk
KEY=$DISK/swap.raw
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

step "the virtio disk holds the backing file"
modprobe virtio_blk
for _ in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no /dev/vda (run-in-vm.sh needs VM_DISK)"
mkfs.ext4 -q -F /dev/vda
mkdir -p $DISK
mount /dev/vda $DISK
rm -rf /tmp/st /tmp/runner.log
start_runner

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
"$CLI" file create $KEY size 1G option direct=on
"$CLI" info $KEY | grep -q "O_DIRECT" || fail "info does not show direct IO"
DEV=$("$CLI" file map $KEY)
mkswap -q "$DEV" >/dev/null
ss -xp | grep -q "nbd-io.sock" || fail "the map does not use the runner's unix socket: $(ss -xp)"
swapon "$DEV"
grep -q "^$DEV " /proc/swaps || fail "$DEV is not in /proc/swaps"
swapon --show

step "a memory hog well past free RAM"
# A hang shows as hung-task reports on the console (with VM_APPEND=loglevel=4).
echo 20 >/proc/sys/kernel/hung_task_timeout_secs
free_kb=$(kb MemAvailable)
# Past what is available by half of it again, but within the 1 GiB swap.
hog_mb=$((free_kb * 3 / 2 / 1024))
echo "MemAvailable $((free_kb / 1024)) MiB; the hog takes $hog_mb MiB"
python3 "$(dirname "$0")/swap-monitor.py" "$RP" &
MON=$!
python3 - "$hog_mb" <<'EOF'
import sys
n = int(sys.argv[1]) << 20
page = 4096
b = bytearray(n)
for i in range(0, n, page):
    b[i] = (i // page) % 251
    b[i + page - 1] = (i // page) % 241
bad = sum(1 for i in range(0, n, page)
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
