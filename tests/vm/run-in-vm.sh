#!/usr/bin/env bash
# Usage: tests/vm/run-in-vm.sh "COMMAND"
#
# Boots Debian's 6.1 kernel (unpacked by setup.sh under $VM_DIR/root) under QEMU with NO NIC
# (only lo), the host's / visible read-only over virtio-9p with a tmpfs overlay on top (guest
# writes never reach the host; binaries built in target/ are at the same paths), nbd.ko loaded.
# Runs COMMAND with bash as root in the guest (cwd /tmp), prints its output (stdout and stderr
# together), powers off, and exits with COMMAND's exit code.
#
# Exit codes besides COMMAND's: 125 the VM did not boot (qemu failed, or the guest never
# reached its init); 124 the guest booted but COMMAND did not finish (VM_TIMEOUT, or a guest
# kernel crash). Messages prefixed "[run-in-vm]" go to stderr.
#
# Env: VM_DIR (target/nbd-vm), VM_MEM (2G), VM_CPUS (2), VM_TIMEOUT (300 s),
#      VM_DISK (a raw image file: the guest's virtio disk /dev/vda, storage outside its RAM),
#      VM_APPEND (more kernel arguments, e.g. loglevel=4 to see hung-task reports),
#      VM_MONITOR (a unix socket path for QEMU's monitor, to dump a hung guest's tasks),
#      VM_INIT=systemd (the host's systemd as the guest's PID 1, starting only the command),
#      VM_VERBOSE (0: only COMMAND's output; 1: the whole console), VM_ACCEL (kvm|tcg; see below).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VM=${VM_DIR:-$REPO/target/nbd-vm}
R=$VM/root
[ $# -eq 1 ] || { echo "usage: $0 COMMAND" >&2; exit 2; }
KVER=$(ls "$R/lib/modules" 2>/dev/null | head -1)
if [ -z "$KVER" ] || [ ! -x "$R/usr/bin/qemu-system-x86_64" ]; then
  echo "[run-in-vm] VM did not boot: not set up in $VM (run tests/vm/setup.sh)" >&2
  exit 125
fi
[ -f "$VM/initramfs.cpio.gz" ] || "$HERE/build-initramfs.sh" >&2 || { echo "[run-in-vm] VM did not boot: no initramfs" >&2; exit 125; }
mkdir -p "$VM/run"
# Keep the consoles of the last 10 runs.
ls -t "$VM/run"/*.log.txt 2>/dev/null | tail -n +10 | xargs -r rm -f
CMDF=$(mktemp "$VM/run/cmd.XXXXXX")
printf '%s\n' "$1" >"$CMDF"
LOG=$CMDF.log

# /dev/kvm on these hosts may be kvm_pvm (PVM: only PVM-enabled guest kernels boot; a stock
# Debian kernel hangs right after "Probing EDD"), so use TCG (software emulation) there.
if [ -z "${VM_ACCEL:-}" ]; then
  if [ -d /sys/module/kvm_pvm ] || [ ! -w /dev/kvm ]; then VM_ACCEL=tcg; else VM_ACCEL=kvm; fi
fi
if [ "$VM_ACCEL" = kvm ]; then
  ACCEL=(-machine q35 -accel kvm -cpu host)
else
  ACCEL=(-machine q35 -accel tcg,thread=multi -cpu max)
fi

MON=()
# VM_MONITOR=PATH: QEMU's monitor on a unix socket, for post-mortems of a hung guest
# (e.g. "sendkey alt-sysrq-t" dumps every task's stack to the console).
if [ -n "${VM_MONITOR:-}" ]; then
  MON=(-monitor "unix:$VM_MONITOR,server,nowait")
fi
DISK=()
if [ -n "${VM_DISK:-}" ]; then
  DISK=(-drive "file=$VM_DISK,if=virtio,format=raw,cache=writeback")
fi

t0=$(date +%s.%N)
QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu timeout --foreground -k 10 "${VM_TIMEOUT:-300}" \
  "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" \
  "${ACCEL[@]}" -smp "${VM_CPUS:-2}" -m "${VM_MEM:-2G}" \
  -nodefaults -no-user-config -nographic -serial stdio -nic none -no-reboot \
  -kernel "$R/boot/vmlinuz-$KVER" -initrd "$VM/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 vm_cmd=$CMDF vm_kver=$KVER vm_kmods=$R/lib/modules/$KVER ${VM_INIT:+vm_init=$VM_INIT} ${VM_APPEND:-}" \
  "${DISK[@]}" "${MON[@]}" \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
  >"$LOG" 2>&1 </dev/null
qrc=$?
t1=$(date +%s.%N)
tr -d '\r' <"$LOG" >"$LOG.txt"
rm -f "$CMDF" "$LOG"
if [ "${VM_VERBOSE:-0}" = 1 ]; then
  cat "$LOG.txt"
else
  sed -n '/^===VM-BEGIN$/,/^===VM-END/{/^===VM-/!p}' "$LOG.txt"
fi
rc=$(sed -n 's/^===VM-END rc=\([0-9]*\).*/\1/p' "$LOG.txt")
ready=$(grep -o 'VM-READY uptime=[0-9.]*' "$LOG.txt" | cut -d= -f2)
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
echo "[run-in-vm] accel=$VM_ACCEL qemu_rc=$qrc cmd_rc=${rc:-none} guest_uptime_at_ready=${ready:-?}s wall=${wall}s log=$LOG.txt" >&2
if [ -z "$ready" ]; then
  echo "[run-in-vm] VM did not boot (qemu exit $qrc); console tail:" >&2
  tail -20 "$LOG.txt" >&2
  exit 125
fi
if [ -z "$rc" ]; then
  echo "[run-in-vm] the command did not complete (timeout ${VM_TIMEOUT:-300}s or guest crash); console tail:" >&2
  tail -30 "$LOG.txt" >&2
  exit 124
fi
exit "$rc"
