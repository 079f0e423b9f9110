//! QD1 co-location: the shard lends its CPU to a local client while it
//! sends that client's reply.
//!
//! A client on this host that waits for each reply (QD1) sleeps until our
//! `sendmsg` wakes it. The scheduler then places it on an idle CPU rather
//! than on the shard's busy one, so each request costs two cross-CPU
//! wakeups; on a VM each is an IPI to a halted vCPU, most of the request's
//! time. While a thread is SCHED_IDLE its CPU counts as idle to that
//! placement (`select_idle_sibling` takes a CPU that runs only SCHED_IDLE
//! tasks), so the client is woken onto the shard's CPU, runs there at once
//! and sends its next request, and the two take turns on one core.
//! Measured on the 2-vCPU box, mem 4k randread QD1: tuning.md, "QD1:
//! co-location".
//!
//! That keeps a client on the shard's CPU once it is there; one that the
//! scheduler has settled on another idle CPU stays there (its wakeups go
//! to its previous CPU while that one is idle). So a shard serving only
//! lone requests also follows the client: every [`FOLLOW_EVERY`] lent
//! sends it reads the CPU the client last sent from (`SO_INCOMING_CPU`)
//! and, when that is another of the runner's CPUs, moves there; it goes
//! back to its own CPU as soon as a request has company or lending backs
//! off.
//!
//! SCHED_IDLE yields to any other thread, so it is held only around the
//! send, only for a request that is its shard's only one in flight, only for
//! peers on this host. A send that took longer than [`SLOW`] means something
//! else wanted the CPU: lending stops for a backoff that doubles each time.

use super::placement::{set_policy, SchedPolicy};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A lent send that took longer than this was starved by other work. A
/// lent send normally lasts while the client handles its reply and sends
/// the next request (8-35 µs measured), and a timer tick or a kernel thread
/// can stretch one to a millisecond or two; a thread that is SCHED_IDLE
/// beside a busy one waits far longer (it gets a 3/1024 share).
pub const SLOW: Duration = Duration::from_millis(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(64);
/// After this long without a slow send, the backoff starts over.
const FORGET: Duration = Duration::from_secs(128);

/// Lent sends between two looks at where the client runs.
pub const FOLLOW_EVERY: u32 = 64;

/// Where a pinned shard runs while it follows its client: its own CPU, or
/// another of the runner's CPUs. Pure decisions; the caller moves.
#[derive(Debug)]
pub struct Follow {
    home: usize,
    allowed: Vec<usize>,
    away: Option<usize>,
}

impl Follow {
    pub fn new(home: usize, allowed: Vec<usize>) -> Self {
        Follow {
            home,
            allowed,
            away: None,
        }
    }

    /// The client last sent from `client`: the CPU to move to, if any.
    pub fn client_on(&mut self, client: usize) -> Option<usize> {
        let here = self.away.unwrap_or(self.home);
        if client == here || !self.allowed.contains(&client) {
            return None;
        }
        self.away = (client != self.home).then_some(client);
        Some(client)
    }

    /// A request with company, or a backoff: back home, if away.
    pub fn go_home(&mut self) -> Option<usize> {
        self.away.take().map(|_| self.home)
    }
}

/// When lending is allowed, and how long it stops after a slow send.
#[derive(Debug)]
pub struct Backoff {
    off_until: Option<Instant>,
    next: Duration,
    last_slow: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            off_until: None,
            next: FIRST_BACKOFF,
            last_slow: None,
        }
    }
}

impl Backoff {
    pub fn allowed(&self, now: Instant) -> bool {
        self.off_until.is_none_or(|t| now >= t)
    }

    /// Records a lent send that took `took`; true when it was slow.
    pub fn record(&mut self, now: Instant, took: Duration) -> bool {
        if took <= SLOW {
            return false;
        }
        if self
            .last_slow
            .is_some_and(|t| now.duration_since(t) > FORGET)
        {
            self.next = FIRST_BACKOFF;
        }
        self.off_until = Some(now + self.next);
        self.last_slow = Some(now);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        true
    }
}

/// Sends that lent the CPU, and those of them that were slow: the metrics
/// `nbd_colocated_sends` and `nbd_colocation_backoffs`.
static LENT: AtomicU64 = AtomicU64::new(0);
static SLOW_SENDS: AtomicU64 = AtomicU64::new(0);

