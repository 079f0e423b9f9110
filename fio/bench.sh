#!/usr/bin/env bash
# Side-by-side benchmark: nbd-runner vs nbdkit vs qemu-nbd, all over loopback TCP, driven by fio's libnbd
# engine (fio/nbd.fio). Runs are interleaved: for each case and each repetition
# every server runs once, in an order that rotates, so drift on a shared machine
# hits all servers alike. Compare the ratios, which are taken within one run.
#
# For each run it records fio's IOPS and p99 total latency (lat_percentiles=1),
# and the server's CPU time per IO: the change in utime+stime of the server
# process (/proc/PID/stat, all threads) across just that fio run, divided by the
# IOs fio completed in it. It also records the client's CPU (fio, timed by bash)
# and the rest of the machine's (busy time in /proc/stat minus both), so runs
# disturbed by other work on a shared machine show up in the table.
#
# Usage: fio/bench.sh [--backend mem|file|direct]   (from anywhere; builds nbd-runner)
#        QUICK=1 fio/bench.sh    (smoke check: 1 s runs, 1 repetition)
#
# Backends (--backend, or BACKEND=):
#   mem     nbd-runner mem export, nbdkit memory plugin, qemu-nbd on a raw file in SHM_DIR
#   file    each server its own 1 GiB raw file in FILE_DIR, buffered IO for all:
#           nbd-runner file export, nbdkit file plugin, qemu-nbd --cache=writeback --aio=io_uring
#   direct  the same files with O_DIRECT: nbd-runner file export ",direct", nbdkit file
#           cache=none, qemu-nbd --cache=none --aio=native (FILE_DIR must not be tmpfs).
#           nbdkit has no O_DIRECT: cache=none reads through the page cache (read-ahead
#           included) and evicts afterwards, so qemu-nbd is the like-for-like peer here.
#
# Environment (defaults in brackets):
#   RT=10            seconds per fio run
#   REPS=3           repetitions of every (case, server)
#   QUICK=0          1: RT=1 REPS=1 unless given, for a smoke check
#   CASES=all        space-separated case names to run (see the list printed by CASES=help)
#   SERVERS="nbd-runner nbdkit qemu-nbd"   subset / order of servers
#   RESULTS=fio/results   parent folder; each run writes RESULTS/YYYYmmdd-HHMMSS/
#   NBD_RUNNER=target/release/nbd-runner   binary to test (given: no cargo build)
#   RUNNER_THREADS=$(nproc)   nbd-runner --threads (IO shards, one per core)
#   RUNNER_ARGS=              more nbd-runner flags, e.g. --no-pin
#   NBDKIT_THREADS=16         nbdkit --threads (per connection; 16 is nbdkit's default)
#   QEMU_AIO=io_uring         qemu-nbd --aio (io_uring, threads; native needs O_DIRECT)
#   QEMU_CACHE=writeback      qemu-nbd --cache (tmpfs refuses O_DIRECT, so not none)
#   QEMU_SHARED=8             qemu-nbd -e (connections allowed at once)
#   PREFILL=1                 write every byte of each export once before measuring,
#                             so reads copy real data instead of answering holes
#   SHM_DIR=/dev/shm          where qemu-nbd's raw file lives (mem backend)
#   FILE_DIR=target/bench-files   where the file and direct backends' files live
set -euo pipefail

die() {
	echo "bench.sh: $*" >&2
	exit 1
}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

BACKEND=${BACKEND:-mem}
while (($#)); do
	case $1 in
	--backend) BACKEND=${2:-}; shift 2 || die "--backend needs mem, file or direct" ;;
	--backend=*) BACKEND=${1#--backend=}; shift ;;
	*) die "unknown argument '$1' (usage: fio/bench.sh [--backend mem|file|direct])" ;;
	esac
done
case $BACKEND in mem | file | direct) ;; *) die "--backend must be mem, file or direct (got '$BACKEND')" ;; esac

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
	RT=${RT:-1}
	REPS=${REPS:-1}
