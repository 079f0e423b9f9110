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
