//! Generation counters. Relations are identified as Postgres would resolve them when known
//! (`schema.name`), with a second counter per bare name for writes pgcache could not resolve
//! and for DDL, one per database (its epoch: moved when this instance may have missed another
//! instance's invalidations for it), and a global counter for writes whose targets are
//! unknown. Counters are interned `Arc<AtomicU64>`s, so checking an entry is a few atomic
//! loads, without locks.
//!
//! Invalidation by key: a relation has two counters, one moved by *every* write to it and
//! one moved only by writes not pinned to key values ("wide"), plus the key slots — a fixed
//! array of counters indexed by a hash of (relation, key value). A read pinned to key values
//! ([`Keyed`]) depends on the wide counter and its keys' slots, so a write to other keys
//! leaves it alone; every other read depends on the every-write counter. A write pinned to
//! keys moves the every-write counter and those slots. Two keys sharing a slot only cost an
//! extra miss; the memory is fixed ([`KEY_SLOTS`]) however many keys are written.
//!
//! Reads and writes must agree on which column is the key: a write pinned by another column
//! says nothing about the rows a read pinned by the first one saw. Each relation's key column
//! is recorded at its first keyed use; a keyed write by another column (the primary key
//! changed, and the catalog facts with it) moves the wide counter and becomes the new key
//! column, and a keyed read by another column depends on every write.

use foldhash::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::query::Relation;
use crate::query::point::KeyValue;

/// How many key slots there are (16 bytes each: the counter and when it last moved).
pub const KEY_SLOTS: usize = 1 << 16;

/// One generation counter, and when it last moved for a write: the number of the first
/// [`WalClock`] sample taken after that write committed.
#[derive(Debug, Default)]
pub struct Gen {
    value: AtomicU64,
    at: AtomicU64,
}

impl Gen {
    /// A write: notes when (before the value moves, so whoever sees it moved sees when), then
    /// moves it.
    fn bump(&self, at: u64) {
        self.at.fetch_max(at, Ordering::SeqCst);
        self.value.fetch_add(1, Ordering::AcqRel);
    }

    /// Moves it for bookkeeping (counters let go), not for a write.
    fn shift(&self) {
        self.value.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone)]
enum Counter {
    One(Arc<Gen>),
    Slot(Arc<[Gen]>, usize),
}

impl Counter {
    fn get(&self) -> &Gen {
        match self {
            Counter::One(c) => c,
            Counter::Slot(slots, i) => &slots[*i],
        }
    }
}

/// A counter an entry depends on, with the value it had when the entry's query was sent.
#[derive(Debug, Clone)]
pub struct Dependency {
    counter: Counter,
    seen: u64,
    /// When the counter last moved for a write, as of `seen`.
    at: u64,
}

impl Dependency {
    pub fn moved(&self) -> bool {
        self.counter.get().value.load(Ordering::Acquire) != self.seen
    }
}

/// The [`WalClock`] sample a replica must have replayed for a result read under `deps` to
/// show every write that moved them (0: none).
pub fn written_at(deps: &[Dependency]) -> u64 {
    deps.iter().map(|d| d.at).max().unwrap_or(0)
}

/// A read of `relation` that sees only the rows whose key (`column`) is one of `values`.
#[derive(Debug, Clone, Copy)]
pub struct Keyed<'a> {
    pub relation: &'a Relation,
    pub column: &'a str,
    pub values: &'a [KeyValue],
}

/// Every counter.
#[derive(Debug)]
pub struct Generations {
    global: Arc<Gen>,
    /// Moved by every write to the relation.
    relations: Mutex<HashMap<Relation, Arc<Gen>>>,
    /// Moved by writes to the relation not pinned to key values.
    wide: Mutex<HashMap<Relation, Arc<Gen>>>,
    names: Mutex<HashMap<String, Arc<Gen>>>,
    databases: Mutex<HashMap<String, Arc<Gen>>>,
    keys: Arc<[Gen]>,
    /// The column each relation's keys are values of.
    key_columns: Mutex<HashMap<Relation, String>>,
    /// When the last invalidation happened, against the replica monitor's samples of the
    /// primary's WAL position ([`WalClock`]).
    pub clock: Arc<WalClock>,
    /// Reads of key slots since they last moved, counted by the writes that moved them and
    /// killed nothing else ([`Moves::slots`]).
    slots_moved: AtomicU64,
    /// How many reads took each key slot since it last moved.
    read_slots: SlotReads,
}

