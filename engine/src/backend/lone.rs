//! Whether a request is the only one its shard has in flight: the server
//! counts each request from its start until its reply has left (its budget
//! permit), and a backend that would hand the request to another thread
//! may instead do it right here when nothing else is waiting on the shard.
//! One request at a time (QD1) is where the hand-off costs most: two
//! cross-thread wakeups for one IO.

use std::cell::Cell;

thread_local! {
    static IN_FLIGHT: Cell<u32> = const { Cell::new(0) };
}

pub fn started() {
    IN_FLIGHT.with(|n| n.set(n.get() + 1));
}

pub fn finished() {
    IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
}

/// True when the calling request is the shard's only one.
pub fn alone() -> bool {
    IN_FLIGHT.with(Cell::get) <= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_thread() {
        assert!(alone());
        started();
        assert!(alone());
        started();
        assert!(!alone());
        std::thread::spawn(|| assert!(alone())).join().unwrap();
        finished();
        finished();
        finished(); // never below zero
        assert!(alone());
    }
}
