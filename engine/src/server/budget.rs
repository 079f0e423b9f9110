//! Bounds on requests and bytes in flight, per connection and per shard.
//! A permit is held from the moment a request is accepted until its reply
//! has left the socket, so it also bounds queued reply data.
//!
//! Fairness: the last quarter of a shard's budget goes only to connections
//! with nothing in flight, so clients that stop reading (each holding its
//! full connection budget until the write timeout drops it) cannot starve
//! the others: every connection can always get one request through.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

pub struct Budget {
    max_requests: u32,
    max_bytes: u64,
    requests: Cell<u32>,
    bytes: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
}

impl Budget {
    pub fn new(max_requests: u32, max_bytes: u64) -> Rc<Self> {
        Rc::new(Budget {
            max_requests: max_requests.max(1),
            max_bytes: max_bytes.max(1),
            requests: Cell::new(0),
            bytes: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
        })
    }

    pub fn in_flight(&self) -> u32 {
        self.requests.get()
    }

    /// Fits if under both limits; an idle budget admits any one request, so an
    /// oversized one cannot wedge the connection.
    fn fits(&self, bytes: u64) -> bool {
        self.requests.get() == 0
            || (self.requests.get() < self.max_requests
                && self.bytes.get() + bytes <= self.max_bytes)
    }

    /// The shard's side: anything while under three quarters of both
    /// limits; past that, only a connection that has nothing in flight.
    fn admits(&self, bytes: u64, conn_idle: bool) -> bool {
        if !self.fits(bytes) {
            return false;
        }
        let (requests, total) = (self.requests.get() + 1, self.bytes.get() + bytes);
        conn_idle
            || self.requests.get() == 0
            || (requests <= self.max_requests - self.max_requests / 4
                && total <= self.max_bytes - self.max_bytes / 4)
    }

    fn take(&self, bytes: u64) {
        self.requests.set(self.requests.get() + 1);
        self.bytes.set(self.bytes.get() + bytes);
    }

    fn give(&self, bytes: u64) {
        self.requests.set(self.requests.get() - 1);
        self.bytes.set(self.bytes.get() - bytes);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Waits until nothing is in flight.
    pub async fn drained(&self) {
        poll_fn(|cx| {
            if self.requests.get() == 0 {
                Poll::Ready(())
            } else {
                self.waiters.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// One request's share of its connection's and shard's budgets.
pub struct Permit {
    conn: Rc<Budget>,
    shard: Rc<Budget>,
    bytes: u64,
}

impl Permit {
    pub async fn acquire(conn: &Rc<Budget>, shard: &Rc<Budget>, bytes: u64) -> Permit {
        poll_fn(|cx| {
            if conn.fits(bytes) && shard.admits(bytes, conn.requests.get() == 0) {
                return Poll::Ready(());
            }
            let waker = cx.waker().clone();
            conn.waiters.borrow_mut().push(waker.clone());
            shard.waiters.borrow_mut().push(waker);
            Poll::Pending
        })
        .await;
        conn.take(bytes);
        shard.take(bytes);
        crate::backend::lone::started();
        Permit {
            conn: conn.clone(),
            shard: shard.clone(),
            bytes,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        crate::backend::lone::finished();
        self.conn.give(self.bytes);
        self.shard.give(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn blocks_at_limit_and_wakes_on_release() {
        let conn = Budget::new(2, 1 << 20);
        let shard = Budget::new(100, 1 << 30);
        block_on(async {
            let a = Permit::acquire(&conn, &shard, 10).await;
            let _b = Permit::acquire(&conn, &shard, 10).await;
            let mut third = Box::pin(Permit::acquire(&conn, &shard, 10));
            assert!(poll_once(&mut third).await.is_none(), "third fits");
            drop(a);
            let _third = poll_once(&mut third)
                .await
                .expect("released slot not reused");
            assert_eq!(conn.in_flight(), 2);
            assert_eq!(shard.in_flight(), 2);
        });
    }

    #[test]
    fn the_last_quarter_of_a_shard_is_for_connections_with_nothing_in_flight() {
        let shard = Budget::new(8, 800);
        let hog = Budget::new(100, 1 << 20);
        let other = Budget::new(100, 1 << 20);
        block_on(async {
            let mut held = Vec::new();
            for _ in 0..6 {
                held.push(Permit::acquire(&hog, &shard, 100).await);
            }
            // The hog is at three quarters: its next request waits...
            let mut more = Box::pin(Permit::acquire(&hog, &shard, 100));
            assert!(
                poll_once(&mut more).await.is_none(),
                "the hog took the reserve"
            );
            // ...while a connection with nothing in flight still gets one,
            let first = Permit::acquire(&other, &shard, 100).await;
            // but not a second one from the reserve.
            let mut second = Box::pin(Permit::acquire(&other, &shard, 100));
            assert!(poll_once(&mut second).await.is_none());
            drop(first);
            assert!(poll_once(&mut second).await.is_some());
            // Bytes count the same way as requests.
            let bytes = Budget::new(100, 400);
            let a = Budget::new(100, 1 << 20);
            let _x = Permit::acquire(&a, &bytes, 300).await;
            assert!(poll_once(&mut Box::pin(Permit::acquire(&a, &bytes, 50)))
                .await
                .is_none());
            drop(held);
        });
    }

    #[test]
    fn byte_limit_and_oversized_request_on_idle_budget() {
        let conn = Budget::new(100, 100);
        let shard = Budget::new(100, 1 << 30);
        block_on(async {
            let big = Permit::acquire(&conn, &shard, 1000).await;
            let mut next = Box::pin(Permit::acquire(&conn, &shard, 1));
            assert!(poll_once(&mut next).await.is_none());
            drop(big);
            assert!(poll_once(&mut next).await.is_some());
        });
    }
}
