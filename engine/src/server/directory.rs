//! What the control plane knows of the shards: the thread and CPUs each one
//! runs on, and the shards a map asked for its connections to land on.
//!
//! Shard 0 places a connection when it accepts it, before the handshake
//! names the export, so a map that wants its connections on given shards
//! says so first, naming each connection by the peer address the runner
//! will see (its bound TCP source, or its unix peer's pid in connect
//! order). The acceptor takes the matching reservation; a connection with
//! none is placed on the least-loaded shard as usual.

use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Reservations in all; a map needs one per connection.
pub const MAX_RESERVED: usize = 4096;
/// A reservation whose connection has not arrived by then is dropped.
pub const RESERVATION_TTL: Duration = Duration::from_secs(30);

/// A connection as the acceptor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKey {
    Tcp(SocketAddr),
    /// A unix-socket peer's process (SO_PEERCRED).
    Unix {
        pid: i32,
    },
}

/// A shard's thread and the CPUs it may run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardThread {
    pub tid: i32,
    pub cpus: Vec<usize>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReserveError {
    #[error("shard {shard} does not exist: the runner has {shards} (0-{})", shards - 1)]
    NoSuchShard { shard: usize, shards: usize },
    #[error("too many pending shard placements ({MAX_RESERVED}); retry when the maps in progress finish")]
    Full,
}

#[derive(Debug)]
struct Reservation {
    owner: String,
    peer: PeerKey,
    shard: usize,
    until: Instant,
}

#[derive(Debug)]
pub struct ShardDirectory {
    threads: RwLock<Vec<Option<ShardThread>>>,
    reserved: Mutex<Vec<Reservation>>,
}

impl ShardDirectory {
    pub fn new(shards: usize) -> Self {
        ShardDirectory {
            threads: RwLock::new(vec![None; shards.max(1)]),
            reserved: Mutex::new(Vec::new()),
        }
    }

    pub fn shards(&self) -> usize {
        self.threads.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Called by each shard on its own thread once it is set up.
    pub fn shard_started(&self, index: usize, thread: ShardThread) {
        let mut t = self.threads.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = t.get_mut(index) {
            *slot = Some(thread);
        }
    }

    /// Shard `index`'s thread, once it has started.
    pub fn thread(&self, index: usize) -> Option<ShardThread> {
        let t = self.threads.read().unwrap_or_else(|e| e.into_inner());
        t.get(index).cloned().flatten()
    }

    /// Every one of `shards` is a shard the runner has.
    pub fn check(&self, shards: impl IntoIterator<Item = usize>) -> Result<(), ReserveError> {
        let count = self.shards();
        match shards.into_iter().find(|&s| s >= count) {
            Some(shard) => Err(ReserveError::NoSuchShard {
                shard,
                shards: count,
            }),
            None => Ok(()),
        }
    }

    /// Replaces `owner`'s reservations with `wanted` (peer, shard) pairs.
    pub fn reserve(
        &self,
        owner: &str,
        wanted: &[(PeerKey, usize)],
        now: Instant,
    ) -> Result<(), ReserveError> {
        self.check(wanted.iter().map(|&(_, s)| s))?;
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|x| x.owner != owner && x.until > now);
        if r.len() + wanted.len() > MAX_RESERVED {
            return Err(ReserveError::Full);
        }
        r.extend(wanted.iter().map(|&(peer, shard)| Reservation {
            owner: owner.to_owned(),
            peer,
            shard,
            until: now + RESERVATION_TTL,
        }));
        Ok(())
    }

    /// The shard reserved for `peer`, taken: the oldest unexpired one, so
    /// one process's unix connections follow their connect order.
    pub fn take(&self, peer: &PeerKey, now: Instant) -> Option<usize> {
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_empty() {
            return None;
        }
        r.retain(|x| x.until > now);
        let i = r.iter().position(|x| x.peer == *peer)?;
        Some(r.remove(i).shard)
    }

    /// Drops what `owner` reserved and its connections did not take.
    pub fn release(&self, owner: &str) -> usize {
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        let before = r.len();
        r.retain(|x| x.owner != owner);
        before - r.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(port: u16) -> PeerKey {
        PeerKey::Tcp(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_reserved_peer_gets_its_shard_once() {
        let d = ShardDirectory::new(2);
        let now = Instant::now();
        d.reserve("a", &[(tcp(1000), 1), (tcp(1001), 0)], now)
            .unwrap();
        assert_eq!(d.take(&tcp(1001), now), Some(0));
        assert_eq!(d.take(&tcp(1001), now), None);
        assert_eq!(d.take(&tcp(9), now), None);
        assert_eq!(d.take(&tcp(1000), now), Some(1));
    }

    #[test]
    fn unix_peers_of_one_process_follow_the_order_reserved() {
        let d = ShardDirectory::new(3);
        let now = Instant::now();
        let me = PeerKey::Unix { pid: 42 };
        d.reserve("a", &[(me, 2), (me, 0), (me, 1)], now).unwrap();
        let got: Vec<_> = (0..4).map(|_| d.take(&me, now)).collect();
        assert_eq!(got, [Some(2), Some(0), Some(1), None]);
        assert_eq!(d.take(&PeerKey::Unix { pid: 43 }, now), None);
    }

    #[test]
    fn hostile_reservations_are_bounded_and_checked() {
        let d = ShardDirectory::new(2);
        let now = Instant::now();
        assert_eq!(
            d.reserve("a", &[(tcp(1), 2)], now),
            Err(ReserveError::NoSuchShard {
                shard: 2,
                shards: 2
            })
        );
        assert_eq!(
            d.reserve("a", &[(tcp(1), usize::MAX)], now)
                .unwrap_err()
                .to_string(),
            format!(
                "shard {} does not exist: the runner has 2 (0-1)",
                usize::MAX
            )
        );
        let many: Vec<_> = (0..MAX_RESERVED).map(|i| (tcp(i as u16), 0)).collect();
        d.reserve("a", &many, now).unwrap();
        assert_eq!(d.reserve("b", &[(tcp(1), 0)], now), Err(ReserveError::Full));
        // The same owner again replaces its own.
        d.reserve("a", &many[..10], now).unwrap();
        d.reserve("b", &[(tcp(1), 1)], now).unwrap();
        assert_eq!(d.release("a"), 10);
        assert_eq!(d.take(&tcp(1), now), Some(1));
    }

    #[test]
    fn reservations_expire() {
        let d = ShardDirectory::new(2);
        let now = Instant::now();
        d.reserve("a", &[(tcp(5), 1)], now).unwrap();
        let later = now + RESERVATION_TTL + Duration::from_millis(1);
        assert_eq!(d.take(&tcp(5), later), None);
        // Expired ones no longer count against the bound.
        let many: Vec<_> = (0..MAX_RESERVED).map(|i| (tcp(i as u16), 0)).collect();
        d.reserve("b", &many, later).unwrap();
    }

    #[test]
    fn shard_threads_are_recorded_by_index() {
        let d = ShardDirectory::new(2);
        assert_eq!(d.thread(1), None);
        let t = ShardThread {
            tid: 7,
            cpus: vec![1],
        };
        d.shard_started(1, t.clone());
        d.shard_started(5, t.clone()); // out of range: ignored
        assert_eq!(d.thread(1), Some(t));
        assert_eq!(d.thread(0), None);
    }
}
