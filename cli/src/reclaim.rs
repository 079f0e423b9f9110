//! Memory-reclaim safety for a daemon that serves block devices (what
//! nbd-client `-swap` and nbdkit `--swap` do, and more). When the kernel is
//! short of memory it writes dirty pages, maybe to our own devices; if
//! serving that write needs memory the kernel must first reclaim, or the
//! OOM killer picks the runner, the machine deadlocks. So, before any
//! thread starts (threads inherit the first two):
//! - `PR_SET_IO_FLUSHER`: our allocations do not recurse into filesystem IO;
//! - `mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`: nothing of ours is
//!   swapped out, and only pages we touch are locked (thread stacks and
//!   reserved arenas are not pinned whole);
//! - `oom_score_adj = -1000`: the OOM killer leaves us alone;
//! - glibc keeps what we free (no trimming, no per-allocation mmap), and
//!   each shard touches a reserve at start (`--swap-reserve`): a page fault
//!   on the IO path under memory pressure cannot be served (our allocations
//!   may not start IO, and the reclaim that would free memory is waiting
//!   on us), which the VM's swap test showed as a hung shard.
//!
//! The runner's own memory stays bounded (`--mem-limit`, the shard
//! budgets), so locking it cannot exhaust the host.

use rustix::mm::{mlockall, MlockAllFlags};
use rustix::process::{configure_io_flusher_behavior, getrlimit, setrlimit, Resource};

/// What was applied, for the start-up log.
#[derive(Debug, Default)]
pub struct Applied {
    pub io_flusher: bool,
    pub locked: bool,
    pub oom_protected: bool,
}

/// Applies all three; each failure is logged with what to do about it and
/// the runner serves on.
pub fn protect() -> Applied {
    let mut done = Applied::default();
    match configure_io_flusher_behavior(true) {
        Ok(()) => done.io_flusher = true,
        Err(e) => tracing::warn!(
            "cannot set PR_SET_IO_FLUSHER ({e}): needs CAP_SYS_RESOURCE and Linux 5.6; \
             writeback to our own devices could deadlock under memory pressure"
        ),
    }
    match lock_memory() {
        Ok(()) => {
            done.locked = true;
            keep_freed_memory();
        }
        Err(why) => tracing::warn!("memory not locked: {why}"),
    }
    match std::fs::write("/proc/self/oom_score_adj", "-1000") {
        Ok(()) => done.oom_protected = true,
        Err(e) => tracing::warn!(
            "cannot set oom_score_adj to -1000 ({e}): needs CAP_SYS_RESOURCE; the OOM killer may pick the runner"
        ),
    }
    done
}

/// Tells glibc to keep freed memory mapped (and so locked and resident):
/// no trimming of the heaps, and no mmap per large allocation (which free
/// would unmap), up to the largest threshold glibc takes.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes allocator parameters.
        let ok = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
        };
        if !ok {
            tracing::warn!("mallopt refused: freed memory may be returned and faulted in again");
        }
    }
}

fn lock_memory() -> Result<(), String> {
    // MCL_FUTURE under a small RLIMIT_MEMLOCK would make later mmaps fail
    // (and allocations abort): lock only with the limit lifted, or with
    // CAP_IPC_LOCK (root), which ignores it.
    let mut lim = getrlimit(Resource::Memlock);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Memlock, lim);
    }
    let unlimited = getrlimit(Resource::Memlock).current.is_none();
    if !unlimited && !rustix::process::geteuid().is_root() {
        return Err(
            "RLIMIT_MEMLOCK is limited and the runner is not root; run as root or with \
             LimitMEMLOCK=infinity (or pass --no-swap-safety)"
                .into(),
        );
    }
    mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .map_err(|e| format!("mlockall: {e}"))
}
