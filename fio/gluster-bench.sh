#!/usr/bin/env bash
# Gluster benchmark: 4k random read and write at QD32 through nbd-runner's
# gluster export (fio's libnbd engine over loopback TCP) versus fio's own
# gfapi_async engine straight on the same volume, interleaved in one run so
# drift on a shared machine hits both alike. Goal: nbd-runner >= 85% of the
# direct gfapi IOPS. Each side has its own 1 GiB file on the volume, written
# in full first so reads return real data.
#
# Usage (root: it starts glusterd and a loopback volume with
# tests/gluster/start-gluster.sh when needed):
#   fio/gluster-bench.sh                 RT=10 REPS=3
#   QUICK=1 fio/gluster-bench.sh         1 s runs, 1 repetition
# Environment: RT, REPS, QD=32, BS=4k, VOLUME=nbdbench,
#   BRICK=/var/tmp/nbd-runner-gluster/bench-brick, RUNNER_THREADS=$(nproc),
#   NBD_RUNNER / NBD_CLI (given: no cargo build), RESULTS=fio/results
# Prints a markdown table (median IOPS per side, ratio, and nbd-runner's CPU
# per IO from /proc/PID/stat) and keeps fio's JSON under RESULTS/gluster-DATE/.
set -euo pipefail
die() { echo "gluster-bench.sh: $*" >&2; exit 1; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
[[ ${QUICK:-0} == 1 ]] && { RT=${RT:-1}; REPS=${REPS:-1}; }
RT=${RT:-10} REPS=${REPS:-3} QD=${QD:-32} BS=${BS:-4k}
VOLUME=${VOLUME:-nbdbench}
BRICK=${BRICK:-/var/tmp/nbd-runner-gluster/bench-brick}
RUNNER_THREADS=${RUNNER_THREADS:-$(nproc)}
OUT=${RESULTS:-$HERE/results}/gluster-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/json"

"$ROOT/tests/gluster/start-gluster.sh" "$VOLUME" "$BRICK"
if [[ -z ${NBD_RUNNER:-} ]]; then
  (cd "$ROOT" && cargo build --release --features nbd-cli/gluster --bins >&2)
  NBD_RUNNER=$ROOT/target/release/nbd-runner NBD_CLI=$ROOT/target/release/nbd-cli
fi
fio --enghelp | grep -qx '[[:space:]]*gfapi_async' || die "this fio has no gfapi_async engine"

# shellcheck source=bench-lib.sh
. "$HERE/bench-lib.sh"
bench_start_runner --gluster-server 127.0.0.1

KEY=$VOLUME/nbd-runner-bench.img
"$NBD_CLI" --host "$RPC" gluster create "$KEY" size 1G >/dev/null
URI=nbd://$IO/$KEY
GFAPI=(--ioengine=gfapi_async --volume="$VOLUME" --brick=127.0.0.1 --filename=gfapi-bench.img)
common=(--size=1g --output-format=json --group_reporting=1 --norandommap=1 --randrepeat=0)

echo "prefilling both files" >&2
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 "${common[@]}" >/dev/null
fio --name=fill "${GFAPI[@]}" --rw=write --bs=1m --iodepth=8 "${common[@]}" >/dev/null

side_fio() {  # side job-options...
  local side=$1; shift
  if [[ $side == nbd-runner ]]; then fio "$@" --ioengine=nbd --uri="$URI"
  else fio "$@" "${GFAPI[@]}"; fi
}
bench_compare nbd-runner gfapi_async
"$NBD_CLI" --host "$RPC" gluster delete "$KEY" >/dev/null
