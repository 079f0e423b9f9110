# Shared by the handler benchmarks (ceph-bench.sh, gluster-bench.sh): run
# nbd-runner's export and a direct-library fio engine turn about, then print
# the markdown table. Source it after setting RT REPS QD BS OUT RUNNER_PID,
# the array `common` (fio options both sides share) and a function
# `side_fio SIDE JOB_OPTIONS...` that runs fio for SIDE and prints its JSON.

# utime+stime ticks of nbd-runner, all threads.
bench_cpu() { awk '{print $14 + $15}' "/proc/$RUNNER_PID/stat"; }
# IOPS and IO count of a fio JSON file (fio may print notes before the JSON).
bench_iops() { python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]), j["read"]["total_ios"]+j["write"]["total_ios"])' "$1"; }

# bench_run SIDE RW REP: one timed run, appended to $OUT/runs.txt as
# "side rw rep iops runner-cpu-per-io-in-10ns".
bench_run() {
  local side=$1 rw=$2 rep=$3 f="$OUT/json/$1-$2-$3.json" c0 c1 n ios
  local job=(--name="$side" --rw="$rw" --bs="$BS" --iodepth="$QD" --time_based=1 --runtime="$RT" "${common[@]}")
  c0=$(bench_cpu)
  side_fio "$side" "${job[@]}" >"$f"
  c1=$(bench_cpu)
  read -r n ios < <(bench_iops "$f")
  echo "$side $rw $rep $n $(( (c1 - c0) * 100000000 / $(getconf CLK_TCK) / (ios > 0 ? ios : 1) ))" >>"$OUT/runs.txt"
  echo "  $side $rw rep $rep: $n IOPS" >&2
}

# bench_compare OURS THEIRS: REPS rounds of randread and randwrite, who goes
# first alternating, then the table of medians into $OUT/table.md.
bench_compare() {
  local ours=$1 theirs=$2 rep rw a b c
  for rep in $(seq "$REPS"); do
    for rw in randread randwrite; do
      if (( rep % 2 )); then bench_run "$ours" "$rw" "$rep"; bench_run "$theirs" "$rw" "$rep"
      else bench_run "$theirs" "$rw" "$rep"; bench_run "$ours" "$rw" "$rep"; fi
    done
  done
  med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  {
    echo "| $BS QD$QD, ${RT}s x $REPS | $ours IOPS | $theirs IOPS | ratio | $ours CPU/IO (us) |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    for rw in randread randwrite; do
      a=$(awk -v s="$ours" -v r="$rw" '$1==s && $2==r {print $4}' "$OUT/runs.txt" | med)
      b=$(awk -v s="$theirs" -v r="$rw" '$1==s && $2==r {print $4}' "$OUT/runs.txt" | med)
      c=$(awk -v s="$ours" -v r="$rw" '$1==s && $2==r {print $5/100}' "$OUT/runs.txt" | med)
      echo "| $rw | $a | $b | $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.0f%%", 100 * a / b}') | $c |"
    done
  } | tee "$OUT/table.md"
}

# bench_start_runner RUNNER_ARGS...: starts $NBD_RUNNER on free loopback
# ports with a scratch state directory (removed, and the runner stopped, on
# exit); sets RUNNER_PID, IO and RPC.
bench_start_runner() {
  STATE=$(mktemp -d)
  RUNNER_PID=
  trap '[[ -n $RUNNER_PID ]] && kill "$RUNNER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$STATE"' EXIT
  "$NBD_RUNNER" --state-dir "$STATE" --threads "$RUNNER_THREADS" --iohost 127.0.0.1 --ioport 0 \
    --rpcport 0 "$@" >"$STATE/ready" 2>"$OUT/runner.log" &
  RUNNER_PID=$!
  for _ in $(seq 100); do grep -q ready "$STATE/ready" 2>/dev/null && break; sleep 0.1; done
  IO=$(sed -n 's/.* io=\([^ ]*\).*/\1/p' "$STATE/ready")
  RPC=$(sed -n 's/.* rpc=\([^ ]*\).*/\1/p' "$STATE/ready")
  # nbd-cli presents the runner's token on every TCP call
  export NBD_RUNNER_TOKEN_FILE=$STATE/token
  [[ -n $IO ]] || { echo "nbd-runner did not start (see $OUT/runner.log)" >&2; exit 1; }
}