fi
RT=${RT:-10}
REPS=${REPS:-3}
CASES=${CASES:-all}
TIMEFORMAT='%U %S' # for `time` around fio: client user and system seconds
SERVERS=${SERVERS:-nbd-runner nbdkit qemu-nbd}
RESULTS=${RESULTS:-$HERE/results}
RUNNER_THREADS=${RUNNER_THREADS:-$(nproc)}
RUNNER_ARGS=${RUNNER_ARGS:-}
NBDKIT_THREADS=${NBDKIT_THREADS:-16}
QEMU_AIO=${QEMU_AIO:-io_uring}
QEMU_CACHE=${QEMU_CACHE:-writeback}
QEMU_SHARED=${QEMU_SHARED:-8}
PREFILL=${PREFILL:-1}
SHM_DIR=${SHM_DIR:-/dev/shm}
FILE_DIR=${FILE_DIR:-$ROOT/target/bench-files}
SIZE=1G
if [[ $BACKEND == direct ]]; then
	QEMU_CACHE=none
	QEMU_AIO=native
elif [[ $BACKEND == file ]]; then
	QEMU_CACHE=writeback
	QEMU_AIO=${QEMU_AIO:-io_uring}
fi

[[ $RT =~ ^[0-9]+$ && $RT -ge 1 ]] || die "RT must be a whole number of seconds >= 1 (got '$RT')"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "REPS must be a whole number >= 1 (got '$REPS')"

# name rw bs iodepth numjobs
ALL_CASES=(
	"randread-4k-qd32-j1 randread 4k 32 1"
	"randwrite-4k-qd32-j1 randwrite 4k 32 1"
	"randread-4k-qd32-j2 randread 4k 32 2"
	"randwrite-4k-qd32-j2 randwrite 4k 32 2"
	"randread-4k-qd1 randread 4k 1 1"
	"randwrite-4k-qd1 randwrite 4k 1 1"
	"read-1m-qd8 read 1m 8 1"
	"write-1m-qd8 write 1m 8 1"
)

if [[ $CASES == help ]]; then
	printf '%s\n' "${ALL_CASES[@]}" | awk '{printf "%-22s rw=%s bs=%s iodepth=%s numjobs=%s\n", $1, $2, $3, $4, $5}'
	exit 0
fi

SELECTED=()
for c in "${ALL_CASES[@]}"; do
	name=${c%% *}
	if [[ $CASES == all || " $CASES " == *" $name "* ]]; then
		SELECTED+=("$c")
	fi
done
((${#SELECTED[@]} > 0)) || die "CASES='$CASES' matches no case; CASES=help lists them"

read -ra SERVER_LIST <<<"$SERVERS"
for s in "${SERVER_LIST[@]}"; do
	case $s in nbd-runner | nbdkit | qemu-nbd) ;; *) die "unknown server '$s' in SERVERS" ;; esac
done

# --- tools ------------------------------------------------------------------

need() { # command, Debian package
	command -v "$1" >/dev/null 2>&1 || die "missing tool: $1 (Debian: apt-get install $2)"
}
need fio fio
need nbdinfo libnbd-bin
need python3 python3
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' engine (fio >= 3.17 built with libnbd; Debian's fio has it)"
for s in "${SERVER_LIST[@]}"; do
	case $s in
	nbdkit)
		need nbdkit nbdkit
		plugin=memory
		[[ $BACKEND == mem ]] || plugin=file
		nbdkit $plugin --version >/dev/null 2>&1 || die "nbdkit has no $plugin plugin (Debian: apt-get install nbdkit)"
		;;
	qemu-nbd)
		need qemu-nbd qemu-utils
		[[ -d $SHM_DIR && -w $SHM_DIR ]] || die "SHM_DIR=$SHM_DIR is not a writable directory"
		;;
	nbd-runner)
		if [[ -z ${NBD_RUNNER:-} ]]; then
			need cargo "rustup (https://rustup.rs)"
			echo "bench.sh: cargo build --release --bin nbd-runner" >&2
			(cd "$ROOT" && cargo build --release --quiet --bin nbd-runner) || die "cargo build failed"
			NBD_RUNNER=$ROOT/target/release/nbd-runner
		fi
		[[ -x $NBD_RUNNER ]] || die "NBD_RUNNER=$NBD_RUNNER is not an executable"
		;;
	esac
done

CLK_TCK=$(getconf CLK_TCK)

# --- results folder and cleanup -----------------------------------------------

STAMP=$(date +%Y%m%d-%H%M%S)
OUT=$RESULTS/$STAMP
mkdir -p "$OUT/json" "$OUT/logs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nbd-bench.XXXXXX")
SHM_FILE=$SHM_DIR/nbd-bench-$$.raw
if [[ $BACKEND != mem ]]; then
	mkdir -p "$FILE_DIR"
	if [[ $BACKEND == direct && $(stat -f -c %T "$FILE_DIR") == tmpfs ]]; then
		die "FILE_DIR=$FILE_DIR is on tmpfs, which refuses O_DIRECT; give FILE_DIR on a disk"
	fi
