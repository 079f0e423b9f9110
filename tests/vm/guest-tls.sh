#!/bin/bash
# Runs INSIDE the VM (tests/vm/run-in-vm.sh), driven by tests/kernel.rs: a kernel map over
# kernel TLS. nbd-cli negotiates STARTTLS and TLS in userspace (rustls), then installs the
# session's keys on the socket with the kernel's tls ULP and hands that socket to the NBD
# driver. ext4 round-trips on the device; a packet capture of the IO port holds none of the
# data in clear, while the same capture of a plain map does (so the check can fail), and
# /proc/net/tls_stat shows the kernel doing the crypto. Maps here say `route tcp`: a local
# map's default is the runner's 0600 unix socket, plain, which is checked too.
# Env: NBD_RUNNER, NBD_CLI, REPO. Prints GUEST-TLS-OK at the end.
set -euo pipefail
RUNNER=${NBD_RUNNER:?path to nbd-runner}
CLI=${NBD_CLI:?path to nbd-cli}
REPO=${REPO:?path to the checkout}
MNT=/tmp/mnt
MARK=NBD-RUNNER-PLAINTEXT-MARKER
export RUST_LOG=${RUST_LOG:-warn} NO_COLOR=1
fail() {
  echo "FAIL: $*"
  echo "--- runner log:"; tail -30 /tmp/runner.log 2>/dev/null || true
  echo "--- dmesg:"; dmesg | grep -iE 'nbd|tls' | tail -20 || true
  exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND (exit $?)"' ERR
. "$(dirname "$0")/guest-lib.sh"

# capture FILE: tcpdump on the IO port until stop_capture; returns once it listens.
TD=
capture() {
  : >/tmp/tcpdump.err
  tcpdump -i lo -U -s 0 -w "$1" tcp port 24111 2>/tmp/tcpdump.err &
  TD=$!
  for _ in $(seq 100); do
    grep -q listening /tmp/tcpdump.err && return 0
    sleep 0.1
  done
  fail "tcpdump did not start: $(cat /tmp/tcpdump.err)"
}
stop_capture() { kill -INT $TD; wait $TD || true; }
# marks FILE: how many times the marker appears in clear in FILE.
marks() { grep -a -o "$MARK" "$1" | wc -l; }
tls_stat() { awk -v k="$1" '$1 == k {print $2}' /proc/net/tls_stat; }
# round_trip KEY: map, ext4 with the marker file, unmap, map again, compare, unmap.
round_trip() {
  "$CLI" file create "$1" size 64M
  local dev
  dev=$("$CLI" file map "$1" route tcp)
  ext4_store "$dev"
  "$CLI" file unmap "$dev"
  dev=$("$CLI" file map "$1" route tcp)
  ext4_same "$dev" "after unmap and map"
  umount "$MNT"
  "$CLI" file unmap "$dev"
}

rm -rf /tmp/st /tmp/pki /tmp/tls.raw /tmp/plain.raw $MNT /tmp/runner.log
mkdir -p $MNT
python3 -c 'import sys; m = (sys.argv[1] + "\n").encode(); sys.stdout.buffer.write(m * ((4 << 20) // len(m)))' "$MARK" >/tmp/rand.bin
modprobe tls || fail "the guest kernel has no tls module"
[ -r /proc/net/tls_stat ] || fail "no /proc/net/tls_stat after loading tls"

step "certificates (openssl), a runner that requires TLS and client certificates"
bash "$REPO/tests/tls/make-certs.sh" /tmp/pki >/dev/null
start_runner --ioport 24111 --tls-certificates /tmp/pki --tls-verify-peer
export NBD_RUNNER_TLS_CERTIFICATES=/tmp/pki

step "a map over TCP without TLS is refused"
"$CLI" file create /tmp/refused.raw size 16M
if NBD_RUNNER_TLS_CERTIFICATES= "$CLI" file map /tmp/refused.raw route tcp 2>/tmp/map.err; then
  fail "a plain map of a TLS-only runner succeeded"
fi
grep -q "requires TLS" /tmp/map.err || fail "unclear refusal: $(cat /tmp/map.err)"
echo "TLS: plain map refused: $(tail -1 /tmp/map.err)"

step "a local map takes the runner's 0600 unix socket, where TLS has nothing to protect"
expect_eq "$(stat -c %a /tmp/st/nbd-io.sock)" 600 "the IO socket's mode"
dev=$(NBD_RUNNER_TLS_CERTIFICATES= "$CLI" file map /tmp/refused.raw)
ss -xp | grep -q "nbd-io.sock" || fail "no connection on the unix IO socket: $(ss -xp)"
"$CLI" file unmap "$dev"
echo "TLS: a local map goes over the unix socket"

step "map over kernel TLS: ext4 round trip under a packet capture"
tx0=$(tls_stat TlsTxSw); rx0=$(tls_stat TlsRxSw)
capture /tmp/tls.pcap
round_trip /tmp/tls.raw
stop_capture
tx1=$(tls_stat TlsTxSw); rx1=$(tls_stat TlsRxSw)
size=$(stat -c %s /tmp/tls.pcap)
echo "capture: $size bytes, $(marks /tmp/tls.pcap) markers in clear; kernel TLS sessions tx $tx0->$tx1 rx $rx0->$rx1"
[ "$size" -gt $((4 << 20)) ] || fail "the capture holds only $size bytes: the IO was not seen"
expect_eq "$(marks /tmp/tls.pcap)" 0 "markers in clear on the TLS map"
[ "$tx1" -gt "$tx0" ] && [ "$rx1" -gt "$rx0" ] || fail "the kernel opened no TLS sessions"
echo "TLS: ext4 over a kernel-TLS map round-trips, no plaintext on the wire"

step "the same on a plain runner shows the data in clear (the check can fail)"
kill -TERM $RP
wait $RP || fail "nbd-runner exited non-zero on SIGTERM"
rm -rf /tmp/st
start_runner --ioport 24111
capture /tmp/plain.pcap
NBD_RUNNER_TLS_CERTIFICATES= round_trip /tmp/plain.raw
stop_capture
n=$(marks /tmp/plain.pcap)
[ "$n" -gt 1000 ] || fail "only $n markers in the plain capture"
echo "TLS: the plain map shows $n markers in clear"
kill -TERM $RP
wait $RP || fail "nbd-runner exited non-zero on SIGTERM"
echo GUEST-TLS-OK
