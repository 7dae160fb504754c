//! Giving the heap's free pages back to the system after crowds of clients ([`Trimmer`]).
//!
//! glibc returns by itself only the free memory at the top of its heaps. What log-ins and
//! first transactions free (read buffers, the startup exchange, a statement's result) between
//! the small things an idle client keeps stays mapped: `bench/idle.sh`, 10 000 idle clients
//! in transaction pooling, 1.95 KB per client without a trim and 1.71 KB with one
//! (2026-12-07). `malloc_trim` walks every free chunk of every arena, holding that arena's
//! lock, and gives back the whole pages among them — on a heap with a large cache of small
//! entries that walk is long and the sessions allocating from the arena wait for it. So it
//! runs only after a crowd (hundreds of clients came or went within a minute, not a probe
//! logging in every few seconds), on a blocking thread, one at a time in the process, at
//! least ten seconds and twenty times as long as the last one took apart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How many clients must come or go within [`WAIT`] to make a crowd.
const CHURN: u64 = 256;
/// The least time between the end of a trim and the next.
const REST: Duration = Duration::from_secs(10);
/// The window a crowd comes in, and the longest a trim waits for it to stop coming and going.
const WAIT: Duration = Duration::from_secs(60);

/// When to trim: once [`CHURN`] clients have come or gone within a window of [`WAIT`], at an
/// upkeep tick with none coming or going since the last (a crowd's log-ins are over), or
/// [`WAIT`] after there were that many when they never stop; never within [`REST`], or twenty
/// times as long as the last trim took, after it.
#[derive(Debug)]
pub struct Trimmer {
    /// The churn ([`crate::context::clients::Clients::churn`]) at the last tick.
    last: Option<u64>,
    /// The churn when the window began (the last trim, or a window with too few).
    base: u64,
    /// When the window began.
    window: Instant,
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
        Trimmer { last: None, base: 0, window: now, pending: None, next: now, running: None }
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
            // Unconstrained: a finished task's output is read even when this task has used up
            // its cooperative budget.
            let took = self.running.take().map(tokio::task::coop::unconstrained);
            if let Some(Some(Ok(Some(took)))) = took.map(futures_util::FutureExt::now_or_never) {
                tracing::debug!(?took, "heap trimmed");
                self.rest(now, took);
            }
        }
        if cfg!(all(target_os = "linux", target_env = "gnu")) && self.due(churn, now) {
            (self.base, self.window, self.pending) = (churn, now, None);
            self.running = Some(tokio::task::spawn_blocking(trim_heap));
        }
    }

    /// Whether a trim is due now, with the clients' churn at this tick.
    fn due(&mut self, churn: u64, now: Instant) -> bool {
        let quiet = self.last == Some(churn);
        self.last = Some(churn);
        if self.pending.is_none() && churn.saturating_sub(self.base) < CHURN {
            if now.duration_since(self.window) >= WAIT {
                // Too few for a crowd in this window: a new one begins.
                (self.base, self.window) = (churn, now);
            }
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
        // A probe logging in and out every tick for an hour: never a crowd in a minute.
        for n in 0..3_600u32 {
            assert!(!t.due(u64::from(n) * 2, t0 + S * n), "a trim after {} clients", n * 2);
        }
        // A crowd arrives (no trim while it does), then a quiet tick.
        let at = t0 + S * 3_600;
        assert!(!t.due(8_000, at));
        assert!(!t.due(12_000, at + S));
        assert!(t.due(12_000, at + S * 2));
    }

    #[test]
    fn trims_rest_between_them_and_never_wait_more_than_a_minute() {
        let t0 = Instant::now();
        let mut t = Trimmer::new(t0);
        assert!(!t.due(300, t0));
        assert!(t.due(300, t0 + S));
        (t.base, t.window, t.pending) = (300, t0 + S, None);
        t.rest(t0 + S * 2, Duration::from_millis(100));
        // Another crowd at once: quiet from the fourth second, but within the ten seconds' rest.
        assert!(!t.due(700, t0 + S * 3));
        assert!(!t.due(700, t0 + S * 4));
        assert!(!t.due(700, t0 + S * 11));
        assert!(t.due(700, t0 + S * 12));
        (t.base, t.window, t.pending) = (700, t0 + S * 12, None);
        // A trim that took a second rests twenty.
        t.rest(t0 + S * 13, S);
        assert!(!t.due(1_000, t0 + S * 14));
        assert!(!t.due(1_000, t0 + S * 32), "quiet, but resting");
        assert!(t.due(1_000, t0 + S * 33));
        (t.base, t.window, t.pending) = (1_000, t0 + S * 33, None);
        t.rest(t0 + S * 33, Duration::ZERO);
        // Clients that never stop coming and going: a trim a minute after they made a crowd.
        let first_due = (0..200u32).find(|&i| t.due(1_000 + 10 * u64::from(i), t0 + S * (40 + i)));
        // Churn reaches 256 past the base at i = 26 (1 260), so the minute runs from t0 + 66 s.
        assert_eq!(first_due, Some(26 + 60));
    }

    #[tokio::test]
    async fn one_trim_runs_at_a_time() {
        let t0 = Instant::now();
        let mut t = Trimmer::new(t0);
        t.running = Some(tokio::spawn(std::future::pending()));
        t.tick(500, t0);
        t.tick(500, t0 + S);
        t.tick(500, t0 + S * 2);
        assert_eq!(t.last, Some(500), "the churn is followed meanwhile");
        assert!(t.running.as_ref().is_some_and(|r| !r.is_finished()), "no second trim");
        t.running.take().unwrap().abort();
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[tokio::test]
    async fn a_tick_trims_after_a_crowd_and_rests_after_it() {
        let t0 = Instant::now();
        let mut t = Trimmer::new(t0);
        t.tick(500, t0);
        t.tick(500, t0 + S);
        let Some(running) = &t.running else { panic!("a trim is due after a quiet tick") };
        while !running.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        t.tick(900, t0 + S * 2);
        assert!(t.running.is_none(), "the trim ended");
        assert!(t.next >= t0 + S * 12, "and rests ten seconds at least");
        t.tick(900, t0 + S * 3);
        assert!(t.running.is_none(), "a quiet tick after another crowd, resting");
        t.tick(900, t0 + S * 12);
        assert!(t.running.is_some(), "then trims again");
    }
}
