# Sourced by the guest-*.sh scripts inside the VM. They define fail() and
# set RUNNER first.

step() { echo "--- $*"; }
expect_eq() { [ "$1" = "$2" ] || fail "$3: got '$1', expected '$2'"; }

# start_runner ARGS...: nbd-runner on the guest's loopback with 2 shards and
# state in /tmp/st, plus ARGS; sets RP, returns once it is ready.
RP=
start_runner() {
  : >/tmp/runner.out
  "$RUNNER" --iohost 127.0.0.1 --threads 2 --state-dir /tmp/st "$@" \
    >/tmp/runner.out 2>>/tmp/runner.log &
  RP=$!
  for _ in $(seq 300); do
    grep -q '^nbd-runner ready' /tmp/runner.out && return 0
    kill -0 $RP 2>/dev/null || fail "nbd-runner exited at start"
    sleep 0.1
  done
  fail "nbd-runner not ready after 30 s"
}
