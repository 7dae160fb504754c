//! Session state that many sessions have the same of — the settings their probe read, their
//! startup parameters — held once and shared, so an idle client does not carry its own copy
//! (a kilobyte or more each; see `bench/idle.sh`). Shared by value: a value is found only by
//! equal contents and is never changed, so sharing one between servers in one process (the
//! tests run many) changes nothing they see.
//!
//! The map holds no copy of a value, only a weak reference under its hash: once no session
//! holds a value, its contents are freed, and what is left (the reference) is dropped the
//! next time its hash is looked up, or when the map has doubled since it was last swept.
//! The lock is held for hashing, a look-up and comparisons only; the caller builds the
//! value before.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Values shared by contents: [`Shared::get`] returns the live value equal to the one given,
/// if there is one.
pub struct Shared<V> {
    inner: Mutex<Inner<V>>,
}

/// The references to the values of each hash.
type Buckets<V> = HashMap<u64, Vec<Weak<V>>>;

struct Inner<V> {
    /// Made at first use; the hasher is seeded at random, so clients cannot choose startup
    /// parameters or settings that all fall under one hash.
    by_hash: Option<(Buckets<V>, foldhash::quality::RandomState)>,
    /// References held, live or not.
    held: usize,
    /// Sweep when `held` reaches this.
    sweep_at: usize,
}

impl<V: Hash + Eq> Default for Shared<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Hash + Eq> Shared<V> {
    pub const fn new() -> Self {
        Shared { inner: Mutex::new(Inner { by_hash: None, held: 0, sweep_at: 64 }) }
    }

    /// The live value equal to `value`, or `value`, kept for the next.
    pub fn get(&self, value: V) -> Arc<V> {
        let mut inner = self.inner.lock();
        let Inner { by_hash, held, sweep_at } = &mut *inner;
        let (by_hash, hasher) = by_hash.get_or_insert_with(Default::default);
        let hash = hasher.hash_one(&value);
        let bucket = by_hash.entry(hash).or_default();
        let before = bucket.len();
        let mut found = None;
        bucket.retain(|w| match w.upgrade() {
            Some(v) => {
                if found.is_none() && *v == value {
                    found = Some(v);
                }
                true
            }
            None => false,
        });
        *held -= before - bucket.len();
        if let Some(v) = found {
            return v;
        }
        let v = Arc::new(value);
        bucket.push(Arc::downgrade(&v));
        *held += 1;
        if *held >= *sweep_at {
            by_hash.retain(|_, bucket| {
                bucket.retain(|w| w.strong_count() > 0);
                !bucket.is_empty()
            });
            by_hash.shrink_to_fit();
            *held = by_hash.values().map(Vec::len).sum();
            *sweep_at = (*held * 2).max(64);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_share_while_held_and_the_dead_are_swept() {
        let shared: Shared<String> = Shared::new();
        let a = shared.get("one".into());
        let b = shared.get("one".into());
        assert!(Arc::ptr_eq(&a, &b), "held: shared");
        assert!(!Arc::ptr_eq(&a, &shared.get("two".into())));
        drop((a, b));
        let again = shared.get("one".into());
        assert_eq!(*again, "one", "no longer held: kept anew");
        let held: Vec<_> = (0..1000).map(|i| shared.get(i.to_string())).collect();
        drop(held);
        for i in 1000..1100 {
            shared.get(i.to_string());
        }
        let inner = shared.inner.lock();
        assert!(inner.held < 200, "references to values no one holds are swept: {}", inner.held);
        assert_eq!(inner.held, inner.by_hash.as_ref().unwrap().0.values().map(Vec::len).sum::<usize>());
    }
}
