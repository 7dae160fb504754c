//! A rule's recent look-ups: hits and misses counted in windows, and whether its misses are
//! gated — the facts [`crate::cache::admission`] decides from (see there for why).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Look-ups per window of a rule's usage.
pub const WINDOW: u64 = 1024;

/// A rule's look-ups in the current window, and whether its misses are gated: closed when a
/// window's hits are fewer than half its misses, opened when they outnumber them.
#[derive(Debug, Default)]
pub struct Usage {
    /// Hits in the high 32 bits, misses in the low: one atomic, so a window is closed once.
    window: AtomicU64,
    gated: AtomicBool,
}

impl Usage {
    /// Whether misses are stored only at their key's second miss.
    pub fn gated(&self) -> bool {
        self.gated.load(Ordering::Relaxed)
    }

    /// Counts a hit (`hit`) or a miss; at the end of a window, decides the gate.
    pub fn count(&self, hit: bool) {
        let add = if hit { 1 << 32 } else { 1 };
        let before = self.window.fetch_add(add, Ordering::Relaxed);
        let now = before + add;
        let (hits, misses) = (now >> 32, now & 0xFFFF_FFFF);
        if hits + misses < WINDOW || self.window.compare_exchange(now, 0, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let gated = self.gated();
        if !gated && hits * 2 < misses {
            self.gated.store(true, Ordering::Relaxed);
        } else if gated && hits > misses {
            self.gated.store(false, Ordering::Relaxed);
        }
    }
}
