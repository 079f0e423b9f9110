# Sourced by the guest-*.sh scripts inside the VM. They define fail() and
# set RUNNER (and MNT, for the ext4 helpers) first.

step() { echo "--- $*"; }
expect_eq() { [ "$1" = "$2" ] || fail "$3: got '$1', expected '$2'"; }

# start_runner ARGS...: nbd-runner on the guest's loopback with 2 shards,
# state in /tmp/st and file backstores beneath /tmp, plus ARGS; sets RP,
# returns once it is ready.
RP=
# nbd-cli (default host 127.0.0.1:24110) presents this runner's token.
export NBD_RUNNER_TOKEN_FILE=/tmp/st/token
start_runner() {
  : >/tmp/runner.out
  "$RUNNER" --iohost 127.0.0.1 --threads 2 --state-dir /tmp/st --file-root /tmp "$@" \
    >/tmp/runner.out 2>>/tmp/runner.log &
  RP=$!
  for _ in $(seq 300); do
    grep -q '^nbd-runner ready' /tmp/runner.out && return 0
    kill -0 $RP 2>/dev/null || fail "nbd-runner exited at start"
    sleep 0.1
  done
  fail "nbd-runner not ready after 30 s"
}

# ext4_store DEV: a fresh ext4 on DEV holding /tmp/rand.bin as f, unmounted.
ext4_store() {
  mkfs.ext4 -q -F "$1"
  mount "$1" "$MNT"
  cp /tmp/rand.bin "$MNT/f"
  sync
  umount "$MNT"
}

# ext4_same DEV WHEN [MOUNT_OPTS]: mounts DEV and checks f is /tmp/rand.bin;
# stays mounted.
ext4_same() {
  mount ${3:+-o "$3"} "$1" "$MNT"
  cmp /tmp/rand.bin "$MNT/f" || fail "data differs $2"
}
