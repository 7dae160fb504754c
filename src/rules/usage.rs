//! A rule's recent look-ups: hits and misses counted in windows, and what they say of its
//! entries — the facts [`crate::cache::admission`] decides from (see there for why).

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// Look-ups per window of a rule's usage.
pub const WINDOW: u64 = 1024;

/// What a rule's last windows said of its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Standing {
    /// Read again often enough: every miss is stored.
    Open = 0,
    /// A window's hits were fewer than half its misses: a miss is stored only at its key's
    /// second miss.
    Gated = 1,
    /// Gated, and a further window answered fewer than one look-up in [`DORMANT_BELOW`]: the
    /// planner looks up about one read in [`SAMPLED`] (chosen at random).
    Dormant = 2,
}

/// A gated rule goes dormant when a window answers fewer than one look-up in this many.
pub const DORMANT_BELOW: u64 = 16;
/// A dormant rule wakes (gated again) when a window answers one look-up in this many or more.
pub const WAKES_AT: u64 = 8;
/// A dormant rule's reads are looked up one in this many (on average).
pub const SAMPLED: u32 = 4;

/// Whether to look up this read of a dormant rule: at random, one in [`SAMPLED`] — a
/// per-thread xorshift (no state shared between threads, nor kept by every session; random,
/// so that no periodic mix of several dormant rules' reads can leave one never looked up).
pub fn sampled() -> bool {
    thread_local!(static STATE: Cell<u32> = Cell::new(std::process::id() | 1));
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        s.set(x);
        x % SAMPLED == 0
    })
}

/// A rule's look-ups in the current window, and its [`Standing`]: gated when a window's hits
/// are fewer than half its misses, dormant when a gated window's are fewer than one in
/// [`DORMANT_BELOW`], woken when one in [`WAKES_AT`] hits, opened when hits outnumber misses.
#[derive(Debug, Default)]
pub struct Usage {
    /// Hits in the high 32 bits, misses in the low: one atomic, so a window is closed once.
    window: AtomicU64,
    standing: AtomicU8,
}

impl Usage {
    pub fn standing(&self) -> Standing {
        match self.standing.load(Ordering::Relaxed) {
            0 => Standing::Open,
            1 => Standing::Gated,
            _ => Standing::Dormant,
        }
    }

    /// Whether misses are stored only at their key's second miss (gated or dormant).
    pub fn gated(&self) -> bool {
        self.standing() != Standing::Open
    }

    /// Whether most reads are not looked up.
    pub fn dormant(&self) -> bool {
        self.standing() == Standing::Dormant
    }

    /// Counts a hit (`hit`) or a miss; at the end of a window, decides the standing.
    pub fn count(&self, hit: bool) {
        let add = if hit { 1 << 32 } else { 1 };
        let before = self.window.fetch_add(add, Ordering::Relaxed);
        let now = before + add;
        let (hits, misses) = (now >> 32, now & 0xFFFF_FFFF);
        if hits + misses < WINDOW || self.window.compare_exchange(now, 0, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let next = match self.standing() {
            _ if hits > misses => Standing::Open,
            Standing::Open if hits * 2 < misses => Standing::Gated,
            Standing::Gated if hits * DORMANT_BELOW < hits + misses => Standing::Dormant,
            Standing::Dormant if hits * WAKES_AT >= hits + misses => Standing::Gated,
            same => same,
        };
        self.standing.store(next as u8, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(u: &Usage, hits: u64) {
        for i in 0..WINDOW {
            u.count(i < hits);
        }
    }

    #[test]
    fn a_rule_goes_dormant_only_after_a_gated_window_of_rare_hits_and_wakes_when_hits_return() {
        let u = Usage::default();
        window(&u, 0);
        assert_eq!(u.standing(), Standing::Gated, "one window of misses gates, no more");
        window(&u, WINDOW / DORMANT_BELOW);
        assert_eq!(u.standing(), Standing::Gated, "one look-up in sixteen answered: still worth looking up");
        window(&u, WINDOW / DORMANT_BELOW - 1);
        assert!(u.dormant(), "fewer: dormant");
        assert!(u.gated(), "a dormant rule's misses are gated too");
        window(&u, WINDOW / WAKES_AT - 1);
        assert!(u.dormant(), "too few hits to wake");
        window(&u, WINDOW / WAKES_AT);
        assert_eq!(u.standing(), Standing::Gated, "woken");
        window(&u, 0);
        window(&u, 0);
        assert!(u.dormant());
        window(&u, WINDOW / 2 + 1);
        assert_eq!(u.standing(), Standing::Open, "hits outnumber misses: open at once");
    }

    #[test]
    fn about_one_dormant_read_in_four_is_looked_up() {
        let n = (0..4000).filter(|_| sampled()).count();
        // 1000 expected; the standard deviation is 27.
        assert!((800..1200).contains(&n), "{n} of 4000");
    }
}
