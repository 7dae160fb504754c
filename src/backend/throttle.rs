//! `pool.max_statements_per_second`: how many statements one pool (database, user) may send
//! to Postgres each second. A token bucket holding a second's worth: a statement takes a
//! token, and when there is none it *reserves* the next one and waits until it is due, so
//! waiting statements go in the order they came and the rate holds however many wait.
//! Statements answered from the cache take no token — the limit protects Postgres, not
//! pgcache. Nothing is refused: a client over the limit sees latency, never an error.
//!
//! Where it applies ([`crate::session`]): statements a session-pooled client starts outside a
//! transaction. Inside a transaction a wait would hold its locks; in transaction pooling it
//! would hold a backend other clients need, and there `pool.max_size` already bounds what
//! Postgres runs at once.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    /// Tokens (negative: reserved ahead) and when they were last counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// A bucket of `rate` statements a second, full.
    pub fn new(rate: u32) -> Throttle {
        let rate = f64::from(rate.max(1));
        Throttle { rate, bucket: Mutex::new((rate, Instant::now())) }
    }

    /// Takes `n` statements' tokens — at most a second's worth, so that one request of
    /// thousands of statements does not make every other session of the pool wait for hours —
    /// and returns how long to wait before sending them (zero when they were there).
    pub fn reserve(&self, n: u32) -> Duration {
        let n = n.min(self.rate as u32);
        let mut bucket = self.bucket.lock();
        let now = Instant::now();
        let (tokens, at) = *bucket;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.rate) - f64::from(n);
        *bucket = (tokens, now);
        if tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-tokens / self.rate) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `d` is `ms` milliseconds (to a microsecond: the bucket counts in floats).
    fn near(d: Duration, ms: u64) -> bool {
        d.abs_diff(Duration::from_millis(ms)) < Duration::from_micros(1)
    }

    #[tokio::test(start_paused = true)]
    async fn a_seconds_worth_passes_then_statements_wait_their_turn() {
        let t = Throttle::new(10);
        for _ in 0..10 {
            assert_eq!(t.reserve(1), Duration::ZERO);
        }
        // The 11th waits 0.1 s, the 12th 0.2 s: in the order they came.
        assert!(near(t.reserve(1), 100));
        assert!(near(t.reserve(1), 200));
        tokio::time::advance(Duration::from_secs(1)).await;
        // A second later the two reserved are paid for; eight tokens are back.
        assert_eq!(t.reserve(8), Duration::ZERO);
        assert!(near(t.reserve(1), 100));
        // An idle pool fills up to a second's worth, no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(t.reserve(10), Duration::ZERO);
        assert!(t.reserve(1) > Duration::ZERO);
        // One request of a hundred thousand statements reserves a second's worth.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(t.reserve(100_000), Duration::ZERO);
        assert!(near(t.reserve(1), 100));
    }
}
