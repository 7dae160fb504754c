//! Cache entries and the byte-bounded store holding them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};
use tokio::time::Instant;

use crate::query::Relation;
use crate::rules::Rule;

use super::{Dependency, Key};

/// A cached result: the exact backend bytes a client needs.
#[derive(Debug)]
pub struct Entry {
    /// The rule that admitted it (its TTL and windows apply).
    pub rule: Arc<Rule>,
    /// The RowDescription (or NoData) frame, sent when the client asked to describe.
    pub row_description: Bytes,
    /// DataRow frames and the CommandComplete frame.
    pub body: Bytes,
    pub rows: u64,
    pub created: Instant,
    pub deps: Vec<Dependency>,
    /// The relations it read (for reports and `INVALIDATE TABLE`).
    pub tables: Vec<Relation>,
    /// The SQL text it answers (for `EXPLAIN CACHE`).
    pub sql: Arc<str>,
    /// A background refresh is running (stale-while-revalidate).
    pub refreshing: AtomicBool,
    pub hits: AtomicU64,
    /// Its key in the shared L2, which names the versions it was computed under.
    pub l2_key: Option<Box<str>>,
    /// How to compute it again at the next start (`cache.warm_file`; else `None`).
    pub recipe: Option<Arc<super::warm::Recipe>>,
}

/// How an entry may be used now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its TTL.
    Fresh,
    /// Past its TTL but within `stale_while_revalidate`: serve it and refresh it.
    Stale,
    /// Past those but within `stale_if_error`: only when Postgres cannot answer.
    Fallback,
    /// Expired, or a relation it read was written since: never served again.
    Dead,
}

impl Entry {
    /// What holding the entry costs in memory, in bytes: its results, its SQL text, what it
    /// depends on and reads, its own structure and each allocation's overhead (the store
    /// counts its key too: [`Store`]'s weigher). Measured against RSS: a full cache of small
    /// entries grows the process by about its `max_bytes` (see the README).
    pub fn weight(&self) -> u64 {
        let tables: usize = self
            .tables
            .iter()
            .map(|t| {
                size_of::<Relation>()
                    + t.name.len()
                    + t.schema.as_ref().map_or(0, |s| s.len() + ALLOCATION)
                    + ALLOCATION
            })
            .sum();
        let parts = self.row_description.len()
            + self.body.len()
            + self.sql.len()
            + self.deps.len() * size_of::<super::generation::Dependency>()
            + self.l2_key.as_ref().map_or(0, |k| k.len() + ALLOCATION)
            + self.recipe.as_ref().map_or(0, |r| recipe_weight(r))
            + tables;
        (size_of::<Self>() + parts + 6 * ALLOCATION + SLOT) as u64
    }

    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// The DataRows of the body up to the `n`th (all of them if it has fewer), without the
    /// CommandComplete.
    pub fn first_rows(&self, n: u64) -> Bytes {
        let mut at = 0;
        for _ in 0..n.min(self.rows) {
            let Some(header) = self.body.get(at + 1..at + 5) else { break };
            at += u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize + 1;
        }
        self.body.slice(..at.min(self.body.len()))
    }

    /// What Postgres sends for an Execute of this result with row limit `max_rows` (0: none):
    /// the whole body when the result has fewer rows; otherwise exactly `max_rows` DataRows and
    /// PortalSuspended (Postgres suspends when the limit is reached, even on the last row).
    pub fn answer(&self, max_rows: i32) -> Bytes {
        if max_rows <= 0 || self.rows < max_rows as u64 {
            return self.body.clone();
        }
        let mut out = bytes::BytesMut::from(&self.first_rows(max_rows as u64)[..]);
        crate::protocol::backend::portal_suspended(&mut out);
        out.freeze()
    }

    pub fn invalidated(&self) -> bool {
        self.deps.iter().any(Dependency::moved)
    }

    pub fn freshness(&self) -> Freshness {
        self.freshness_at(Instant::now())
    }

