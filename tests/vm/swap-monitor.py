"""For tests/vm/guest-swap.sh: every 10 s, the memory; when swap stopped moving
since the last look, the runner's threads with their kernel stacks, the NBD
device's in-flight counts, and the kernel's list of blocked tasks (sysrq w),
for a hang's post-mortem. Everything is opened up front and the memory locked,
so it still runs when everything else waits on swap (reading an open /proc
file at offset 0 again needs no new allocation).
Usage: swap-monitor.py RUNNER_PID NBD_DEVICE_NAME"""
import ctypes
import os
import sys
import time

rp, dev = sys.argv[1], sys.argv[2]


def opened(path):
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def read(fd):
    if fd is None:
        return ""
    try:
        return os.pread(fd, 65536, 0).decode(errors="replace")
    except OSError as e:
        return f"<{e.strerror}>"


def slurp(path):
    fd = opened(path)
    try:
        return read(fd)
    finally:
        if fd is not None:
            os.close(fd)


meminfo, vmstat = opened("/proc/meminfo"), opened("/proc/vmstat")
inflight = opened(f"/sys/block/{dev}/inflight")
sysrq = os.open("/proc/sysrq-trigger", os.O_WRONLY)
zoneinfo, buddy = opened("/proc/zoneinfo"), opened("/proc/buddyinfo")
# The kernel log from now on, read without blocking: what sysrq prints reaches
# it whatever the console's loglevel.
kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
os.lseek(kmsg, 0, os.SEEK_END)
threads = []
for tid in sorted(os.listdir(f"/proc/{rp}/task"), key=int):
    t = f"/proc/{rp}/task/{tid}"
    threads.append((tid, read(opened(f"{t}/comm")).strip(), opened(f"{t}/stat"), opened(f"{t}/stack")))
ctypes.CDLL(None, use_errno=True).mlockall(3)  # MCL_CURRENT | MCL_FUTURE


def counter(text, key):
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


last = None
stalls = 0
for n in range(1, 1000):
    time.sleep(10)
    mem = [l for l in read(meminfo).splitlines()
           if l.split(":")[0] in ("MemFree", "Dirty", "Writeback", "SwapFree")]
    vm = read(vmstat)
    moved = (counter(vm, "pswpout"), counter(vm, "pswpin"))
    line = (f"[monitor {n * 10}s] " + " ".join(" ".join(l.split()) for l in mem)
            + f" pswpout {moved[0]} pswpin {moved[1]} {dev} in flight {read(inflight).split()}")
    stalled, last = moved == last, moved
    if not stalled:
        print(line, flush=True)
        continue
    out = [line + " (swap stalled)"]
    for tid, comm, stat, stack in threads:
        state = read(stat).rsplit(")", 1)[-1].split()[:1]
        out.append(f"  runner thread {tid} {comm} {state}")
        out += ["    " + l for l in read(stack).splitlines()[:14]]
    # Every task that is running or in D state, the hog's among them (the
    # walk allocates, but only once swap has stopped moving).
    me = str(os.getpid())
    for pid in [p for p in os.listdir("/proc") if p.isdigit() and p != me]:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            t = f"/proc/{pid}/task/{tid}"
            state = slurp(f"{t}/stat").rsplit(")", 1)[-1].split()[:1]
            if state and state[0] in ("R", "D"):
                out.append(f"  task {pid}/{tid} {slurp(t + '/comm').strip()} {state} wchan {slurp(t + '/wchan')}")
                out += ["    " + l for l in slurp(t + "/stack").splitlines()[:14]]
    out.append("  memory pressure: " + " ".join(slurp("/proc/pressure/memory").split()))
    # Per zone: free pages against the watermarks, and free blocks by order.
    for l in read(zoneinfo).splitlines():
        w = l.split()
        if w[:1] == ["Node"] or w[:2] == ["pages", "free"] or w[:1] in (["min"], ["low"], ["high"]):
            out.append("  zone " + " ".join(w))
    out += ["  buddy " + " ".join(l.split()) for l in read(buddy).splitlines()]
    print("\n".join(out), flush=True)
    # Blocked tasks every stall; every task's stack once, at the second.
    os.write(sysrq, b"w")
    stalls += 1
    if stalls == 2:
        os.write(sysrq, b"t")
    if stalls <= 3:
        time.sleep(1)
        lines = []
        while len(lines) < 3000:
            try:
                rec = os.read(kmsg, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records were overwritten; go on from here
                continue
            lines.append(rec.split(";", 1)[-1].rstrip())
        print("\n".join("  kmsg " + l for l in lines), flush=True)
