#!/usr/bin/env bash
# Ceph benchmark: 4k random read and write at QD32 through nbd-runner's ceph
# export (fio's libnbd engine over loopback TCP) versus fio's own rbd engine
# (librbd in the fio process) on the same image, interleaved in one run so
# drift on a shared machine hits both alike. Goal: nbd-runner >= 85% of the
# direct librbd IOPS. The 1 GiB image is written in full first so reads
# return real data.
#
# The two sides take turns on one image. Its exclusive lock moves between
# nbd-runner and fio at each turn (librbd hands it over cooperatively);
# the first second of each run pays for that, the same for both sides.
#
# Usage (root: it starts a loopback cluster with tests/ceph/start-ceph.sh):
#   fio/ceph-bench.sh                 RT=10 REPS=3
#   QUICK=1 fio/ceph-bench.sh         2 s runs, 1 repetition
# Environment: RT, REPS, QD=32, BS=4k, CEPH_DIR=/var/tmp/nbd-runner-ceph,
#   RUNNER_THREADS=$(nproc), NBD_RUNNER / NBD_CLI (given: no cargo build),
#   FIO_RBD_CPUS (e.g. 1: confine the fio-rbd side, librbd's threads
#   included, to those CPUs, as --threads 1 confines the runner),
#   RESULTS=fio/results
# Prints a markdown table (median IOPS per side, ratio, and nbd-runner's CPU
# per IO from /proc/PID/stat) and keeps fio's JSON under RESULTS/ceph-DATE/.
set -euo pipefail
die() { echo "ceph-bench.sh: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
[[ ${QUICK:-0} == 1 ]] && { RT=${RT:-2}; REPS=${REPS:-1}; }
RT=${RT:-10} REPS=${REPS:-3} QD=${QD:-32} BS=${BS:-4k}
CEPH_DIR=${CEPH_DIR:-/var/tmp/nbd-runner-ceph}
RUNNER_THREADS=${RUNNER_THREADS:-$(nproc)}
OUT=${RESULTS:-$HERE/results}/ceph-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/json"

"$ROOT/tests/ceph/start-ceph.sh" "$CEPH_DIR" >/dev/null
# fio's rbd engine reads the default ceph.conf, which CEPH_CONF points at.
export CEPH_CONF=$CEPH_DIR/ceph.conf
if [[ -z ${NBD_RUNNER:-} ]]; then
  (cd "$ROOT" && cargo build --release --features nbd-cli/ceph --bins >&2)
  NBD_RUNNER=$ROOT/target/release/nbd-runner NBD_CLI=$ROOT/target/release/nbd-cli
fi
fio --enghelp | grep -qx '[[:space:]]*rbd' || die "this fio has no rbd engine"

# shellcheck source=bench-lib.sh
. "$HERE/bench-lib.sh"
bench_start_runner --ceph-conf "$CEPH_CONF"

IMAGE=nbd-runner-bench-$$
KEY=rbd/$IMAGE
"$NBD_CLI" --host "$RPC" ceph create "$KEY" size 1G >/dev/null
URI=nbd://$IO/$KEY
RBD=(--ioengine=rbd --clientname=admin --pool=rbd --rbdname="$IMAGE")
common=(--size=1g --output-format=json --group_reporting=1 --norandommap=1 --randrepeat=0)
{ echo "fio $(fio --version), ceph $(ceph --version | awk '{print $3}')"; nproc; uname -r; } >"$OUT/env.txt"

echo "prefilling the image" >&2
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 "${common[@]}" >/dev/null

side_fio() {  # side job-options...
  local side=$1; shift
  if [[ $side == nbd-runner ]]; then fio "$@" --ioengine=nbd --uri="$URI"
  else ${FIO_RBD_CPUS:+taskset -c "$FIO_RBD_CPUS"} fio "$@" "${RBD[@]}"; fi
}
bench_compare nbd-runner fio-rbd
"$NBD_CLI" --host "$RPC" ceph delete "$KEY" >/dev/null