    /// [`Entry::freshness`] at `now`.
    pub fn freshness_at(&self, now: Instant) -> Freshness {
        if self.invalidated() {
            return Freshness::Dead;
        }
        let age = now.saturating_duration_since(self.created);
        let ttl = self.rule.ttl;
        if age < ttl {
            Freshness::Fresh
        } else if age < ttl.saturating_add(self.rule.stale_while_revalidate) {
            Freshness::Stale
        } else if age < ttl.saturating_add(self.rule.stale_if_error) {
            Freshness::Fallback
        } else {
            Freshness::Dead
        }
    }

    /// When it dies of age, if nothing it read is written first (`None`: past any instant).
    fn dies_at(&self) -> Option<Instant> {
        let rule = &self.rule;
        self.created.checked_add(rule.ttl.saturating_add(rule.stale_while_revalidate.max(rule.stale_if_error)))
    }
}

/// Writes to keys alone wait for a sweep until the reads of the slots they moved number one
/// in this many entries (at least the entries they killed: about that share is dead, unswept).
const KEYS_PER_SWEEP: u64 = 8;

/// What one heap allocation costs beyond its bytes (the allocator's header and rounding).
const ALLOCATION: usize = 32;

/// What a warm-start recipe costs: its bytes, its structure and an allocation per string.
fn recipe_weight(r: &super::warm::Recipe) -> usize {
    let strings = 3 + 2 * (r.startup.len() + r.settings.len()) + r.customs.len() + r.undefined.len();
    let params = r.extended.as_ref().map_or(0, |e| e.params.len() * (size_of::<Option<Bytes>>() + ALLOCATION));
    size_of::<super::warm::Recipe>() + ALLOCATION + r.size() + strings * ALLOCATION + params
}
/// What the store's table spends per entry beyond the key and the entry (its slot, the
/// hash, the eviction bookkeeping).
const SLOT: usize = 64;

#[derive(Clone)]
struct ByBytes;

impl Weighter<Key, Arc<Entry>> for ByBytes {
    fn weight(&self, key: &Key, entry: &Arc<Entry>) -> u64 {
        (key.bytes().len() + size_of::<Key>() + ALLOCATION) as u64 + entry.weight()
    }
}

#[derive(Clone, Default)]
struct CountEvictions(Arc<AtomicU64>);

impl Lifecycle<Key, Arc<Entry>> for CountEvictions {
    type RequestState = ();

