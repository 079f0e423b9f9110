//! Completions that arrive on foreign threads (libgfapi and librbd call
//! back on their own threads) handed back to the shard that issued the IO.
//!
//! A glommio waker must be woken on its own executor, so a foreign thread
//! never wakes a task itself: [`Completer::complete`] stores the result,
//! queues the slot on its shard, and pokes the shard through a socketpair.
//! Each shard runs one pump task that reads the socketpair through
//! io_uring and wakes the queued tasks on the shard's thread. Pokes are
//! coalesced: one byte per burst of completions, not one per IO.
//!
//! A [`Completion`] dropped before its result arrives (a cancelled request)
//! is harmless: the slot is shared, so the C side's later completion writes
//! into memory that is still alive. Buffers the C side writes into must be
//! owned the same way: put them in the completion's value, not in the
//! future's stack.

use futures_lite::AsyncReadExt;
use std::cell::RefCell;
use std::future::Future;
use std::os::unix::io::{FromRawFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The shard side of the doorbell.
struct Doorbell {
    /// Write end, used from any thread.
    fd: RawFd,
    /// A poke is in flight; later completions need not poke again.
    armed: AtomicBool,
    queue: Mutex<Vec<Arc<dyn Wake>>>,
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // SAFETY: we own this descriptor.
        unsafe { libc::close(self.fd) };
    }
}

trait Wake: Send + Sync {
    fn wake_on_shard(&self);
}

thread_local! {
    static DOORBELL: RefCell<Option<Arc<Doorbell>>> = const { RefCell::new(None) };
}

/// This shard's doorbell, starting its pump task on first use.
fn doorbell() -> std::io::Result<Arc<Doorbell>> {
    if let Some(d) = DOORBELL.with(|d| d.borrow().clone()) {
        return Ok(d);
    }
    let (rx, tx) = std::os::unix::net::UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    let bell = Arc::new(Doorbell {
        fd: tx.into_raw_fd(),
        armed: AtomicBool::new(false),
        queue: Mutex::new(Vec::new()),
    });
    // SAFETY: rx is a connected unix socket we own; glommio takes it over.
    let rx = unsafe { glommio::net::UnixStream::from_raw_fd(rx.into_raw_fd()) };
    glommio::spawn_local(pump(rx, Arc::downgrade(&bell))).detach();
    DOORBELL.with(|d| *d.borrow_mut() = Some(bell.clone()));
    Ok(bell)
}

async fn pump(mut rx: glommio::net::UnixStream, bell: std::sync::Weak<Doorbell>) {
    let mut buf = [0u8; 64];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some(bell) = bell.upgrade() else { return };
        // Disarm before draining: a completion queued after the drain pokes again.
        bell.armed.store(false, Ordering::SeqCst);
        let ready = std::mem::take(&mut *bell.queue.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in ready {
            slot.wake_on_shard();
        }
    }
}

struct Slot<T> {
    value: Mutex<Option<T>>,
    waker: Mutex<Option<Waker>>,
}

impl<T: Send> Wake for Slot<T> {
    fn wake_on_shard(&self) {
        if let Some(w) = self.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            w.wake();
        }
    }
}

/// The awaiting side; lives on the shard.
pub struct Completion<T> {
    slot: Arc<Slot<T>>,
}

/// The completing side; `Send`, for the C library's thread.
pub struct Completer<T> {
    slot: Arc<Slot<T>>,
    bell: Arc<Doorbell>,
}

/// A pair bound to the calling shard. Must be called on a glommio executor.
pub fn completion<T: Send + 'static>() -> std::io::Result<(Completion<T>, Completer<T>)> {
    let slot = Arc::new(Slot {
        value: Mutex::new(None),
        waker: Mutex::new(None),
    });
    Ok((
        Completion { slot: slot.clone() },
        Completer {
            slot,
            bell: doorbell()?,
        },
    ))
}

impl<T: Send + 'static> Completer<T> {
    /// Delivers the result; callable from any thread, at most once.
    pub fn complete(self, value: T) {
        *self.slot.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        self.bell
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.slot.clone());
        if !self.bell.armed.swap(true, Ordering::SeqCst) {
            let b = [1u8];
            // SAFETY: writing one byte from a live buffer to our own socket.
            // EAGAIN means the socket is full of pokes already: nothing lost.
            unsafe {
                libc::send(
                    self.bell.fd,
                    b.as_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
}

impl<T> Future for Completion<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // Register first, then look: a completion in between still wakes us.
        *self.slot.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        match self
            .slot
            .value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }
}

/// A request handed to a C library that calls back on its own thread:
/// the [`Completer`] and everything the library may still touch (buffers,
/// handles) are boxed together and passed as the callback's argument, so
/// they live until the callback, even when the awaiting future is gone.
/// gfapi and librbd both use it.
pub struct CallbackContext<K, T> {
    raw: *mut Boxed<K, T>,
    done: Completion<T>,
}

struct Boxed<K, T> {
    completer: Completer<T>,
    keep: K,
}

