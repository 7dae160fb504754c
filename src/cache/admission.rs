//! Admission: whether a miss is worth storing.
//!
//! A fill costs: the rows are kept as they stream past, an entry is weighed and inserted (and
//! may evict one that was being read), and later writes must find and kill it. For a rule
//! whose entries are read again that pays; for one whose reads spread over more keys than the
//! cache holds (random keys over a large table) almost every fill is thrown away unread, and
//! the rule would make its workload slower than no rule at all. So each rule's hits and misses
//! are counted in windows of a thousand look-ups ([`crate::rules::usage`], kept on the rule):
//!
//! - while a window's hits are fewer than half its misses (fewer than one look-up in three
//!   answered), the rule is **gated**: a miss is stored only if its key was missed before,
//!   recently — a doorkeeper, as in TinyLFU: a bit set of [`BITS`] bits, two per key, cleared
//!   after [`BITS`]/8 keys so that it remembers the recent past only. A hot key is stored at
//!   its second miss; a key read once is never stored;
//! - once a window's hits outnumber its misses, the gate opens again (the hysteresis keeps a
//!   rule near the line from flapping).
//!
//! A rule starts open, so a statement's first miss is stored as before; only a rule that has
//! shown, over a thousand look-ups, that its entries are seldom read pays the second miss.
//! `cache.admission = "always"` stores every miss (the usage is still counted).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::rules::Rule;
#[cfg(test)]
use crate::rules::usage::WINDOW;
/// Bits of the doorkeeper (128 KiB).
pub const BITS: usize = 1 << 20;
const WORDS: usize = BITS / 64;
/// Keys the doorkeeper takes before it is cleared (about 5 % false "seen before" by then).
const RESET_AFTER: usize = BITS / 8;

/// The doorkeeper.
pub struct Admission {
    words: Box<[AtomicU64]>,
    inserted: AtomicUsize,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { words: (0..WORDS).map(|_| AtomicU64::new(0)).collect(), inserted: AtomicUsize::new(0) }
    }
}

impl Admission {
    /// Counts a miss of `rule`'s on the key hashed `hash`: whether to store its fill. (Hits
    /// are counted where every statement is, [`crate::stats::Stats::record`].)
    /// `adaptive`: `cache.admission = "adaptive"` (otherwise every miss is stored).
    pub fn admit(&self, rule: &Rule, hash: u64, adaptive: bool) -> bool {
        rule.usage.count(false);
        !adaptive || !rule.usage.gated() || self.seen_before(hash)
    }

    /// Whether `hash` was noted since the doorkeeper was last cleared; notes it.
    fn seen_before(&self, hash: u64) -> bool {
        let mut seen = true;
        for bit in [hash as usize % BITS, (hash >> 32) as usize % BITS] {
            let (word, mask) = (&self.words[bit / 64], 1u64 << (bit % 64));
            // Read first: a bit already set needs no locked write (nor the cache line taken).
            seen &= word.load(Ordering::Relaxed) & mask != 0 || word.fetch_or(mask, Ordering::Relaxed) & mask != 0;
        }
        if !seen && self.inserted.fetch_add(1, Ordering::Relaxed) + 1 >= RESET_AFTER {
            self.inserted.store(0, Ordering::Relaxed);
            self.words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rule() -> Rule {
        Rule::cache("r", Duration::from_secs(60))
    }

    #[test]
    fn a_rule_whose_entries_are_not_read_again_is_gated_and_opens_when_they_are() {
        let (a, r) = (Admission::default(), rule());
        // Every look-up a miss on a new key: all stored until the window closes.
        for k in 0..WINDOW - 1 {
            assert!(a.admit(&r, k.wrapping_mul(0x9E37_79B9_7F4A_7C15), true), "open during the first window");
        }
        assert!(!r.usage.gated());
        // The miss that closes the window gates the rule, itself included.
        assert!(!a.admit(&r, 1, true));
        assert!(r.usage.gated(), "no hits in a window of misses");
        let key = 0xDEAD_BEEF_0000_1234u64;
        assert!(!a.admit(&r, key, true), "a key's first miss is not stored");
        assert!(a.admit(&r, key, true), "its second is");
        assert!(a.admit(&r, key ^ 1, false), "admission = always: stored whatever the gate says");
        // A window in which most look-ups hit opens the gate.
        for _ in 0..WINDOW {
            r.usage.count(true);
        }
        assert!(!r.usage.gated());
        assert!(a.admit(&r, 42, true), "open: a first miss is stored again");
    }

    #[test]
    fn a_rule_that_mostly_hits_is_never_gated() {
        let (a, r) = (Admission::default(), rule());
        for k in 0..10 * WINDOW {
            if k % 4 == 0 {
                assert!(a.admit(&r, k, true));
            } else {
                r.usage.count(true);
            }
        }
        assert!(!r.usage.gated());
    }

    #[test]
    fn the_doorkeeper_forgets_after_its_share_of_keys() {
        let a = Admission::default();
        assert!(!a.seen_before(7));
        assert!(a.seen_before(7));
        let mut k = 0u64;
        loop {
            a.seen_before(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555);
            k += 1;
            if a.inserted.load(Ordering::Relaxed) == 0 {
                break;
            }
        }
        assert!(k >= RESET_AFTER as u64);
        assert!(!a.seen_before(7), "cleared");
    }
}