fi
# Each server's own file (file and direct backends), written in full before
# measuring so no server reads holes or allocates blocks on the first writes.
backing_file() { echo "$FILE_DIR/nbd-bench-$$-$1.raw"; }

declare -A PID URI
STARTED=()

cleanup() {
	local p
	for p in "${STARTED[@]}"; do
		kill -TERM "$p" 2>/dev/null || true
	done
	for p in "${STARTED[@]}"; do
		for _ in $(seq 50); do
			kill -0 "$p" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	rm -f "$SHM_FILE" "$FILE_DIR"/nbd-bench-$$-*.raw
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_ready() { # server, uri, pid
	local i
	for i in $(seq 100); do
		kill -0 "$3" 2>/dev/null || die "$1 exited during start-up; see $OUT/logs/$1.log"
		if nbdinfo --size "$2" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.1
		[[ $i == 100 ]] && die "$1 did not answer on $2 within 10 s; see $OUT/logs/$1.log"
	done
}

start_server() {
	local s=$1 port p line
	case $s in
	nbd-runner)
		mkdir -p "$WORK/state"
		export_spec="mem:disk0,size=$SIZE"
		case $BACKEND in
		file) export_spec="file:$(backing_file "$s"),size=$SIZE" ;;
		direct) export_spec="file:$(backing_file "$s"),size=$SIZE,direct" ;;
		esac
		# shellcheck disable=SC2086 # RUNNER_ARGS is a list of flags
		"$NBD_RUNNER" --iohost 127.0.0.1 --ioport 0 --rpcport 0 --threads "$RUNNER_THREADS" \
			--state-dir "$WORK/state" --export "$export_spec" $RUNNER_ARGS \
			>"$WORK/runner.out" 2>"$OUT/logs/$s.log" &
		p=$!
		STARTED+=("$p")
		for _ in $(seq 100); do
			line=$(grep -m1 '^nbd-runner ready io=' "$WORK/runner.out" || true)
			[[ -n $line ]] && break
			kill -0 "$p" 2>/dev/null || die "nbd-runner exited during start-up; see $OUT/logs/$s.log"
			sleep 0.1
		done
		[[ -n $line ]] || die "nbd-runner printed no ready line within 10 s"
		line=${line#*io=} # "nbd-runner ready io=ADDR:PORT[ rpc=...]"
		# The export is named by its key: a file key is an absolute path.
		URI[$s]="nbd://${line%% *}/${export_spec#*:}"
		URI[$s]=${URI[$s]%%,*}
		[[ $BACKEND == mem ]] && URI[$s]="nbd://${line%% *}/disk0"
		echo "$NBD_RUNNER --iohost 127.0.0.1 --ioport 0 --rpcport 0 --threads $RUNNER_THREADS --export $export_spec $RUNNER_ARGS" >"$OUT/logs/$s.cmd"
		;;
	nbdkit)
		port=$(free_port)
		plugin=(memory "$SIZE")
		if [[ $BACKEND != mem ]]; then
			truncate -s "$SIZE" "$(backing_file "$s")"
			plugin=(file "$(backing_file "$s")")
			[[ $BACKEND == direct ]] && plugin+=(cache=none)
		fi
		nbdkit -f -i 127.0.0.1 -p "$port" --threads "$NBDKIT_THREADS" "${plugin[@]}" \
			>"$OUT/logs/$s.log" 2>&1 &
		p=$!
		STARTED+=("$p")
		URI[$s]="nbd://127.0.0.1:$port/"
		echo "nbdkit -f -i 127.0.0.1 -p $port --threads $NBDKIT_THREADS ${plugin[*]}" >"$OUT/logs/$s.cmd"
		;;
	qemu-nbd)
		port=$(free_port)
		qfile=$SHM_FILE
		[[ $BACKEND == mem ]] || qfile=$(backing_file "$s")
		rm -f "$qfile"
		truncate -s "$SIZE" "$qfile"
		qemu-nbd -f raw --cache="$QEMU_CACHE" --aio="$QEMU_AIO" -e "$QEMU_SHARED" -t \
			-b 127.0.0.1 -p "$port" "$qfile" >"$OUT/logs/$s.log" 2>&1 &
		p=$!
		STARTED+=("$p")
		URI[$s]="nbd://127.0.0.1:$port/"
		echo "qemu-nbd -f raw --cache=$QEMU_CACHE --aio=$QEMU_AIO -e $QEMU_SHARED -t -b 127.0.0.1 -p $port $qfile" >"$OUT/logs/$s.cmd"
		;;
	esac
	PID[$s]=$p
	wait_ready "$s" "${URI[$s]}" "$p"
}

