//! The vendored glommio's executor loop (vendor/glommio/PATCHED.md): woken
//! tasks make progress when a preemption is pending at every pass. Upstream
//! parked with the task still queued when a preemption came before the first
//! queue ran; the first fix (return and poll at once) livelocked instead when
//! one was always pending. Each pass now runs at least one task.

use glommio::channels::local_channel;
use glommio::LocalExecutorBuilder;
use std::time::Duration;

#[test]
fn woken_tasks_make_progress_when_a_preemption_is_pending_at_every_pass() {
    // A 1 µs preemption timer fires right after each pass arms it: it is
    // often already pending when the executor next looks for tasks.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = LocalExecutorBuilder::default()
            .preempt_timer(Duration::from_micros(1))
            .spawn(|| async {
                let (ping_tx, ping_rx) = local_channel::new_bounded(1);
                let (pong_tx, pong_rx) = local_channel::new_bounded(1);
                let echo = glommio::spawn_local(async move {
                    while let Some(n) = ping_rx.recv().await {
                        if pong_tx.send(n).await.is_err() {
                            break;
                        }
                    }
                });
                for i in 0..50_000u32 {
                    ping_tx.send(i).await.unwrap();
                    assert_eq!(pong_rx.recv().await, Some(i));
                }
                drop(ping_tx);
                echo.await;
            })
            .unwrap()
            .join();
        let _ = done_tx.send(result.is_ok());
    });
    let finished = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the executor stopped running woken tasks (parked or livelocked)");
    assert!(finished, "the executor thread panicked");
}

/// Runs `f` on its own thread; fails if it does not finish within `limit`.
fn within(limit: Duration, what: &str, f: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: a wakeup was lost (or the thread panicked)"));
}

#[test]
fn remote_wakes_of_a_sleeping_executor_are_never_lost() {
    // The sleeper publishes "notify me" and the waker its event, each then
    // checking the other's store across a SeqCst fence (vendor/glommio
    // PATCHED.md; upstream used a membarrier syscall per sleep). Every
    // message here lands on an executor that is asleep or about to be: a
    // wake path that forgets to notify hangs the ping-pong. The fences
    // themselves are the store-buffering pattern's textbook fix; with both
    // removed this still passed on x86 (a reordering that rare needs a
    // model checker, not a test), so it is a liveness check of the paths.
    within(Duration::from_secs(120), "shared-channel ping-pong", || {
        use glommio::channels::shared_channel;
        let (ping_tx, ping_rx) = shared_channel::new_bounded::<u32>(1);
        let (pong_tx, pong_rx) = shared_channel::new_bounded::<u32>(1);
        let echo = LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (rx, tx) = (ping_rx.connect().await, pong_tx.connect().await);
                while let Some(n) = rx.recv().await {
                    if tx.send(n).await.is_err() {
                        break;
                    }
                }
            })
            .unwrap();
        LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (tx, rx) = (ping_tx.connect().await, pong_rx.connect().await);
                for i in 0..20_000u32 {
                    tx.send(i).await.unwrap();
                    assert_eq!(rx.recv().await, Some(i));
                }
            })
            .unwrap()
            .join()
            .unwrap();
        echo.join().unwrap();
    });
    within(
        Duration::from_secs(120),
        "blocking-pool round trips",
        || {
            LocalExecutorBuilder::default()
                .spawn(|| async {
                    for i in 0..20_000u32 {
                        let n = glommio::executor().spawn_blocking(move || i).await;
                        assert_eq!(n, i);
                    }
                })
                .unwrap()
                .join()
                .unwrap();
        },
    );
}