    fn on_evict(&self, _: &mut (), _: Key, _: Arc<Entry>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The store, bounded by the total weight (bytes) of its entries.
pub struct Store {
    cache: Cache<Key, Arc<Entry>, ByBytes, DefaultHashBuilder, CountEvictions>,
    evictions: Arc<AtomicU64>,
    max_bytes: u64,
    /// Set by every insert, cleared by a sweep that leaves nothing: a per-statement question
    /// ("is anything cached?") without visiting the cache's shards.
    occupied: AtomicBool,
    /// Ids for the settings parts of keys.
    pub interner: super::key::Interner,
    /// Whether a miss is stored ([`super::admission`]).
    pub admission: super::admission::Admission,
    /// When the first entry held dies of age, in milliseconds after `born` (`u64::MAX`: none):
    /// a sweep before then, with no invalidation since the last, would find nothing dead.
    next_death: AtomicU64,
    /// The invalidations counted at the last sweep ([`super::Moves::spread`]).
    swept_moves: AtomicU64,
    /// The key slots moved alone as of the last sweep ([`super::Moves::slots`]).
    swept_slots: AtomicU64,
    born: Instant,
}

impl Store {
    pub fn new(max_bytes: u64) -> Self {
        let evictions = CountEvictions::default();
        let counter = evictions.0.clone();
        let estimated = (max_bytes / 4096).clamp(64, 1 << 20) as usize;
        Store {
            cache: Cache::with(estimated, max_bytes, ByBytes, DefaultHashBuilder::default(), evictions),
            evictions: counter,
            max_bytes,
            occupied: AtomicBool::new(false),
            interner: Default::default(),
            admission: Default::default(),
            next_death: AtomicU64::new(u64::MAX),
            swept_moves: AtomicU64::new(u64::MAX),
            swept_slots: AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// The entry for `key` unless it is dead (a dead entry is removed).
    pub fn get(&self, key: &Key) -> Option<(Arc<Entry>, Freshness)> {
        let entry = self.cache.get(key)?;
        match entry.freshness() {
            Freshness::Dead => {
                self.cache.remove_if(key, |e| Arc::ptr_eq(e, &entry));
                None
            }
            f => Some((entry, f)),
        }
    }

    /// Inserts unless the entry is already invalidated (the fill race) or larger than the
    /// store could ever hold. Returns whether it was stored.
    pub fn insert(&self, key: Key, entry: Entry) -> bool {
        if entry.invalidated() || entry.weight() > self.max_bytes / 2 {
            return false;
        }
        let dies = self.millis(entry.dies_at());
        self.cache.insert(key, Arc::new(entry));
        self.next_death.fetch_min(dies, Ordering::SeqCst);
        self.occupied.store(true, Ordering::SeqCst);
        true
    }

    /// Removes entries that can never be served again (dead, or past every window) — unless
    /// too few can have died since the last sweep: none old enough, no invalidation since but
    /// writes to keys alone ([`super::Moves`]), and the reads of the key slots those moved
    /// number fewer than one in [`KEYS_PER_SWEEP`] entries. Returns whether it swept.
    ///
    /// A sweep visits every entry (a few cache misses each: tens of milliseconds for a store
    /// of 100 000), so a workload of reads alone never pays it, nor one whose writes each kill
    /// a key's few entries until they add up; the caller runs it away from the threads
    /// serving clients. Until then a dead entry only takes room: it is never served.
    pub fn sweep(&self, moves: super::Moves) -> bool {
        let now = Instant::now();
        let aged = self.next_death.load(Ordering::SeqCst) <= self.millis(Some(now));
        let slots = moves.slots.wrapping_sub(self.swept_slots.load(Ordering::SeqCst));
        let few = slots < (self.cache.len() as u64 / KEYS_PER_SWEEP).max(1);
        if !aged && self.swept_moves.load(Ordering::SeqCst) == moves.spread && few {
            return false;
        }
        self.swept_moves.store(moves.spread, Ordering::SeqCst);
        self.swept_slots.store(moves.slots, Ordering::SeqCst);
        // Cleared first: an insert racing the sweep either sets them again or is seen below.
        self.occupied.store(false, Ordering::SeqCst);
        self.next_death.store(u64::MAX, Ordering::SeqCst);
        let next = AtomicU64::new(u64::MAX);
        self.cache.retain(|_, e| {
            let keep = e.freshness_at(now) != Freshness::Dead;
            if keep {
                next.fetch_min(self.millis(e.dies_at()), Ordering::Relaxed);
            }
            keep
        });
        self.next_death.fetch_min(next.into_inner(), Ordering::SeqCst);
        if !self.cache.is_empty() {
            self.occupied.store(true, Ordering::SeqCst);
        }
        true
    }

    /// `at` in milliseconds after the store was made (`None`: never).
    fn millis(&self, at: Option<Instant>) -> u64 {
        at.map_or(u64::MAX, |at| u64::try_from(at.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether the store may hold entries (false only after a sweep found it empty, with
    /// nothing inserted since). Costs one atomic load.
    pub fn may_hold_entries(&self) -> bool {
        self.occupied.load(Ordering::SeqCst)
    }

    /// Removes entries matching `f`; returns how many.
    pub fn remove_where(&self, f: impl Fn(&Entry) -> bool) -> usize {
        let before = self.cache.len();
        self.cache.retain(|_, e| !f(e));
        before.saturating_sub(self.cache.len())
    }

    pub fn entries(&self) -> Vec<(Key, Arc<Entry>)> {
        self.cache.iter().collect()
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Total weight (bytes) held.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    pub fn capacity(&self) -> u64 {
        self.max_bytes
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Generations;
    use crate::cache::key::KeyBuilder;

    fn rule(ttl: u64, swr: u64, sie: u64) -> Arc<Rule> {
        Arc::new(Rule {
            stale_while_revalidate: Duration::from_secs(swr),
            stale_if_error: Duration::from_secs(sie),
            ..Rule::cache("r", Duration::from_secs(ttl))
        })
    }

    fn entry(rule: Arc<Rule>, deps: Vec<Dependency>, size: usize) -> Entry {
        Entry {
            rule,
            row_description: Bytes::new(),
            body: Bytes::from(vec![0u8; size]),
            rows: 1,
            created: Instant::now(),
            deps,
            tables: vec![],
            sql: Arc::from("SELECT 1"),
            refreshing: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            l2_key: None,
            recipe: None,
        }
    }

    fn key(s: &str) -> Key {
        KeyBuilder::new(b'Q').str(s).finish()
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_follows_ttl_and_windows() {
        let store = Store::new(1 << 20);
        store.insert(key("a"), entry(rule(10, 5, 60), vec![], 10));
        assert_eq!(store.get(&key("a")).map(|e| e.1), Some(Freshness::Fresh));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(store.get(&key("a")).map(|e| e.1), Some(Freshness::Stale));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(store.get(&key("a")).map(|e| e.1), Some(Freshness::Fallback));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(store.get(&key("a")).is_none());
        assert!(store.is_empty(), "dead entries are removed on sight");
    }

    #[test]
    fn a_row_limit_cuts_the_answer_as_postgres_would() {
        let mut body = bytes::BytesMut::new();
        for v in [b"a", b"b", b"c"] {
            crate::protocol::frame::put_frame(&mut body, b'D', &[0, 1, 0, 0, 0, 1, v[0]]);
        }
        let rows_end = body.len();
        crate::protocol::frame::put_frame(&mut body, b'C', b"SELECT 3\0");
        let e = Entry { body: body.freeze(), rows: 3, ..entry(rule(60, 0, 0), vec![], 0) };
        assert_eq!(e.answer(0), e.body);
        assert_eq!(e.answer(4), e.body, "fewer rows than the limit: the whole result");
        let three = e.answer(3);
        assert_eq!((&three[..rows_end], &three[rows_end..]), (&e.body[..rows_end], &b"s\0\0\0\x04"[..]));
        assert_eq!(e.answer(1).len(), 12 + 5, "one DataRow and PortalSuspended");
    }

    #[tokio::test]
    async fn invalidated_entries_are_never_served_or_stored() {
        let store = Store::new(1 << 20);
        let g = Generations::default();
        let t = Relation::new(Some("public"), "t");
        store.insert(key("a"), entry(rule(60, 0, 0), g.snapshot("db", std::slice::from_ref(&t), None), 10));
        let late = g.snapshot("db", std::slice::from_ref(&t), None);
        g.bump_relations(std::slice::from_ref(&t));
        assert!(store.get(&key("a")).is_none());
        assert!(!store.insert(key("b"), entry(rule(60, 0, 0), late, 10)), "a fill that raced a write is dropped");
    }

    #[tokio::test]
    async fn byte_bound_holds_under_a_flood() {
        let store = Store::new(256 * 1024);
        for i in 0..10_000 {
            store.insert(key(&format!("k{i}")), entry(rule(60, 0, 0), vec![], 1000));
            assert!(store.bytes() <= store.capacity(), "over capacity after {i}");
        }
        assert!(store.len() < 10_000 && store.len() > 50);
        assert!(store.evictions() > 0);
    }

    /// A sweep removes what died and only runs when something may have: an invalidation since
    /// the last one, or an entry past its windows.
    #[tokio::test(start_paused = true)]
    async fn a_sweep_runs_only_when_an_entry_can_have_died() {
        let store = Store::new(1 << 20);
        let g = Generations::default();
        let t = Relation::new(Some("public"), "t");
        let reads_t = || g.snapshot("db", std::slice::from_ref(&t), None);
        store.insert(key("short"), entry(rule(10, 5, 0), vec![], 10));
        store.insert(key("long"), entry(rule(600, 0, 0), reads_t(), 10));
        store.insert(key("other"), entry(rule(600, 0, 0), vec![], 10));
        assert!(store.sweep(g.moves()), "the first sweep");
        assert!(!store.sweep(g.moves()), "nothing can have died");
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(!store.sweep(g.moves()), "within its stale window");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(store.sweep(g.moves()), "past every window");
        assert_eq!(store.len(), 2);
        assert!(!store.sweep(g.moves()), "the next death is the long ones', minutes away");
        g.bump_relations(std::slice::from_ref(&t));
        assert!(store.sweep(g.moves()), "a write since");
        assert_eq!(store.len(), 1, "only what read the written table goes");
        assert!(store.get(&key("other")).is_some());
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(store.sweep(g.moves()));
        assert!(store.is_empty() && !store.may_hold_entries());
    }

    /// Writes to keys alone wait for the sweep until they killed one entry in eight; a write
    /// to a key of a relation something reads unpinned sweeps at once.
    #[tokio::test]
    async fn writes_to_keys_alone_are_swept_once_they_add_up() {
        use crate::cache::Keyed;
        use crate::query::point::KeyValue;
        use std::collections::HashSet;
        let store = Store::new(1 << 24);
        let g = Generations::default();
        let t = Relation::new(Some("public"), "t");
        let reads = |k: i64| {
            let values = [KeyValue::Int(k)];
            g.snapshot("db", std::slice::from_ref(&t), Some(Keyed { relation: &t, column: "id", values: &values }))
        };
        // 64 keys in 64 slots (two keys sharing a slot die together: a write counts both).
        let slot = |k: i64| crate::cache::generation::key_slot(&t, &KeyValue::Int(k));
        let mut taken = HashSet::new();
        let keys: Vec<i64> = (0..).filter(|k| taken.insert(slot(*k))).take(64).collect();
        let fresh = |from: i64| (from..).find(|k| !taken.contains(&slot(*k))).unwrap();
        for k in &keys {
            store.insert(key(&format!("k{k}")), entry(rule(600, 0, 0), reads(*k), 10));
        }
        assert!(store.sweep(g.moves()), "the first sweep");
        // Keys nobody read (not even through a shared slot) move no slot that counts.
        for k in (1000..).filter(|k| !taken.contains(&slot(*k))).take(100) {
            g.bump_keys(&t, "id", &[KeyValue::Int(k)]);
        }
        assert!(!store.sweep(g.moves()), "no entry died");
        for k in &keys[..7] {
            g.bump_keys(&t, "id", &[KeyValue::Int(*k)]);
        }
        assert!(!store.sweep(g.moves()), "seven of 64 dead: fewer than one in eight");
        assert_eq!(store.len(), 64, "unswept");
        g.bump_keys(&t, "id", &[KeyValue::Int(keys[7])]);
        assert_eq!(store.len(), 64);
        assert!(store.sweep(g.moves()), "eight of 64");
        assert_eq!(store.len(), 56);
        assert!(
            store.get(&key(&format!("k{}", keys[0]))).is_none() && store.get(&key(&format!("k{}", keys[8]))).is_some()
        );
        // Eight statements reading one key (other texts, protocols, roles): its write killed
        // eight entries, one in eight, and counts as such.
        let one = fresh(5000);
        for i in 0..8 {
            store.insert(key(&format!("one{i}")), entry(rule(600, 0, 0), reads(one), 10));
        }
        assert!(!store.sweep(g.moves()));
        g.bump_keys(&t, "id", &[KeyValue::Int(one)]);
        assert_eq!(store.len(), 64);
        assert!(store.get(&key("one0")).is_none(), "dead: never served, swept or not");
        assert!(store.sweep(g.moves()), "eight dead of 64");
        assert_eq!(store.len(), 56);
        // Something reads t unpinned: a write to one key may kill it, and is swept at once.
        store.insert(key("all"), entry(rule(600, 0, 0), g.snapshot("db", std::slice::from_ref(&t), None), 10));
        assert!(!store.sweep(g.moves()));
        g.bump_keys(&t, "id", &[KeyValue::Int(fresh(9000))]);
        assert!(store.sweep(g.moves()), "an unpinned read died");
        assert!(store.get(&key("all")).is_none() && store.len() == 56);
    }
}