busy_ticks() { # CPU time the whole machine spent busy (all cores, no steal), in clock ticks
	local -a f
	read -ra f </proc/stat # cpu user nice system idle iowait irq softirq steal ...
	echo $((f[1] + f[2] + f[3] + f[6] + f[7]))
}

cpu_ticks() { # utime+stime of every thread of a process, in clock ticks
	local stat rest
	stat=$(<"/proc/$1/stat") || die "server pid $1 is gone"
	rest=${stat##*) } # comm may hold spaces; fields resume after its ')'
	local -a f
	read -ra f <<<"$rest"
	echo $((f[11] + f[12])) # fields 14 (utime) and 15 (stime)
}

# --- run ----------------------------------------------------------------------

{
	echo "date: $(date -Is)"
	echo "host: $(uname -srm), $(nproc) cpus, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
	echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
	echo "fio: $(fio --version)"
	echo "RT=$RT REPS=$REPS CASES=$CASES SERVERS=$SERVERS PREFILL=$PREFILL BACKEND=$BACKEND"
	[[ $BACKEND == mem ]] || echo "files: $FILE_DIR ($(stat -f -c %T "$FILE_DIR"))"
	echo "git: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
} >"$OUT/env.txt"

for s in "${SERVER_LIST[@]}"; do
	start_server "$s"
	echo "bench.sh: $s pid ${PID[$s]} at ${URI[$s]}" >&2
	case $s in
	nbdkit) echo "nbdkit: $(nbdkit --version)" >>"$OUT/env.txt" ;;
	qemu-nbd) echo "qemu-nbd: $(qemu-nbd --version | head -1)" >>"$OUT/env.txt" ;;
	esac
	cat "$OUT/logs/$s.cmd" >>"$OUT/env.txt"
	if [[ $PREFILL == 1 ]]; then
		echo "bench.sh: prefilling $s" >&2
		URI=${URI[$s]} fio "$HERE/prefill.fio" --output="$WORK/prefill-$s.txt" >/dev/null ||
			die "prefill of $s failed: $(cat "$WORK/prefill-$s.txt")"
	fi
done

TSV=$OUT/runs.tsv
printf 'case\tserver\trep\tslot\tiops\tp99_us\tios\tcpu_s\tcpu_us_per_io\tclient_cpu_pct\tother_cpu_pct\n' >"$TSV"

# Prints: iops p99_us ios (read and write summed; p99 the worse one).
parse_fio() {
	python3 - "$1" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
doc = json.loads(text[text.index("{"):])  # fio may print a note before the JSON
job = doc["jobs"][0]
if job.get("error"):
    sys.exit(f"fio job error {job['error']}")
iops = ios = 0.0
p99 = 0.0
for d in ("read", "write"):
    st = job[d]
    if st["total_ios"]:
        iops += st["iops"]
        ios += st["total_ios"]
        p99 = max(p99, st["lat_ns"]["percentile"]["99.000000"] / 1000.0)
if ios == 0:
    sys.exit("fio did no IO")
print(f"{iops:.0f} {p99:.1f} {ios:.0f}")
EOF
}