/// (lent sends, slow ones that paused lending) since the runner started.
pub fn counts() -> (u64, u64) {
    (
        LENT.load(Ordering::Relaxed),
        SLOW_SENDS.load(Ordering::Relaxed),
    )
}

struct Lender {
    /// The policy the shard returns to after a lent send.
    restore: SchedPolicy,
    backoff: Backoff,
    /// Pinned shards only: floating ones follow by themselves.
    follow: Option<Follow>,
    sends: u32,
}

impl Lender {
    fn move_to(&mut self, cpu: Option<usize>) {
        let Some(cpu) = cpu else { return };
        if let Err(e) = super::placement::confine_current_thread(&[cpu]) {
            tracing::debug!(cpu, "cannot move the shard: {e}; not following clients");
            self.follow = None;
        }
    }
}

thread_local! {
    static LENDER: RefCell<Option<Lender>> = const { RefCell::new(None) };
    /// A shard that could not get back from SCHED_IDLE (the right to was
    /// taken away while it ran): lending is off, and every send retries.
    static STUCK: Cell<Option<SchedPolicy>> = const { Cell::new(None) };
}

/// Whether this process may go SCHED_IDLE and come back: coming back needs
/// CAP_SYS_NICE or an RLIMIT_NICE that allows nice 0, so it is tried once on
/// a throwaway thread, never on a shard.
fn can_return_from_idle(restore: SchedPolicy) -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            std::thread::spawn(move || {
                set_policy(libc::SCHED_IDLE).map_err(|e| format!("cannot go SCHED_IDLE: {e}"))?;
                set_policy(restore.raw()).map_err(|e| {
                    format!(
                        "cannot return from SCHED_IDLE (needs CAP_SYS_NICE or LimitNICE=+0): {e}"
                    )
                })
            })
            .join()
            .unwrap_or_else(|_| Err("the probe thread panicked".to_owned()))
        })
        .clone()
}

/// Turns lending on for the calling shard, returning to `restore` after
/// each lent send, and following clients over the runner's CPUs when
/// `follow` says where the shard is pinned; Err (lending stays off) when
/// the process may not.
pub fn enable(restore: SchedPolicy, follow: Option<Follow>) -> Result<(), String> {
    can_return_from_idle(restore)?;
    LENDER.with(|l| {
        *l.borrow_mut() = Some(Lender {
            restore,
            backoff: Backoff::default(),
            follow,
            sends: 0,
        })
    });
    Ok(())
}

/// A send to a local peer with other requests in flight on the shard: a
/// shard that followed a client goes home.
fn with_company() {
    LENDER.with(|l| {
        if let Some(lender) = l.borrow_mut().as_mut() {
            let home = lender.follow.as_mut().and_then(Follow::go_home);
            lender.move_to(home);
        }
    });
}