impl<K: Send + 'static, T: Send + 'static> CallbackContext<K, T> {
    /// Boxes `keep` with a new completer; on failure `keep` comes back.
    pub fn new(keep: K) -> Result<Self, (std::io::Error, K)> {
        let (done, completer) = match completion::<T>() {
            Ok(pair) => pair,
            Err(e) => return Err((e, keep)),
        };
        let raw = Box::into_raw(Box::new(Boxed { completer, keep }));
        Ok(CallbackContext { raw, done })
    }

    /// The argument to give the C call.
    pub fn arg(&self) -> *mut std::ffi::c_void {
        self.raw.cast()
    }

    /// What the context keeps, e.g. to point the C call at a buffer
    /// (a `Vec`'s heap block does not move with the box).
    pub fn keep_mut(&mut self) -> &mut K {
        // SAFETY: nothing else touches the box before the call is made.
        unsafe { &mut (*self.raw).keep }
    }

    /// The call was refused, so no callback will come: the context is
    /// ours again.
    pub fn refused(self) -> K {
        // SAFETY: the library never took the pointer.
        unsafe { Box::from_raw(self.raw) }.keep
    }

    /// The call was made: waits on the shard for its callback.
    pub async fn submitted(self) -> T {
        self.done.await
    }

    /// In the callback: takes the context back and completes the request
    /// with `finish(kept)`.
    ///
    /// # Safety
    /// `arg` is [`arg`](Self::arg) of a context whose call was submitted,
    /// and the library calls back exactly once.
    pub unsafe fn complete(arg: *mut std::ffi::c_void, finish: impl FnOnce(K) -> T) {
        // SAFETY: per the contract, this is the box `new` leaked, once.
        let b = unsafe { Box::from_raw(arg.cast::<Boxed<K, T>>()) };
        let Boxed { completer, keep } = *b;
        completer.complete(finish(keep));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;
    use std::time::Duration;

    #[test]
    fn foreign_threads_complete_onto_the_shard() {
        LocalExecutorBuilder::default()
            .spawn(|| async {
                let shard = std::thread::current().id();
                let mut waiting = Vec::new();
                let mut threads = Vec::new();
                for i in 0..200u64 {
                    let (done, completer) = completion::<(u64, std::thread::ThreadId)>().unwrap();
                    threads.push(std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_micros(i % 7 * 100));
                        completer.complete((i, std::thread::current().id()));
                    }));
                    waiting.push(glommio::spawn_local(async move {
                        let (v, from) = done.await;
                        // Woken and resumed on the shard, not the completing thread.
                        assert_eq!(std::thread::current().id(), shard);
                        assert_ne!(from, shard);
                        v
                    }));
                }
                let mut sum = 0;
                for t in waiting {
                    sum += t.await;
                }
                for t in threads {
                    t.join().unwrap();
                }
                assert_eq!(sum, (0..200).sum::<u64>());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_dropped_completion_is_harmless() {
        LocalExecutorBuilder::default()
            .spawn(|| async {
                let (done, completer) = completion::<Vec<u8>>().unwrap();
                drop(done);
                std::thread::spawn(move || completer.complete(vec![1; 4096]))
                    .join()
                    .unwrap();
                // The shard keeps going and later completions still arrive.
                let (done, completer) = completion::<u32>().unwrap();
                std::thread::spawn(move || completer.complete(7));
                assert_eq!(done.await, 7);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A stand-in C library: it writes into the kept buffer on its own
    /// thread and calls back with the pointer it was given.
    fn fake_c_call(arg: usize, fill: u8) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let arg = arg as *mut std::ffi::c_void;
            // SAFETY: the test submits each context once.
            unsafe {
                CallbackContext::<Vec<u8>, Vec<u8>>::complete(arg, |mut buf| {
                    buf.fill(fill);
                    buf
                })
            };
        })
    }

    #[test]
    fn callback_contexts_keep_buffers_alive_and_come_back_when_refused() {
        LocalExecutorBuilder::default()
            .spawn(|| async {
                let mut ctx = CallbackContext::<Vec<u8>, Vec<u8>>::new(vec![0; 4096]).unwrap();
                assert_eq!(ctx.keep_mut().len(), 4096);
                let t = fake_c_call(ctx.arg() as usize, 7);
                assert_eq!(ctx.submitted().await, vec![7; 4096]);
                t.join().unwrap();
                // A cancelled request: the future goes, the buffer stays
                // the library's until its callback.
                let ctx = CallbackContext::<Vec<u8>, Vec<u8>>::new(vec![0; 1 << 20]).unwrap();
                let t = fake_c_call(ctx.arg() as usize, 9);
                drop(ctx.submitted());
                t.join().unwrap();
                // Refused at submission: the kept value comes back.
                let ctx = CallbackContext::<Vec<u8>, Vec<u8>>::new(vec![5; 8]).unwrap();
                assert_eq!(ctx.refused(), vec![5; 8]);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