n=${#SERVER_LIST[@]}
total=$((${#SELECTED[@]} * REPS * n))
done_runs=0
echo "bench.sh: ${#SELECTED[@]} cases x $REPS reps x $n servers, ${RT} s each (~$((total * (RT + 1) / 60 + 1)) min); results in $OUT" >&2
for ci in "${!SELECTED[@]}"; do
	read -r name rw bs qd nj <<<"${SELECTED[$ci]}"
	for ((rep = 1; rep <= REPS; rep++)); do
		for ((k = 0; k < n; k++)); do
			s=${SERVER_LIST[$(((ci + rep - 1 + k) % n))]}
			json=$OUT/json/$name.$s.rep$rep.json
			w0=$(date +%s.%N)
			b0=$(busy_ticks)
			t0=$(cpu_ticks "${PID[$s]}")
			# bash's `time` gives the client's own CPU (fio and its job processes).
			if ! { time URI=${URI[$s]} RW=$rw BS=$bs QD=$qd NJ=$nj RT=$RT RAMP=0 \
				fio "$HERE/nbd.fio" --output-format=json --output="$json" >"$WORK/fio.err" 2>&1; } 2>"$WORK/time"; then
				die "fio failed for $name on $s: $(cat "$WORK/fio.err" "$json" 2>/dev/null | tail -5)"
			fi
			t1=$(cpu_ticks "${PID[$s]}")
			b1=$(busy_ticks)
			w1=$(date +%s.%N)
			read -r iops p99 ios < <(parse_fio "$json") || die "cannot parse $json"
			read -r cpu_s per_io client other < <(python3 -c "
server = ($t1 - $t0) / $CLK_TCK
client = sum(map(float, open('$WORK/time').read().split()))
wall = $w1 - $w0
other = ($b1 - $b0) / $CLK_TCK - server - client  # everything else on the machine
print(f'{server:.2f} {server * 1e6 / $ios:.2f} {100 * client / wall:.0f} {max(0.0, 100 * other / wall):.0f}')")
			printf '%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
				"$name" "$s" "$rep" "$((k + 1))" "$iops" "$p99" "$ios" "$cpu_s" "$per_io" "$client" "$other" >>"$TSV"
			done_runs=$((done_runs + 1))
			printf 'bench.sh: [%d/%d] %-22s rep %d %-10s %8s IOPS  p99 %8s us  %6s us CPU/IO  other %3s%%\n' \
				"$done_runs" "$total" "$name" "$rep" "$s" "$iops" "$p99" "$per_io" "$other" >&2
		done
	done
done

# --- summary ------------------------------------------------------------------

python3 - "$TSV" "$RT" "$REPS" >"$OUT/summary.md" <<'EOF'
import csv, statistics, sys
from collections import defaultdict

tsv, rt, reps = sys.argv[1], sys.argv[2], sys.argv[3]
runs = defaultdict(list)
cases, servers = [], []
with open(tsv) as f:
    for r in csv.DictReader(f, delimiter="\t"):
        runs[(r["case"], r["server"])].append(r)
        if r["case"] not in cases:
            cases.append(r["case"])
        if r["server"] not in servers:
            servers.append(r["server"])

def med(case, server, key):
    rows = runs.get((case, server))
    return statistics.median(float(r[key]) for r in rows) if rows else None

def spread(case, server, key):
    vals = [float(r[key]) for r in runs[(case, server)]]
    m = statistics.median(vals)
    return 100.0 * (max(vals) - min(vals)) / m if m else 0.0

def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"

print(f"Medians of {reps} interleaved run(s) of {rt} s per case and server.")
print("Server CPU/IO = server utime+stime / IOs done. Spread = ±(max-min)/2 of IOPS, over median.")
print("Client and other CPU: % of one core during the run; 'other' is the rest of the machine")
print("(other users, kernel work not charged to a task): more than ~20% means the run was disturbed.\n")
print("| case | server | IOPS | spread | p99 lat (µs) | server CPU (µs/IO) | client CPU % | other CPU % |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for c in cases:
    for s in servers:
        if (c, s) not in runs:
            continue
        print(f"| {c} | {s} | {med(c, s, 'iops'):,.0f} | ±{spread(c, s, 'iops') / 2:.0f}% "
              f"| {med(c, s, 'p99_us'):,.1f} | {med(c, s, 'cpu_us_per_io'):.2f} "
              f"| {med(c, s, 'client_cpu_pct'):.0f} | {med(c, s, 'other_cpu_pct'):.0f} |")
us = "nbd-runner"
if us in servers:
    print("\nRatios of medians, nbd-runner / other (IOPS: higher is better; CPU/IO: lower is better).\n")
    print("| case | IOPS / nbdkit | IOPS / qemu-nbd | CPU/IO / nbdkit | CPU/IO / qemu-nbd |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for c in cases:
        cells = []
        for key in ("iops", "cpu_us_per_io"):
            for other in ("nbdkit", "qemu-nbd"):
                cells.append(ratio(med(c, us, key), med(c, other, key)))
        print(f"| {c} | " + " | ".join(cells) + " |")
EOF
cat "$OUT/summary.md"
echo
echo "bench.sh: raw fio JSON, runs.tsv, summary.md and server logs in $OUT" >&2
