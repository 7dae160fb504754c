//! Replayed messages. A sealed message cannot be forged, but any role that may `LISTEN` on the
//! channel can capture one and `NOTIFY` it again — "everything changed" over and over would
//! keep the fleet's caches empty. An instance's message is heard once, and only while it is
//! recent ([`WINDOW`] either way, wide enough for clocks set by NTP): what was heard is
//! remembered for that long (at most [`MAX_REMEMBERED`] messages).
//!
//! The bypass triggers' messages are exempt: they carry the time of the write, not of its
//! commit (a long transaction's would look old), and two writes in the same microsecond seal
//! the same text. Replaying one only invalidates the one table it names again — never a stale
//! read.

use std::collections::{HashSet, VecDeque};
use std::hash::BuildHasher;

/// How far a message's time may be from this instance's clock, in microseconds.
pub const WINDOW: i64 = 10 * 60 * 1_000_000;
/// At most this many messages are remembered.
pub const MAX_REMEMBERED: usize = 100_000;

/// The messages heard within the window.
#[derive(Default)]
pub struct Replays {
    heard: HashSet<u64>,
    /// (time sent, hash) in the order heard.
    order: VecDeque<(i64, u64)>,
    hasher: std::collections::hash_map::RandomState,
}

impl Replays {
    /// Whether the sealed message `payload`, sent at `t`, is heard for the first time and
    /// recently (`now`: this instance's clock).
    pub fn first(&mut self, payload: &str, t: i64, now: i64) -> bool {
        if (now - t).abs() > WINDOW {
            return false;
        }
        while let Some(&(sent, hash)) = self.order.front()
            && (now - sent > WINDOW || self.order.len() >= MAX_REMEMBERED)
        {
            self.order.pop_front();
            self.heard.remove(&hash);
        }
        let hash = self.hasher.hash_one(payload);
        if !self.heard.insert(hash) {
            return false;
        }
        self.order.push_back((t, hash));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_heard_once_and_only_while_recent() {
        let mut r = Replays::default();
        let now = 1_000 * WINDOW;
        assert!(r.first("a", now, now));
        assert!(!r.first("a", now, now + 1), "replayed");
        assert!(r.first("b", now, now + 1), "another message");
        assert!(!r.first("c", now - WINDOW - 1, now), "too old");
        assert!(!r.first("d", now + WINDOW + 1, now), "from the future");
        // Once out of the window it is forgotten — and refused as too old anyway.
        assert!(!r.first("a", now, now + WINDOW + 1));
        assert!(r.order.len() <= 2);
    }

    #[test]
    fn what_is_remembered_is_bounded() {
        let mut r = Replays::default();
        for i in 0..(MAX_REMEMBERED + 10) {
            assert!(r.first(&i.to_string(), 0, 0));
        }
        assert_eq!(r.order.len(), MAX_REMEMBERED);
        assert_eq!(r.heard.len(), MAX_REMEMBERED);
    }
}
