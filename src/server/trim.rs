//! Giving the heap's free pages back to the system after crowds of clients ([`Trimmer`]).
//!
//! glibc returns by itself only the free memory at the top of its heaps. What log-ins and
//! first transactions free (read buffers, the startup exchange, a statement's result) between
//! the small things an idle client keeps stays mapped: `bench/idle.sh`, 10 000 idle clients
//! in transaction pooling, 1.95 KB per client without a trim and 1.71 KB with one
//! (2026-12-07). `malloc_trim` walks every free chunk of every arena, holding that arena's
//! lock, and gives back the whole pages among them — on a heap with a large cache of small
//! entries that walk is long and the sessions allocating from the arena wait for it. So it
//! runs only after a crowd (hundreds of clients came or went, not a probe logging in every
//! few seconds), on a blocking thread, one at a time in the process, at least ten seconds and
//! twenty times as long as the last one took apart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many clients must come or go between two trims.
const CHURN: u64 = 256;
/// The least time between the end of a trim and the next.
const REST: Duration = Duration::from_secs(10);
/// The longest a trim waits for clients to stop coming and going.
const WAIT: Duration = Duration::from_secs(60);

/// When to trim: once [`CHURN`] clients have come or gone since the last trim, at an upkeep
/// tick with none coming or going since the last (a crowd's log-ins are over), or [`WAIT`]
/// after there were that many when they never stop; never within [`REST`], or twenty times
/// as long as the last trim took, after it.
#[derive(Debug)]
pub struct Trimmer {
    /// The churn ([`crate::context::clients::Clients::churn`]) at the last tick.
    last: Option<u64>,
    /// The churn when the last trim began.
    trimmed_at: u64,
    /// Since when enough churn has waited for a trim.
    pending: Option<Instant>,
    /// No trim before.
    next: Instant,
    /// The trim running, if one is: it tells how long it took (`None`: another server's
    /// trim in this process was running, so it did nothing).
    running: Option<JoinHandle<Option<Duration>>>,
}

impl Trimmer {
    pub fn new(now: Instant) -> Trimmer {
        Trimmer { last: None, trimmed_at: 0, pending: None, next: now, running: None }
    }

    /// At an upkeep tick, with the clients' churn now: notes a trim that has finished and
    /// starts one on a blocking thread when one is due (never on a worker: the walk can be
    /// long).
    pub fn tick(&mut self, churn: u64, now: Instant) {
        if let Some(running) = &self.running {
            if !running.is_finished() {
                self.last = Some(churn);
                return;
            }
            let took = self.running.take().and_then(futures_util::FutureExt::now_or_never).and_then(Result::ok);
            if let Some(took) = took.flatten() {
                tracing::debug!(?took, "heap trimmed");
                self.rest(now, took);
            }
        }
        if cfg!(all(target_os = "linux", target_env = "gnu")) && self.due(churn, now) {
            self.trimmed_at = churn;
            self.pending = None;
            self.running = Some(tokio::task::spawn_blocking(trim_heap));
        }
    }

    /// Whether a trim is due now, with the clients' churn at this tick.
    fn due(&mut self, churn: u64, now: Instant) -> bool {
        let quiet = self.last == Some(churn);
        self.last = Some(churn);
        if churn.saturating_sub(self.trimmed_at) < CHURN {
            return false;
        }
        let since = *self.pending.get_or_insert(now);
        now >= self.next && (quiet || now.duration_since(since) >= WAIT)
    }

    /// A trim that took `took` has just ended.
    fn rest(&mut self, now: Instant, took: Duration) {
        self.next = now + (took * 20).max(REST);
    }
}

/// One trim of the whole process's heap, unless another server's is running (`None`); how
/// long it took.
fn trim_heap() -> Option<Duration> {
    static TRIMMING: AtomicBool = AtomicBool::new(false);
    if TRIMMING.swap(true, Ordering::AcqRel) {
        return None;
    }
    let started = std::time::Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only hands free pages back to the system; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
    TRIMMING.store(false, Ordering::Release);
    Some(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_trim_waits_for_a_crowd_to_have_come_and_gone() {
        let t0 = Instant::now();
        let mut t = Trimmer::new(t0);
        // A probe logging in and out every tick: never enough churn.
        for n in 0..100 {
            assert!(!t.due(n * 2, t0 + S * n as u32), "a trim after {} clients", n * 2);
        }
        // A crowd arrives (no trim while it does), then a quiet tick.
        assert!(!t.due(1_000, t0 + S * 100));
        assert!(!t.due(5_000, t0 + S * 101));
        assert!(t.due(5_000, t0 + S * 102));
    }

    #[test]
    fn trims_rest_between_them_and_never_wait_more_than_a_minute() {
        let t0 = Instant::now();
        let mut t = Trimmer::new(t0);
        assert!(!t.due(300, t0));
        assert!(t.due(300, t0 + S));
        (t.trimmed_at, t.pending) = (300, None);
        t.rest(t0 + S * 2, Duration::from_millis(100));
        // Another crowd at once: quiet, but within the ten seconds' rest.
        assert!(!t.due(700, t0 + S * 3));
        assert!(!t.due(700, t0 + S * 4));
        assert!(t.due(700, t0 + S * 12));
        (t.trimmed_at, t.pending) = (700, None);
        // A trim that took a second rests twenty.
        t.rest(t0 + S * 13, S);
        assert!(!t.due(1_000, t0 + S * 14));
        assert!(!t.due(1_000, t0 + S * 32));
        assert!(t.due(1_000, t0 + S * 33));
        (t.trimmed_at, t.pending) = (1_000, None);
        t.rest(t0 + S * 33, Duration::ZERO);
        // Clients that never stop coming and going: a trim a minute after there were enough.
        let first_due = (0..200u32).find(|&i| t.due(1_000 + 10 * u64::from(i), t0 + S * (50 + i)));
        // Churn passes 256 at i = 26 (1 260), so the minute runs from t0 + 76 s.
        assert_eq!(first_due, Some(26 + 60));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[tokio::test]
    async fn a_tick_runs_one_trim_at_a_time_and_rests_after_it() {
        let t0 = Instant::now();
        let mut t = Trimmer::new(t0);
        t.tick(500, t0);
        t.tick(500, t0 + S);
        let Some(running) = &t.running else { panic!("a trim is due after a quiet tick") };
        while !running.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t.tick(900, t0 + S * 2);
        assert!(t.running.is_none(), "another crowd waits for the rest");
        assert!(t.next >= t0 + S * 12, "rests ten seconds at least after it ended");
        t.tick(900, t0 + S * 12);
        assert!(t.running.is_some(), "then trims again");
    }
}
