//! Which CPUs the shards run on, keeping the runner's other threads
//! (control, and the threads librados and libgfapi start) on those same
//! CPUs, and how all of them are scheduled.
//!
//! Why confine the helpers: a backend library completes IO on its own
//! threads, so every request hops shard → library thread → shard. When
//! those threads float over every core they wake each other across cores
//! (an IPI and a cold cache per hop) and compete with whatever else the box
//! runs, a Ceph OSD or a gluster brick on small machines. Kept on the
//! shards' cores, the hops stay local and the rest of the machine stays
//! free: on the 2-core benchmark box, one shard with librbd's threads on
//! its core served 20-25% more IOPS at a third less CPU per IO than with
//! librbd's threads floating (tuning.md, "Ceph").

use glommio::{CpuSet, PoolPlacement};

/// The CPUs this process may run on (its affinity at start, which a
/// cgroup cpuset or `taskset` narrows).
pub fn usable_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set of the right size for the calling thread (pid 0).
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET bounds-checks against the set's size.
    Ok((0..crate::config::cpulist::MAX_CPUS)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// `--cpus`: the listed CPUs, each one this process may use, or a one-line
/// reason naming those it may not.
pub fn check_cpus(listed: &[usize]) -> Result<(), String> {
    let usable = usable_cpus().map_err(|e| format!("cannot read this process's CPUs: {e}"))?;
    let missing: Vec<usize> = listed
        .iter()
        .copied()
        .filter(|c| !usable.contains(c))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    use crate::config::cpulist::format_cpu_list;
    Err(format!(
        "--cpus names CPU {} that this runner cannot use (it may run on {})",
        format_cpu_list(&missing),
        format_cpu_list(&usable)
    ))
}

/// The CPU for each shard, or `None` when shards float (`--no-pin`, or the
/// topology is unreadable). With `listed` (`--cpus`, checked), shards take
/// those CPUs in order, round-robin when there are more shards. Otherwise
/// they spread over packages and cores first; with more shards than CPUs,
/// shards share CPUs round-robin.
pub fn shard_cpus(threads: usize, pin: bool, listed: Option<&[usize]>) -> Option<Vec<usize>> {
    if !pin || threads == 0 {
        return None;
    }
    if let Some(listed) = listed.filter(|l| !l.is_empty()) {
        return Some((0..threads).map(|i| listed[i % listed.len()]).collect());
    }
    let online: Vec<usize> = CpuSet::online().ok()?.iter().map(|l| l.cpu).collect();
    if online.is_empty() {
        return None;
    }
    if threads > online.len() {
        return Some((0..threads).map(|i| online[i % online.len()]).collect());
    }
    let mut spread = PoolPlacement::MaxSpread(threads, None)
        .generate_cpu_set()
        .ok()?;
    (0..threads)
        .map(|_| spread.next().next().map(|l| l.cpu))
        .collect()
}

/// glommio's placement for `shard_cpus`' answer, such that the i-th
/// executor it starts runs on `cpus[i]`: glommio takes custom CPU sets
/// from the back of the list.
pub(super) fn pool_placement(threads: usize, cpus: Option<&[usize]>) -> PoolPlacement {
    let (Some(cpus), Ok(online)) = (cpus, CpuSet::online()) else {
        return PoolPlacement::Unbound(threads);
    };
    PoolPlacement::Custom(
        cpus.iter()
            .rev()
            .map(|&cpu| online.clone().filter(|l| l.cpu == cpu))
            .collect(),
    )
}

/// Confines the calling thread, and every thread it starts from now on, to
/// `cpus`. Call it first thing in `main`, before anything spawns threads.
pub fn confine_current_thread(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET bounds-checks against the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: valid set for the calling thread (pid 0).
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How the runner's threads are scheduled (`--sched`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedPolicy {
    /// SCHED_BATCH: a woken runner thread does not preempt the thread
    /// running on its CPU. The runner's threads wake one another all the
    /// time (shard → librbd or gfapi thread → shard); with wakeup
    /// preemption each wake on a shared core is two context switches, with
    /// batch the waker finishes its burst first and the wakee then takes
    /// the whole burst. Ceph 4k QD32 on 2 cores: 43% less CPU per read and
    /// 37% more IOPS (tuning.md). Idle CPUs are unaffected, so QD1 is too.
    Batch,
    /// SCHED_OTHER, the kernel's default.
    Normal,
}

impl SchedPolicy {
    /// The `sched_setscheduler` policy number.
    pub(crate) fn raw(self) -> libc::c_int {
        match self {
            SchedPolicy::Batch => libc::SCHED_BATCH,
            SchedPolicy::Normal => libc::SCHED_OTHER,
        }
    }
}

/// Applies `policy` to the calling thread and every thread it starts from
/// now on. Call it first thing in `main`.
pub fn set_sched_policy(policy: SchedPolicy) -> std::io::Result<()> {
    set_policy(policy.raw())
}

/// `sched_setscheduler` for the calling thread, policy number `kind`.
pub(crate) fn set_policy(kind: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscall on the calling thread (pid 0) with a valid param.
    if unsafe { libc::sched_setscheduler(0, kind, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpinned_shards_float() {
        assert_eq!(shard_cpus(4, false, None), None);
        assert_eq!(shard_cpus(4, false, Some(&[0, 1])), None);
    }

    #[test]
    fn pinned_shards_get_distinct_cpus_while_cpus_last() {
        let online = CpuSet::online().unwrap().len();
        let cpus = shard_cpus(online, true, None).unwrap();
        let mut distinct = cpus.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), online, "{cpus:?}");
        // More shards than CPUs: round-robin, each CPU used.
        let more = shard_cpus(online * 2 + 1, true, None).unwrap();
        assert_eq!(more.len(), online * 2 + 1);
        assert_eq!(more[0], more[online]);
    }

    #[test]
    fn listed_cpus_are_taken_in_order_and_checked() {
        assert_eq!(shard_cpus(3, true, Some(&[5, 2])), Some(vec![5, 2, 5]));
        assert_eq!(shard_cpus(1, true, Some(&[5, 2])), Some(vec![5]));
        let usable = usable_cpus().unwrap();
        assert!(check_cpus(&usable).is_ok());
        let e = check_cpus(&[usable[0], 1023]).unwrap_err();
        assert!(e.contains("CPU 1023") && e.contains("cannot use"), "{e}");
    }

    #[test]
    fn batch_scheduling_is_inherited_by_new_threads() {
        std::thread::spawn(|| {
            set_sched_policy(SchedPolicy::Batch).unwrap();
            // SAFETY: plain syscall on the calling thread.
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) })
                .join()
                .unwrap();
            assert_eq!(child, libc::SCHED_BATCH);
            set_sched_policy(SchedPolicy::Normal).unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn confinement_is_inherited_by_new_threads() {
        // On a thread of its own, so the test harness thread keeps its CPUs.
        std::thread::spawn(|| {
            let first = usable_cpus().unwrap()[0];
            confine_current_thread(&[first]).unwrap();
            let child = std::thread::spawn(|| usable_cpus().unwrap())
                .join()
                .unwrap();
            assert_eq!(child, vec![first]);
        })
        .join()
        .unwrap();
    }
}
