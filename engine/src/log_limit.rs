//! At most one log line a second for a refusal that a flood can trigger
//! thousands of times (connections over a cap, a busy control route), with
//! the count of the ones left out since.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct LogLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    /// Some(suppressed since the last line) when this one should be logged.
    pub fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.0.is_some_and(|t| now - t < Duration::from_secs(1)) {
            s.1 += 1;
            return None;
        }
        s.0 = Some(now);
        Some(std::mem::take(&mut s.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_one_line_a_second_with_the_count_left_out() {
        let l = LogLimit::default();
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        l.state.lock().unwrap().0 = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(l.admit(), Some(2));
    }
}