/// Runs `send` with the shard's CPU lent when `local` and the request is
/// alone on its shard (and lending is on and not backing off);
/// `client_cpu` says where the client last ran.
pub fn around_send<R>(
    local: bool,
    client_cpu: impl FnOnce() -> Option<usize>,
    send: impl FnOnce() -> R,
) -> R {
    if let Some(policy) = STUCK.get() {
        if set_policy(policy.raw()).is_ok() {
            STUCK.set(None);
            tracing::info!("the shard is back to its scheduling policy");
        }
    }
    if !local {
        return send();
    }
    if !crate::backend::lone::alone() {
        with_company();
        return send();
    }
    let lent = LENDER.with(|l| {
        let mut l = l.borrow_mut();
        let lender = l.as_mut()?;
        let start = Instant::now();
        if !lender.backoff.allowed(start) {
            return None;
        }
        lender.sends = lender.sends.wrapping_add(1);
        if lender.sends % FOLLOW_EVERY == 0 {
            let to = lender
                .follow
                .as_mut()
                .zip(client_cpu())
                .and_then(|(f, cpu)| f.client_on(cpu));
            lender.move_to(to);
        }
        set_policy(libc::SCHED_IDLE)
            .is_ok()
            .then_some((start, lender.restore))
    });
    let Some((start, restore)) = lent else {
        return send();
    };
    let r = send();
    if let Err(e) = set_policy(restore.raw()) {
        // The probe said this works, so the right was taken away since:
        // lend no more, and retry the way back on every send until it works.
        tracing::warn!(
            "cannot return from SCHED_IDLE after a send ({e}); co-location off, retrying on each send"
        );
        LENDER.with(|l| *l.borrow_mut() = None);
        STUCK.set(Some(restore));
        return r;
    }
    let now = Instant::now();
    LENT.fetch_add(1, Ordering::Relaxed);
    LENDER.with(|l| {
        if let Some(lender) = l.borrow_mut().as_mut() {
            if lender.backoff.record(now, now - start) {
                SLOW_SENDS.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(took = ?(now - start), "a co-located send was starved; backing off");
                let home = lender.follow.as_mut().and_then(Follow::go_home);
                lender.move_to(home);
            }
        }
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_send_stops_lending_for_a_doubling_backoff() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.allowed(t0));
        assert!(!b.record(t0, Duration::from_micros(20)));
        assert!(b.allowed(t0));
        assert!(b.record(t0, SLOW + Duration::from_micros(1)));
        assert!(!b.allowed(t0 + Duration::from_millis(999)));
        assert!(b.allowed(t0 + FIRST_BACKOFF));
        let t1 = t0 + FIRST_BACKOFF;
        assert!(b.record(t1, SLOW * 2));
        assert!(!b.allowed(t1 + FIRST_BACKOFF));
        assert!(b.allowed(t1 + 2 * FIRST_BACKOFF));
    }

    #[test]
    fn the_backoff_is_capped_and_forgotten_after_a_quiet_spell() {
        let mut now = Instant::now();
        let mut b = Backoff::default();
        for _ in 0..20 {
            b.record(now, Duration::from_secs(1));
            now += MAX_BACKOFF;
        }
        assert_eq!(b.next, MAX_BACKOFF);
        now += FORGET + Duration::from_secs(1);
        b.record(now, Duration::from_secs(1));
        assert!(b.allowed(now + FIRST_BACKOFF));
    }

    #[test]
    fn a_shard_follows_its_client_over_the_runners_cpus_and_goes_home() {
        let mut f = Follow::new(1, vec![0, 1]);
        assert_eq!(f.client_on(1), None, "already together");
        assert_eq!(f.go_home(), None, "already home");
        assert_eq!(f.client_on(0), Some(0));
        assert_eq!(f.client_on(0), None, "already there");
        assert_eq!(f.client_on(7), None, "not one of the runner's CPUs");
        assert_eq!(f.client_on(1), Some(1), "the client came back");
        assert_eq!(f.go_home(), None, "that is home");
        assert_eq!(f.client_on(0), Some(0));
        assert_eq!(f.go_home(), Some(1));
        assert_eq!(f.go_home(), None);
    }

    #[test]
    fn a_stuck_shard_retries_its_policy_on_every_send_until_it_is_back() {
        std::thread::spawn(|| {
            set_policy(libc::SCHED_IDLE).unwrap();
            STUCK.set(Some(SchedPolicy::Batch));
            let during = around_send(false, || None, || unsafe { libc::sched_getscheduler(0) });
            if STUCK.get().is_some() {
                return; // unprivileged test run: the way back stays shut
            }
            assert_eq!(during, libc::SCHED_BATCH, "restored before the send");
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_BATCH);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_shard_thread_comes_back_to_its_policy_after_a_lent_send() {
        std::thread::spawn(|| {
            set_policy(libc::SCHED_BATCH).unwrap();
            if enable(SchedPolicy::Batch, None).is_err() {
                return; // unprivileged test run: nothing to check
            }
            crate::backend::lone::started();
            let during = around_send(true, || None, || unsafe { libc::sched_getscheduler(0) });
            crate::backend::lone::finished();
            assert_eq!(during, libc::SCHED_IDLE);
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_BATCH);
            // Not local, or not alone: never lent.
            assert_eq!(
                around_send(false, || None, || unsafe { libc::sched_getscheduler(0) }),
                libc::SCHED_BATCH
            );
            for _ in 0..2 {
                crate::backend::lone::started();
            }
            assert_eq!(
                around_send(true, || None, || unsafe { libc::sched_getscheduler(0) }),
                libc::SCHED_BATCH
            );
        })
        .join()
        .unwrap();
    }
}
