//! `--colocate`: a lone reply to a client on this host is sent with the
//! shard SCHED_IDLE, so the woken client lands on the shard's CPU. What must
//! hold: the shard always comes back to its policy, `off` never lends, a
//! runner that may not come back from SCHED_IDLE never leaves its policy,
//! and a busy thread on the shard's CPU cannot starve a QD1 client (lending
//! backs off). Counted through the runner's own metrics.

mod common;
use common::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LENT: &str = "nbd_colocated_sends_total";
const BACKOFFS: &str = "nbd_colocation_backoffs_total";

/// A mem export, metrics on loopback.
const ARGS: [&str; 4] = ["--export", "mem:m,size=8M", "--metrics", "127.0.0.1:0"];

/// One shard.
fn runner(extra: &[&str]) -> Runner {
    let mut args = vec!["--threads", "1"];
    args.extend_from_slice(&ARGS);
    args.extend_from_slice(extra);
    Runner::start_with(&args)
}

/// `n` QD1 reads of 4 KiB from a raw client on loopback.
fn qd1_reads(r: &Runner, n: usize) {
    let mut s = negotiate(&r.addr, "m");
    for i in 0..n {
        read_at(&mut s, (i as u64 % 2048) * 4096, 4096).expect("read");
    }
}

/// Every thread is SCHED_BATCH once the shards have run again: the client
/// that a lent send woke runs first, on the shard's CPU, so it can see the
/// shard still SCHED_IDLE until the shard's `sendmsg` returns.
fn assert_every_thread_batch(r: &Runner) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let threads = r.threads();
        let Some(t) = threads.iter().find(|t| t.policy != 3) else {
            return;
        };
        assert!(
            Instant::now() < deadline,
            "{t:?} did not come back to SCHED_BATCH"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_local_qd1_client_is_lent_the_cpu_and_the_shard_comes_back_to_its_policy() {
    let r = runner(&[]);
    let metrics = r.metrics.clone().unwrap();
    qd1_reads(&r, 500);
    let lent = metric_value(&metrics, LENT);
    // Every lone reply is lent unless a slow send paused lending (a second
    // at first): on a box this busy, some are not.
    assert!(lent > 0, "no reply was lent to a loopback QD1 client");
    assert!(lent <= 500, "{lent} lent sends for 500 replies");
    assert_every_thread_batch(&r);
}

#[test]
fn colocate_off_never_lends() {
    let r = runner(&["--colocate", "off"]);
    qd1_reads(&r, 300);
    assert_eq!(metric_value(r.metrics.as_ref().unwrap(), LENT), 0);
    assert_every_thread_batch(&r);
}

/// The runner as root without CAP_SYS_NICE, with RLIMIT_NICE `nice_limit`
/// (the unit's `LimitNICE=+0` is 20); and its log.
fn runner_without_cap_sys_nice(dir: &tempfile::TempDir, nice_limit: u32) -> (Runner, PathBuf) {
    let log = dir.path().join(format!("runner-{nice_limit}.log"));
    let wrapper = dir.path().join(format!("nbd-runner-{nice_limit}"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec prlimit --nice={nice_limit}:{nice_limit} setpriv --inh-caps=-sys_nice --bounding-set=-sys_nice {} \"$@\"\n",
            env!("CARGO_BIN_EXE_nbd-runner")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let args = [&["--threads", "2"][..], &ARGS].concat();
    let r = Runner::start_program(path_str(&wrapper), &args, &log);
    (r, log)
}

#[test]
fn a_runner_that_may_not_come_back_from_sched_idle_never_lends() {
    // Root without CAP_SYS_NICE, and RLIMIT_NICE 0: SCHED_IDLE can be
    // entered but not left. The runner finds out on a probe thread, says so
    // once (not once per shard), and serves with its policy untouched.
    let dir = scratch();
    let (r, log) = runner_without_cap_sys_nice(&dir, 0);
    qd1_reads(&r, 200);
    assert_eq!(metric_value(r.metrics.as_ref().unwrap(), LENT), 0);
    assert_every_thread_batch(&r);
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("QD1 co-location off"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {text}");
    assert!(
        warnings[0].contains("cannot return from SCHED_IDLE"),
        "{}",
        warnings[0]
    );

    // What the systemd unit grants instead (LimitNICE=+0) is enough.
    // Raising RLIMIT_NICE takes CAP_SYS_RESOURCE, which some containers
    // (this project's CI machines among them) do not grant.
    if !std::process::Command::new("prlimit")
        .args(["--nice=20:20", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIP the LimitNICE=+0 half: cannot raise RLIMIT_NICE here");
        return;
    }
    let (r, log) = runner_without_cap_sys_nice(&dir, 20);
    qd1_reads(&r, 200);
    assert!(metric_value(r.metrics.as_ref().unwrap(), LENT) > 0);
    assert_every_thread_batch(&r);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("co-location off"), "{text}");
}

#[test]
fn a_busy_thread_on_the_shards_cpu_cannot_starve_a_qd1_client() {
    let r = runner(&[]);
    let metrics = r.metrics.clone().unwrap();
    let cpu: usize = r.shard_cpus().parse().expect("one pinned shard");
    let stop = Arc::new(AtomicBool::new(false));
    let hog = std::thread::spawn({
        let stop = stop.clone();
        move || {
            // SAFETY: cpu_set_t is plain data; the set is for this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
                    0
                );
            }
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        }
    });
    let started = Instant::now();
    qd1_reads(&r, 300);
    let took = started.elapsed();
    let backoffs = metric_value(&metrics, BACKOFFS);
    stop.store(true, Ordering::Relaxed);
    hog.join().unwrap();
    // Measured: 0.7-1.1 s for 300 reads either way, lent or `--colocate
    // off` (the busy thread takes its share of the CPU between them); a
    // starved lent send pauses lending for 1 s, then 2, 4...: 300 reads meet
    // a handful of starved sends at most, not one per read.
    assert!(
        took < Duration::from_secs(30),
        "300 QD1 reads beside a busy thread took {took:?}"
    );
    let lent = metric_value(&metrics, LENT);
    eprintln!(
        "beside a busy thread: {lent} lent sends, {backoffs} backoffs, 300 reads in {took:?}"
    );
    assert!(
        backoffs <= lent && backoffs < 10,
        "{backoffs} backoffs of {lent} lent sends in {took:?}"
    );
    assert_every_thread_batch(&r);
}
