//! Who gets a connection: at most `max_total` IO connections in all and
//! `max_per_peer` from one address, decided at accept, before the
//! connection has a buffer or a task. One peer flooding the port cannot
//! take every descriptor, and the others keep their share.

use crate::log_limit::LogLimit;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub struct Admission {
    max_total: usize,
    max_per_peer: usize,
    state: Mutex<State>,
    /// Refusals are logged at most once a second.
    pub log: LogLimit,
}

#[derive(Default)]
struct State {
    total: usize,
    peers: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Total(usize),
    Peer(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "{n} IO connections open (--max-connections)"),
            Refusal::Peer(n) => write!(
                f,
                "{n} IO connections from this address (--max-connections-per-host)"
            ),
        }
    }
}

/// One admitted connection; its slots are released when dropped.
pub struct Admitted {
    admission: Arc<Admission>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        s.total -= 1;
        if let Some(n) = s.peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.peers.remove(&self.peer);
            }
        }
    }
}

impl Admission {
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_total: max_total.max(1),
            max_per_peer: max_per_peer.max(1),
            state: Mutex::new(State::default()),
            log: LogLimit::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refusal> {
        let peer = peer.to_canonical();
        let mut s = self.lock();
        if s.total >= self.max_total {
            return Err(Refusal::Total(s.total));
        }
        let from_peer = s.peers.get(&peer).copied().unwrap_or(0);
        if from_peer >= self.max_per_peer {
            return Err(Refusal::Peer(from_peer));
        }
        s.total += 1;
        *s.peers.entry(peer).or_insert(0) += 1;
        Ok(Admitted {
            admission: self.clone(),
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_peer_and_in_all_and_free_on_drop() {
        let a = Admission::new(3, 2);
        let p1: IpAddr = "127.0.0.1".parse().unwrap();
        let p2: IpAddr = "127.0.0.2".parse().unwrap();
        let x = a.admit(p1).unwrap();
        let _y = a.admit(p1).unwrap();
        assert_eq!(a.admit(p1).err(), Some(Refusal::Peer(2)));
        // The IPv4-mapped form is the same peer.
        assert_eq!(
            a.admit("::ffff:127.0.0.1".parse().unwrap()).err(),
            Some(Refusal::Peer(2))
        );
        let _z = a.admit(p2).unwrap();
        assert_eq!(a.admit(p2).err(), Some(Refusal::Total(3)));
        drop(x);
        assert!(a.admit(p1).is_ok());
        assert!(a.lock().peers.len() <= 2);
    }
}