/// Per key slot, how many reads took it since it last moved (saturating at 255): at least
/// the entries on it that a write to it kills (more when fills were dropped or replaced).
#[derive(Debug)]
struct SlotReads(Box<[AtomicU8]>);

impl Default for SlotReads {
    fn default() -> Self {
        SlotReads((0..KEY_SLOTS).map(|_| AtomicU8::new(0)).collect())
    }
}

impl SlotReads {
    /// Counts a read of `slot`, before the slot's value is read.
    fn note(&self, slot: usize) {
        let reads = &self.0[slot];
        if reads.load(Ordering::Relaxed) < u8::MAX {
            reads.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The reads of `slot` counted since it last moved, after it moved (reset to none). An
    /// approximation: a read counted just before another write moved the slot, which reads
    /// the moved value, is taken by that write, not by the one that later kills it.
    fn take(&self, slot: usize) -> u64 {
        let reads = &self.0[slot];
        if reads.load(Ordering::Relaxed) == 0 { 0 } else { u64::from(reads.swap(0, Ordering::SeqCst)) }
    }
}

/// How far the counters have moved, for the cache's sweep ([`crate::cache::Store::sweep`]).
/// A write pinned to keys kills only the entries that read those keys (and any that read its
/// relation unpinned): when nothing reads it unpinned, it moves `slots` by how many reads took
/// its keys' slots since they last moved (about as many as it killed, or more) and leaves
/// `spread` alone, so a sweep can wait until enough entries died to be worth visiting every
/// entry. Every other move — a wider write, counters let go — moves `spread`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moves {
    pub spread: u64,
    pub slots: u64,
}

/// Orders invalidations against the samples the replica monitor ([`crate::replica`]) takes
/// of the primary's WAL insert position. Samples are numbered as they start; an invalidation
/// (made only once its write committed, or once another instance said so) notes the number
/// of the first sample that starts after it, whose position is then at or past the write's
/// commit record. A replica that has replayed that position shows the write.
#[derive(Debug, Default)]
pub struct WalClock {
    started: AtomicU64,
    last_invalidation: AtomicU64,
    /// How many invalidations there have been.
    count: AtomicU64,
}

impl WalClock {
    /// Numbers a sample about to be taken.
    pub fn start_sample(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The number of the first sample that starts after now.
    pub fn next_sample(&self) -> u64 {
        self.started.load(Ordering::SeqCst) + 1
    }

    /// Something was invalidated: notes it before the counters move (so whoever sees a
    /// counter moved sees this too), and returns when, for the counters.
    fn invalidated(&self) -> u64 {
        self.settled();
        self.next_invalidation()
    }

    /// Notes an invalidation's time without counting it (a write to keys alone is counted
    /// by the slots it moved, [`Moves::slots`]).
    fn next_invalidation(&self) -> u64 {
        let at = self.next_sample();
        self.last_invalidation.fetch_max(at, Ordering::SeqCst);
        at
    }

    /// Counts an invalidation: before its counters move and again after (a sweep that read
    /// the count in between, and visited an entry before its counter moved, runs again).
    fn settled(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// The first sample taken after the last invalidation (0: none yet).
    pub fn last_invalidation(&self) -> u64 {
        self.last_invalidation.load(Ordering::SeqCst)
    }
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            global: Default::default(),
            relations: Default::default(),
            wide: Default::default(),
            names: Default::default(),
            databases: Default::default(),
            keys: (0..KEY_SLOTS).map(|_| Gen::default()).collect(),
            key_columns: Default::default(),
            clock: Default::default(),
            slots_moved: Default::default(),
            read_slots: Default::default(),
        }
    }
}

/// Counters kept per kind (relations, names, databases) before they are all let go. Their
/// keys come from clients' SQL: bounded, a flood of names costs a cache flush, not memory.
pub const MAX_COUNTERS: usize = 100_000;

/// The counter for `k`. Past [`MAX_COUNTERS`] the map is emptied and `global` moved, so every
/// entry that depended on a counter let go dies (a new counter for the same key would not
/// move for it).
fn intern<K: std::hash::Hash + Eq + Clone>(map: &Mutex<HashMap<K, Arc<Gen>>>, global: &Gen, k: &K) -> Arc<Gen> {
    with_interned(map, global, k, Arc::clone)
}

/// `f` of the counter for `k` ([`intern`]), under the map's lock.
fn with_interned<K: std::hash::Hash + Eq + Clone, R>(
    map: &Mutex<HashMap<K, Arc<Gen>>>,
    global: &Gen,
    k: &K,
    f: impl FnOnce(&Arc<Gen>) -> R,
) -> R {
    let mut map = map.lock();
    if let Some(c) = map.get(k) {
        return f(c);
    }
    if map.len() >= MAX_COUNTERS {
        map.clear();
        global.shift();
    }
    f(map.entry(k.clone()).or_default())
}

fn snap(counter: Arc<Gen>) -> Dependency {
    snap_counter(Counter::One(counter))
}

fn snap_counter(counter: Counter) -> Dependency {
    let seen = counter.get().value.load(Ordering::Acquire);
    // After the value: a write it shows is one this covers.
    let at = counter.get().at.load(Ordering::SeqCst);
    Dependency { counter, seen, at }
}

/// The slot of a key of a relation (the L2's key versions use the same slots).
pub fn key_slot(relation: &Relation, value: &KeyValue) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    relation.hash(&mut h);
    value.hash(&mut h);
    (h.finish() as usize) % KEY_SLOTS
}

