//! Session state that many sessions have the same of — the settings their probe read, their
//! startup parameters — held once and shared, so an idle client does not carry its own copy
//! (a kilobyte or more each; see `bench/idle.sh`). Shared by value: an entry is found only by
//! equal contents and is never changed, so sharing one between servers in one process (the
//! tests run many) changes nothing they see. Entries that no session holds any more are
//! dropped when the map has doubled since it was last swept.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Values shared by key: [`Shared::get`] returns the live value for an equal key, if any.
pub struct Shared<K, V> {
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    map: Option<HashMap<K, Weak<V>>>,
    /// Sweep when the map reaches this many entries.
    sweep_at: usize,
}

impl<K: Hash + Eq, V> Default for Shared<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq, V> Shared<K, V> {
    pub const fn new() -> Self {
        Shared { inner: Mutex::new(Inner { map: None, sweep_at: 64 }) }
    }

    /// The value held for `key` if a session still holds it, or `make()`'s, kept for the next.
    pub fn get(&self, key: K, make: impl FnOnce() -> V) -> Arc<V> {
        let mut inner = self.inner.lock();
        let sweep_at = inner.sweep_at;
        let map = inner.map.get_or_insert_with(HashMap::new);
        if let Some(v) = map.get(&key).and_then(Weak::upgrade) {
            return v;
        }
        let v = Arc::new(make());
        if map.len() >= sweep_at {
            map.retain(|_, v| v.strong_count() > 0);
            inner.sweep_at = (map.len() * 2).max(64);
        }
        let map = inner.map.get_or_insert_with(HashMap::new);
        map.insert(key, Arc::downgrade(&v));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_share_while_held_and_the_dead_are_swept() {
        let shared: Shared<u32, String> = Shared::new();
        let a = shared.get(1, || "one".into());
        assert!(Arc::ptr_eq(&a, &shared.get(1, || unreachable!("held: shared"))));
        drop(a);
        assert_eq!(*shared.get(1, || "uno".into()), "uno", "no longer held: made again");
        let held: Vec<_> = (0..1000).map(|i| shared.get(i, || i.to_string())).collect();
        drop(held);
        for i in 1000..1100 {
            shared.get(i, || i.to_string());
        }
        let inner = shared.inner.lock();
        assert!(inner.map.as_ref().unwrap().len() < 200, "entries no one holds are swept");
    }
}
