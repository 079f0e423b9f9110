#!/usr/bin/env bash
# Prepares the VM that the kernel tests (tests/kernel.rs) boot: Debian's 6.1 kernel, which has
# nbd.ko, and qemu-system-x86 7.2, both unpacked under $VM_DIR/root. Idempotent: a second run
# that finds everything in place returns at once without touching the network.
#
# Neither the kernel nor qemu-system is apt-installed, on purpose:
#  - qemu-system-x86 7.2 Breaks the newer qemu-utils (10.x, from backports) that the other
#    integration tests use; apt would remove qemu-img/qemu-nbd to install it.
#  - linux-image-*-amd64 would pull initramfs-tools, udev and a systemd upgrade into the host.
# So both are fetched with `apt-get download` and unpacked with `dpkg -x`. Only small runtime
# libraries (and busybox-static, for the initramfs) are apt-installed.
#
# Everything is cached under VM_DIR (default: the repo's target/nbd-vm), so nothing outside
# the checkout is written apart from those packages.
#
# Exit codes: 0 ready; 77 the VM cannot be set up on this machine (not root, no apt, a package
# cannot be had, qemu cannot run...), with the reason on stderr. Tests skip on 77.
set -Euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VM=${VM_DIR:-$REPO/target/nbd-vm}
R=$VM/root
CANNOT=77

die() {
  echo "tests/vm/setup.sh: cannot set up the VM: $*" >&2
  exit $CANNOT
}
trap 'die "command failed (line $LINENO, exit $?): $BASH_COMMAND"' ERR

# Libraries qemu-system-x86 7.2 links that a base system lacks, busybox for the initramfs, and
# the tools the guest scripts run (the guest sees the host's / read-only, so it uses the
# host's binaries).
HOST_PKGS=(busybox-static e2fsprogs util-linux diffutils procps iproute2
  libcapstone4 libfdt1 libslirp0 libvdeplug2 libpmem1 librdmacm1 libibverbs1)

qemu_ok() {
  [ -x "$R/usr/bin/qemu-system-x86_64" ] || return 1
  QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu "$R/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1
}
kernel_ok() {
  local kv
  kv=$(ls "$R/lib/modules" 2>/dev/null | head -1)
  [ -n "$kv" ] && [ -f "$R/boot/vmlinuz-$kv" ] && [ -f "$R/lib/modules/$kv/modules.dep" ] &&
    [ -n "$(find "$R/lib/modules/$kv" -name 'nbd.ko*' -print -quit)" ]
}
initramfs_ok() {
  [ -f "$VM/initramfs.cpio.gz" ] && [ "$VM/initramfs.cpio.gz" -nt "$HERE/build-initramfs.sh" ]
}
missing_pkgs() {
  local p
  for p in "${HOST_PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

command -v dpkg-query >/dev/null && command -v apt-get >/dev/null ||
  die "this is not a Debian-like system (no apt-get/dpkg)"

# Fast path: all in place.
if [ -z "$(missing_pkgs)" ] && qemu_ok && kernel_ok; then
  initramfs_ok || "$HERE/build-initramfs.sh" || die "building the initramfs failed"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=900 -q)
updated=0
apt_update() {
  [ $updated = 1 ] && return 0
  [ "$(id -u)" = 0 ] || return 1
  "${APT[@]}" update >&2 || die "apt-get update failed"
  updated=1
}

mapfile -t need < <(missing_pkgs)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "needs root to apt-get install ${need[*]} (run tests/vm/setup.sh as root once)"
  echo "tests/vm/setup.sh: installing ${need[*]}" >&2
  if ! "${APT[@]}" install -y --no-install-recommends "${need[@]}" >&2; then
    apt_update
    "${APT[@]}" install -y --no-install-recommends "${need[@]}" >&2 || die "apt-get install ${need[*]} failed"
  fi
fi

if ! qemu_ok || ! kernel_ok; then
  mkdir -p "$VM/debs" "$R"
  pick() { # kernel package and qemu 7.x version from the current lists
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
    QV=$(apt-cache madison qemu-system-x86 2>/dev/null | awk '$3 ~ /^1:7/ {print $3; exit}')
  }
  pick
  if [ -z "$KPKG" ] || [ -z "$QV" ]; then apt_update || true; pick; fi
  [ -n "$KPKG" ] || die "no linux-image-*-amd64 package in the apt lists"
  [ -n "$QV" ] || die "no qemu-system-x86 7.x in the apt lists (this needs Debian bookworm's)"
  rm -rf "$VM/debs"/*.deb
  fetch() { (cd "$VM/debs" && "${APT[@]}" download "qemu-system-x86=$QV" "qemu-system-common=$QV" \
    qemu-system-data seabios "$KPKG" >&2); }
  fetch || { apt_update; fetch; } || die "apt-get download of $KPKG and qemu-system-x86=$QV failed"
  rm -rf "$R" && mkdir -p "$R"
  for d in "$VM/debs"/*.deb; do dpkg -x "$d" "$R"; done
  KV=$(ls "$R/lib/modules" | head -1)
  busybox depmod -b "$R" "$KV"
  rm -f "$VM/initramfs.cpio.gz"
fi

if ! qemu_ok; then
  libs=$(ldd "$R/usr/bin/qemu-system-x86_64" 2>/dev/null | awk '/not found/ {print $1}' | tr '\n' ' ')
  die "the unpacked qemu-system-x86_64 does not run${libs:+ (missing libraries: $libs)}"
fi
kernel_ok || die "the unpacked kernel has no nbd module or vmlinuz"
initramfs_ok || "$HERE/build-initramfs.sh" || die "building the initramfs failed"
echo "tests/vm/setup.sh: VM ready in $VM (kernel $(ls "$R/lib/modules" | head -1), $(
  QEMU_MODULE_DIR=$R/usr/lib/x86_64-linux-gnu/qemu "$R/usr/bin/qemu-system-x86_64" --version | head -1))" >&2