impl Generations {
    /// The counters a read of `relations` in `database` depends on, as they are now.
    /// `relations` are the qualified relations the read resolved to (views expanded,
    /// partitions included); `keyed`, when the read sees only some keys' rows of one of them.
    pub fn snapshot(&self, database: &str, relations: &[Relation], keyed: Option<Keyed<'_>>) -> Vec<Dependency> {
        let mut deps = Vec::with_capacity(relations.len() * 2 + 2);
        deps.push(snap(self.global.clone()));
        deps.push(snap(intern(&self.databases, &self.global, &database.to_owned())));
        let keyed = keyed.filter(|k| self.key_column_is(k.relation, k.column));
        for r in relations {
            match keyed {
                Some(k) if k.relation == r => {
                    deps.push(snap(intern(&self.wide, &self.global, r)));
                    for v in k.values {
                        let slot = key_slot(r, v);
                        self.read_slots.note(slot);
                        deps.push(snap_counter(Counter::Slot(self.keys.clone(), slot)));
                    }
                }
                _ => deps.push(snap(intern(&self.relations, &self.global, r))),
            }
            deps.push(snap(intern(&self.names, &self.global, &r.name)));
        }
        deps
    }

    /// What has moved so far ([`Moves`]): whoever saw it unchanged knows no entry has died of
    /// a write since, and how many key slots alone moved in between.
    pub fn moves(&self) -> Moves {
        Moves {
            spread: self.clock.count.load(Ordering::SeqCst).wrapping_add(self.global.value.load(Ordering::SeqCst)),
            slots: self.slots_moved.load(Ordering::SeqCst),
        }
    }

    /// A write to these resolved relations.
    pub fn bump_relations(&self, relations: &[Relation]) {
        let at = self.clock.invalidated();
        for r in relations {
            intern(&self.relations, &self.global, r).bump(at);
            intern(&self.wide, &self.global, r).bump(at);
        }
        self.clock.settled();
    }

    /// Whether `column` is the key column of `relation` (it becomes it if it has none yet).
    fn key_column_is(&self, relation: &Relation, column: &str) -> bool {
        let mut columns = self.key_columns.lock();
        match columns.get(relation) {
            Some(c) => c == column,
            None => {
                if columns.len() >= MAX_COUNTERS {
                    // (Forgetting which column was a relation's key moves every counter.)
                    columns.clear();
                    self.global.shift();
                }
                columns.insert(relation.clone(), column.to_owned());
                true
            }
        }
    }

    /// A write to the rows of `relation` whose key (`column`) is one of `values` (and no other
    /// row, of it or of any other relation).
    pub fn bump_keys(&self, relation: &Relation, column: &str, values: &[KeyValue]) {
        if !self.key_column_is(relation, column) {
            self.key_columns.lock().insert(relation.clone(), column.to_owned());
            self.bump_relations(std::slice::from_ref(relation));
            return;
        }
        let at = self.clock.next_invalidation();
        let mut read = 0;
        for v in values {
            let slot = key_slot(relation, v);
            self.keys[slot].bump(at);
            read += self.read_slots.take(slot);
        }
        // Only what depends on the every-write counter holds it besides the map (entries,
        // fills in flight, refreshes): when nothing does, the write killed nothing but its
        // keys' readers, and the sweep need not visit every entry for them (see [`Moves`]).
        // Moved and counted under the map's lock, under which a snapshot takes the counter
        // before it reads it: one taken after this reads the moved value.
        let held = with_interned(&self.relations, &self.global, relation, |every_write| {
            every_write.bump(at);
            Arc::strong_count(every_write) > 1
        });
        if held {
            self.clock.settled();
        } else {
            self.slots_moved.fetch_add(read, Ordering::SeqCst);
        }
    }

