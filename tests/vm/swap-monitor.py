"""For tests/vm/guest-swap.sh: every 10 s, the memory, the runner's threads and
every task asleep in a socket or block-layer wait, with kernel stacks, for a
hang's post-mortem. It locks its memory so it still runs when everything else
waits on swap. Usage: swap-monitor.py RUNNER_PID"""
import ctypes
import os
import sys
import time

ctypes.CDLL(None, use_errno=True).mlockall(3)  # MCL_CURRENT | MCL_FUTURE
rp = sys.argv[1]
WATCH = ("sock", "wmem", "unix", "wbt", "rq_qos", "nbd", "io_schedule", "blk")


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        return f"<{e.strerror}>"


for n in range(1, 1000):
    time.sleep(10)
    mem = [l for l in read("/proc/meminfo").splitlines()
           if l.split(":")[0] in ("MemFree", "Dirty", "Writeback", "SwapFree")]
    out = [f"[monitor {n * 10}s] " + " ".join(" ".join(l.split()) for l in mem)]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            t = f"/proc/{pid}/task/{tid}"
            stack = read(f"{t}/stack")
            if pid == rp or any(w in stack for w in WATCH):
                state = read(f"{t}/stat").rsplit(")", 1)[-1].split()[:1]
                out.append(f"  {pid}/{tid} {read(t + '/comm').strip()} {state}")
                out += ["    " + l for l in stack.splitlines()[:14]]
    print("\n".join(out), flush=True)
