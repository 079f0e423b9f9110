#!/usr/bin/env bash
# Builds $VM_DIR/initramfs.cpio.gz for tests/vm/run-in-vm.sh: static busybox plus the few
# modules needed to mount the host's / over virtio-9p (read-only) under a tmpfs-backed
# overlay, and nbd.ko. The init switch_roots into that overlay, so the guest runs the host's
# binaries (including target/ builds, at the same paths) and its writes never reach the host.
# Called by setup.sh; needs $VM_DIR/root from it (dpkg -x of the kernel and qemu debs).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VM=${VM_DIR:-$REPO/target/nbd-vm}
KROOT=$VM/root
KVER=$(ls "$KROOT/lib/modules" | head -1)
MD=$KROOT/lib/modules/$KVER
[ -f "$MD/modules.dep" ] || busybox depmod -b "$KROOT" "$KVER"
W=$(mktemp -d "$VM/initramfs.XXXX")
trap 'rm -rf "$W"' EXIT
mkdir -p "$W"/{bin,dev,proc,sys,mnt/host,mnt/upper,newroot,modules}
cp "$(command -v busybox)" "$W/bin/busybox"
file -L "$W/bin/busybox" 2>/dev/null | grep -q dynamic && { echo "build-initramfs.sh: busybox is not static (install busybox-static)" >&2; exit 1; }

# Resolve module dependencies, dependencies first.
order=()
add() {
  local m=$1 line dep x
  for x in "${order[@]:-}"; do [ "$x" = "$m" ] && return; done
  line=$(grep -E "(^|/)$m:" "$MD/modules.dep") || { echo "build-initramfs.sh: module $m not in $KVER" >&2; exit 1; }
  for dep in ${line#*:}; do add "$dep"; done
  order+=("${line%%:*}")
}
for m in virtio_pci.ko 9pnet_virtio.ko 9p.ko overlay.ko nbd.ko; do add "$m"; done
: >"$W/modules/order"
for p in "${order[@]}"; do
  [ -n "$p" ] || continue
  cp "$MD/$p" "$W/modules/"
  basename "$p" >>"$W/modules/order"
done

cat >"$W/init" <<'EOI'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
CMDF=; KVER=; KMODS=; VMINIT=
for a in $(cat /proc/cmdline); do
  case $a in vm_cmd=*) CMDF=${a#vm_cmd=};; vm_kver=*) KVER=${a#vm_kver=};; vm_kmods=*) KMODS=${a#vm_kmods=};; vm_init=*) VMINIT=${a#vm_init=};; esac
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /mnt/host || { echo "9p mount failed"; poweroff -f; }
mount -t tmpfs -o size=75% tmpfs /mnt/upper; mkdir -p /mnt/upper/u /mnt/upper/w
mount -t overlay -o lowerdir=/mnt/host,upperdir=/mnt/upper/u,workdir=/mnt/upper/w overlay /newroot || { echo "overlay mount failed"; poweroff -f; }
mount -t proc proc /newroot/proc; mount -t sysfs sysfs /newroot/sys; mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm; mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
# The guest kernel's modules (from the dpkg -x tree on the host) at the usual place, and busybox
# as modprobe, so request_module (ext4, crc32c...) works.
mkdir -p /newroot/lib/modules/$KVER; mount --bind /newroot$KMODS /newroot/lib/modules/$KVER
ln -sf /bin/busybox /newroot/usr/sbin/modprobe 2>/dev/null; cp /bin/busybox /newroot/bin/busybox
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
cat > /newroot/vm-init.sh <<EOS
#!/bin/busybox sh
/bin/busybox ip link set lo up
echo; echo "===VM-READY uptime=\$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
echo "===VM-BEGIN"
/bin/bash -c "cd /tmp; export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root; . $CMDF" < /dev/null 2>&1
rc=\$?
echo "===VM-END rc=\$rc uptime=\$(/bin/busybox cut -d' ' -f1 /proc/uptime)"
/bin/busybox sync; /bin/busybox poweroff -f
EOS
# vm_init=systemd (VM_INIT=systemd in run-in-vm.sh): the host's systemd as PID 1, which
# starts only vm-test.target, whose one service runs the same /vm-init.sh (the command, then
# poweroff): for tests of the runner's units under a real service manager.
if [ "$VMINIT" = systemd ]; then
  mkdir -p /newroot/etc/systemd/system
  cat > /newroot/etc/systemd/system/vm-test.service <<EOS
[Unit]
Description=the VM's test command
DefaultDependencies=no
[Service]
Type=oneshot
ExecStart=/bin/busybox sh /vm-init.sh
StandardInput=null
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
EOS
  cat > /newroot/etc/systemd/system/vm-test.target <<EOS
[Unit]
Description=the VM's test
Requires=vm-test.service
AllowIsolate=yes
EOS
  # Boot-time work that only costs time here: tmpfiles would walk (and clean) the host's
  # /tmp and /var/tmp over 9p, and udev would coldplug every device under emulation.
  for u in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.service systemd-tmpfiles-clean.timer \
           systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
           lvm2-monitor.service e2scrub_reap.service systemd-random-seed.service; do
    ln -sf /dev/null /newroot/etc/systemd/system/$u
  done
  # systemd mounts /run itself.
  umount /newroot/run
  exec switch_root /newroot /lib/systemd/systemd --unit=vm-test.target --log-level=warning --show-status=false
fi
# switch_root so PID 1 (and kernel usermode helpers such as request_module -> modprobe) see the overlay root.
exec switch_root /newroot /bin/busybox sh /vm-init.sh
EOI
chmod +x "$W/init"
(cd "$W" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$VM/initramfs.cpio.gz.tmp"
mv "$VM/initramfs.cpio.gz.tmp" "$VM/initramfs.cpio.gz"
echo "build-initramfs.sh: built $VM/initramfs.cpio.gz ($(du -h "$VM/initramfs.cpio.gz" | cut -f1)) for $KVER with $(tr '\n' ' ' <"$W/modules/order")" >&2