    /// A write to every relation called `name`, in any schema (unresolved writes and DDL).
    pub fn bump_name(&self, name: &str) {
        let at = self.clock.invalidated();
        intern(&self.names, &self.global, &name.to_owned()).bump(at);
        self.clock.settled();
    }

    /// Everything read in `database` may have changed (another instance's invalidations may
    /// have been missed).
    pub fn bump_database(&self, database: &str) {
        let at = self.clock.invalidated();
        intern(&self.databases, &self.global, &database.to_owned()).bump(at);
        self.clock.settled();
    }

    /// A write whose targets are unknown: every entry dies.
    pub fn bump_all(&self) {
        let at = self.clock.invalidated();
        self.global.bump(at);
        self.clock.settled();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str, n: &str) -> Relation {
        Relation::new(Some(s), n)
    }

    fn alive(deps: &[Dependency]) -> bool {
        !deps.iter().any(Dependency::moved)
    }

    #[test]
    fn writes_kill_exactly_the_dependent_reads() {
        let g = Generations::default();
        let a = g.snapshot("db", &[rel("public", "t")], None);
        let b = g.snapshot("db", &[rel("other", "t")], None);
        let c = g.snapshot("db", &[rel("public", "u")], None);
        let elsewhere = g.snapshot("other_db", &[rel("public", "u")], None);
        g.bump_relations(&[rel("public", "t")]);
        assert!(!alive(&a));
        assert!(alive(&b), "same name in another schema is unaffected by a resolved write");
        assert!(alive(&c));
        g.bump_name("t");
        assert!(!alive(&b), "an unresolved write to t reaches every schema");
        assert!(alive(&c));
        g.bump_database("db");
        assert!(!alive(&c), "everything read in a database");
        assert!(alive(&elsewhere), "but only in that database");
        let d = g.snapshot("db", &[], None);
        g.bump_all();
        assert!(!alive(&elsewhere) && !alive(&d));
    }

    #[test]
    fn key_writes_kill_the_reads_of_their_keys_and_every_unkeyed_read() {
        let g = Generations::default();
        let t = rel("public", "t");
        let keyed = |values: &[KeyValue]| {
            g.snapshot("db", std::slice::from_ref(&t), Some(Keyed { relation: &t, column: "id", values }))
        };
        let (five, six, both) =
            (keyed(&[KeyValue::Int(5)]), keyed(&[KeyValue::Int(6)]), keyed(&[KeyValue::Int(5), KeyValue::Int(7)]));
        let whole = g.snapshot("db", std::slice::from_ref(&t), None);
        g.bump_keys(&t, "id", &[KeyValue::Int(6)]);
        assert!(alive(&five) && alive(&both), "other keys' reads live");
        assert!(!alive(&six), "the key's read dies");
        assert!(!alive(&whole), "a read of the whole table dies");
        g.bump_keys(&rel("public", "u"), "id", &[KeyValue::Int(5)]);
        assert!(alive(&five), "the same key of another table is another key");
        g.bump_keys(&t, "id", &[KeyValue::Int(7)]);
        assert!(alive(&five) && !alive(&both));
        g.bump_relations(std::slice::from_ref(&t));
        assert!(!alive(&five), "a write not pinned to keys reaches every key");
        let five = keyed(&[KeyValue::Int(5)]);
        g.bump_name("t");
        assert!(!alive(&five), "so does a write by name");
        // The key column changes (the primary key was redefined): a write by the new column
        // cannot say which old keys it touched.
        let five = keyed(&[KeyValue::Int(5)]);
        g.bump_keys(&t, "code", &[KeyValue::Int(7)]);
        assert!(!alive(&five), "a write keyed by another column reaches every key");
        let by_old = keyed(&[KeyValue::Int(5)]);
        let by_new = g.snapshot(
            "db",
            std::slice::from_ref(&t),
            Some(Keyed { relation: &t, column: "code", values: &[KeyValue::Int(8)] }),
        );
        g.bump_keys(&t, "code", &[KeyValue::Int(9)]);
        assert!(!alive(&by_old), "a read keyed by the old column depends on every write");
        assert!(alive(&by_new));
    }
}
