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

STATE=$(mktemp -d)
RUNNER_PID=
cleanup() { [[ -n $RUNNER_PID ]] && kill "$RUNNER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$STATE"; }
trap cleanup EXIT
"$NBD_RUNNER" --state-dir "$STATE" --threads "$RUNNER_THREADS" --iohost 127.0.0.1 --ioport 0 \
  --rpcport 0 --gluster-server 127.0.0.1 >"$STATE/ready" 2>"$OUT/runner.log" &
RUNNER_PID=$!
for _ in $(seq 100); do grep -q ready "$STATE/ready" 2>/dev/null && break; sleep 0.1; done
IO=$(sed -n 's/.* io=\([^ ]*\).*/\1/p' "$STATE/ready")
RPC=$(sed -n 's/.* rpc=\([^ ]*\).*/\1/p' "$STATE/ready")
[[ -n $IO ]] || die "nbd-runner did not start (see $OUT/runner.log)"

KEY=$VOLUME/nbd-runner-bench.img
"$NBD_CLI" --host "$RPC" gluster create "$KEY" size 1G >/dev/null
URI=nbd://$IO/$KEY
GFAPI=(--ioengine=gfapi_async --volume="$VOLUME" --brick=127.0.0.1 --filename=gfapi-bench.img)
common=(--size=1g --output-format=json --group_reporting=1 --norandommap=1 --randrepeat=0)

echo "prefilling both files" >&2
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 "${common[@]}" >/dev/null
fio --name=fill "${GFAPI[@]}" --rw=write --bs=1m --iodepth=8 "${common[@]}" >/dev/null

cpu() { awk '{print $14 + $15}' "/proc/$RUNNER_PID/stat"; }  # utime+stime ticks, all threads
iops() { python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]), j["read"]["total_ios"]+j["write"]["total_ios"])' "$1"; }
run() {  # side rw rep
  local side=$1 rw=$2 rep=$3 f="$OUT/json/$1-$2-$3.json" c0 c1
  local job=(--name="$side" --rw="$rw" --bs="$BS" --iodepth="$QD" --time_based=1 --runtime="$RT" "${common[@]}")
  c0=$(cpu)
  if [[ $side == nbd-runner ]]; then fio "${job[@]}" --ioengine=nbd --uri="$URI" >"$f"
  else fio "${job[@]}" "${GFAPI[@]}" >"$f"; fi
  c1=$(cpu)
  read -r n ios < <(iops "$f")
  echo "$side $rw $rep $n $(( (c1 - c0) * 100000000 / $(getconf CLK_TCK) / (ios > 0 ? ios : 1) ))" >>"$OUT/runs.txt"
  echo "  $side $rw rep $rep: $n IOPS" >&2
}
for rep in $(seq "$REPS"); do
  for rw in randread randwrite; do
    # Alternate who goes first.
    if (( rep % 2 )); then run nbd-runner "$rw" "$rep"; run gfapi_async "$rw" "$rep"
    else run gfapi_async "$rw" "$rep"; run nbd-runner "$rw" "$rep"; fi
  done
done

med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
{
  echo "| $BS QD$QD, ${RT}s x $REPS | nbd-runner IOPS | gfapi_async IOPS | ratio | nbd-runner CPU/IO (us) |"
  echo "| --- | ---: | ---: | ---: | ---: |"
  for rw in randread randwrite; do
    a=$(awk -v r="$rw" '$1=="nbd-runner" && $2==r {print $4}' "$OUT/runs.txt" | med)
    b=$(awk -v r="$rw" '$1=="gfapi_async" && $2==r {print $4}' "$OUT/runs.txt" | med)
    c=$(awk -v r="$rw" '$1=="nbd-runner" && $2==r {print $5/100}' "$OUT/runs.txt" | med)
    echo "| $rw | $a | $b | $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.0f%%", 100 * a / b}') | $c |"
  done
} | tee "$OUT/table.md"
"$NBD_CLI" --host "$RPC" gluster delete "$KEY" >/dev/null
