//! What pgcache observes, for the admin console and Prometheus at once: totals, one row per
//! normalized query (calls, time, rows, outcomes, the rule that matched or why none could, the
//! tables read, how many distinct keys it used) and writes per table.
//! Each event is recorded once here and fed to [`Metrics`] too.
//!
//! Owns the observations; may use `cache`, `policy`, `rules`, `query` and below. Nothing here
//! changes what a client receives.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::{self as m, Metrics, Outcome};
use crate::policy::Reason;
use crate::query::point::KeyValue;
use crate::rules::Rule;

/// Queries tracked at most; past that, new shapes are counted in the totals only.
const MAX_QUERIES: usize = 5000;

/// A count of distinct keys, however many: exact (hashes kept) up to 128, then a HyperLogLog
/// of 2^12 registers (about 1.6 % error, 3 KiB; at most [`MAX_QUERIES`] of them).
pub type Distinct<T> = cardinality_estimator::CardinalityEstimator<T>;

/// One request's outcome, built when it is planned and recorded when it completes.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The session's database.
    pub database: Arc<str>,
    /// The classified statements of the request (one, or all of a multi-statement Query).
    pub statements: Arc<Vec<crate::query::Classified>>,
    pub rule: Option<Arc<Rule>>,
    pub outcome: Outcome,
    /// Why it was not answered from the cache.
    pub reason: Option<Reason>,
    /// A hash of its cache key (distinct keys drive the hit-ratio estimate).
    pub key: Option<u64>,
    pub stale: bool,
    pub started: Instant,
    pub rows: u64,
}

impl Observation {
    pub fn new(database: Arc<str>, statements: Arc<Vec<crate::query::Classified>>, outcome: Outcome) -> Self {
        Observation::since(database, statements, outcome, Instant::now())
    }

    /// An observation of a statement whose answer began at `started` (hits answered together
    /// share their request's clock reading).
    pub fn since(
        database: Arc<str>,
        statements: Arc<Vec<crate::query::Classified>>,
        outcome: Outcome,
        started: Instant,
    ) -> Self {
        Observation {
            database,
            statements,
            rule: None,
            outcome,
            reason: None,
            key: None,
            stale: false,
            started,
            rows: 0,
        }
    }

    /// Answered from an entry admitted by `rule`.
    pub fn hit(&mut self, rule: &Arc<Rule>, key: u64, stale: bool, rows: u64) {
        self.outcome = Outcome::Hit;
        self.rule = Some(rule.clone());
        self.reason = None;
        self.key = Some(key);
        self.stale = stale;
        self.rows = rows;
    }

    /// Sent to Postgres to fill an entry for `rule`.
    pub fn miss(&mut self, rule: &Arc<Rule>, key: u64) {
        self.outcome = Outcome::Miss;
        self.rule = Some(rule.clone());
        self.reason = None;
        self.key = Some(key);
    }

    /// The shape the request is counted under (several statements count as one shape).
    fn fingerprint(&self) -> u64 {
        self.statements.iter().fold(0u64, |acc, c| acc.rotate_left(7) ^ c.fingerprint)
    }

    fn normalized(&self) -> Arc<str> {
        match self.statements.as_slice() {
            [one] => one.normalized.clone(),
            many => Arc::from(many.iter().map(|c| &*c.normalized).collect::<Vec<_>>().join("; ")),
        }
    }

    fn tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self.statements.iter().flat_map(|c| c.reads.iter().map(|r| r.to_string())).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// Per normalized query.
#[derive(Debug, Clone)]
pub struct QueryStat {
    pub normalized: Arc<str>,
    pub calls: u64,
    pub total: Duration,
    pub rows: u64,
    pub hits: u64,
    pub misses: u64,
    pub passthrough: u64,
    pub errors: u64,
    pub rule: Option<Arc<Rule>>,
    pub reason: Option<Reason>,
    pub tables: Vec<String>,
    /// Its distinct keys: [`hashed`](crate::cache::Key::hashed) cache keys (hits and fills), or, for reads no
    /// rule caches, of the text and parameters ([`read_hash`]). (The same key hashed both
    /// ways counts twice: a query watched both before and after it got a rule may count up
    /// to twice its keys.)
    pub keys: Distinct<u64>,
    /// The calls that counted a key in `keys` (reads the cache decided; not those a session
    /// refused it — in a transaction that wrote, say — nor executions the planner did not
    /// decide): the calls the keys are compared with.
    pub keyed_calls: u64,
    pub first_seen: Instant,
    /// The database it last ran in (the advisor reads that catalog).
    pub database: Arc<str>,
}

/// The writes seen to one table (any schema), for the advisor.
#[derive(Debug, Clone, Default)]
pub struct TableWrites {
    /// Every write.
    pub all: u64,
    /// Those that invalidated only the keys they wrote.
    pub keyed: u64,
    /// The distinct keys those wrote.
    pub keys: Distinct<KeyValue>,
}

#[derive(Debug, Default)]
struct Totals {
    statements: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    passthrough: AtomicU64,
    stale: AtomicU64,
    errors: AtomicU64,
    bytes_served: AtomicU64,
    busy_micros: AtomicU64,
}

/// Totals as numbers, for `SHOW STATS`.
#[derive(Debug, Clone, Default)]
pub struct TotalsSnapshot {
    pub uptime: Duration,
    pub statements: u64,
    pub hits: u64,
    pub misses: u64,
    pub passthrough: u64,
    pub stale: u64,
    pub errors: u64,
    pub bytes_served: u64,
    pub busy: Duration,
}

/// Tables whose writes are recorded one by one; later ones share the record of
/// [`OTHER_TABLES`].
pub const MAX_TABLES: usize = 10_000;
const OTHER_TABLES: &str = "*other*";

pub struct Stats {
    pub metrics: Arc<Metrics>,
    started: Instant,
    totals: Totals,
    /// By fingerprint.
    queries: Mutex<HashMap<u64, QueryStat, Hashed>>,
    table_writes: Mutex<HashMap<String, Written>>,
    slow: Duration,
}

/// One table's writes and the handles of its invalidation counters, registered when the table
/// is first written (a write then costs one lock and no allocation).
struct Written {
    writes: TableWrites,
    invalidations: ::metrics::Counter,
    key_invalidations: ::metrics::Counter,
}

/// The hasher of maps keyed by a hash (a cache key's, a statement's fingerprint, which a client
/// can choose): foldhash, seeded at random per map.
type Hashed = foldhash::fast::RandomState;

/// A hash of a read no rule caches — its database, user, text and parameters' values —
/// standing for its key in the advisor's count of distinct keys (there is no cache key to
/// hash). The rest of a cache key (settings, `SET ROLE`, formats) is left out: roles switched
/// within a session count as one.
pub fn read_hash(database: &str, user: &str, sql: &str, params: &[Option<bytes::Bytes>]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = crate::cache::key::hasher();
    (database, user, sql).hash(&mut h);
    params.hash(&mut h);
    h.finish()
}

impl Stats {
    pub fn new(max_table_labels: usize, slow: Duration) -> Self {
        Stats {
            metrics: Arc::new(Metrics::new(max_table_labels)),
            started: Instant::now(),
            totals: Totals::default(),
            queries: Mutex::new(HashMap::default()),
            table_writes: Mutex::new(HashMap::new()),
            slow,
        }
    }

    /// Records a completed statement; `served` is the bytes answered from the cache.
    pub fn record(&self, o: &Observation, served: u64, error: bool) {
        self.record_took(o, served, error, o.started.elapsed());
    }

    /// [`Stats::record`] of a statement that took `elapsed` (measured by the caller, once for
    /// several).
    pub fn record_took(&self, o: &Observation, served: u64, error: bool, elapsed: Duration) {
        let t = &self.totals;
        t.statements.fetch_add(1, Ordering::Relaxed);
        t.busy_micros.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let counters = o.rule.as_ref().map(|r| r.counters.get_or_init(|| self.metrics.rule_counters(&r.name)));
        match o.outcome {
            Outcome::Hit => {
                t.hits.fetch_add(1, Ordering::Relaxed);
                t.bytes_served.fetch_add(served, Ordering::Relaxed);
                if let Some(r) = &o.rule {
                    // What admission decides from (crate::cache::admission).
                    r.usage.count(true);
                }
                if let Some(c) = counters {
                    c.hits.increment(1);
                    c.served_bytes.increment(served);
                }
                if o.stale {
                    t.stale.fetch_add(1, Ordering::Relaxed);
                    counters.inspect(|c| c.stale_served.increment(1));
                }
            }
            Outcome::Miss => {
                t.misses.fetch_add(1, Ordering::Relaxed);
                counters.inspect(|c| c.misses.increment(1));
            }
            Outcome::Passthrough => {
                t.passthrough.fetch_add(1, Ordering::Relaxed);
            }
        }
        if error {
            t.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.query_duration(o.outcome, elapsed);
        if elapsed >= self.slow && o.outcome != Outcome::Hit {
            // The normalized text only: never parameter values.
            tracing::warn!(duration_ms = elapsed.as_millis() as u64, query = %o.normalized(), "slow statement");
        }
        let fingerprint = o.fingerprint();
        let mut queries = self.queries.lock();
        if !queries.contains_key(&fingerprint) && queries.len() >= MAX_QUERIES {
            return;
        }
        let q = queries.entry(fingerprint).or_insert_with(|| QueryStat {
            normalized: o.normalized(),
            calls: 0,
            total: Duration::ZERO,
            rows: 0,
            hits: 0,
            misses: 0,
            passthrough: 0,
            errors: 0,
            rule: None,
            reason: None,
            tables: o.tables(),
            keys: Distinct::new(),
            keyed_calls: 0,
            first_seen: o.started,
            database: o.database.clone(),
        });
        if !Arc::ptr_eq(&q.database, &o.database) && q.database != o.database {
            q.database = o.database.clone();
        }
        q.calls += 1;
        q.total += elapsed;
        q.rows += o.rows;
        q.errors += error as u64;
        match o.outcome {
            Outcome::Hit => q.hits += 1,
            Outcome::Miss => q.misses += 1,
            Outcome::Passthrough => q.passthrough += 1,
        }
        // A read admission forwarded is still its rule's (the observation names no rule): its
        // hits and misses stay attributed to it (`SHOW RULES`, `SHOW QUERIES`). (As for any
        // query, they are its lifetime counts, given to the rule it last had.)
        if o.rule.is_some() || !matches!(o.reason, Some(Reason::NotAdmitted)) {
            q.rule = o.rule.clone();
        }
        q.reason = o.reason.clone();
        if let Some(k) = o.key {
            q.keys.insert_hash(k);
            q.keyed_calls += 1;
        }
    }

    /// A write changed `table` (any schema).
    pub fn table_written(&self, table: &str) {
        self.written(table, |w| {
            w.writes.all += 1;
            w.invalidations.increment(1);
        });
    }

    /// A write to `table` that invalidated only the keys it wrote (also counted by
    /// [`Stats::table_written`]).
    pub fn keys_written(&self, table: &str, values: &[KeyValue]) {
        self.written(table, |w| {
            w.writes.keyed += 1;
            values.iter().for_each(|v| w.writes.keys.insert(v));
            w.key_invalidations.increment(1);
        });
    }

    /// Updates `table`'s record of writes, creating it (and its counters) the first time (at
    /// most [`MAX_TABLES`] records).
    fn written(&self, table: &str, update: impl FnOnce(&mut Written)) {
        let mut writes = self.table_writes.lock();
        if let Some(w) = writes.get_mut(table) {
            return update(w);
        }
        // Table names come from clients' SQL: past this many, further tables share one record.
        let table = if writes.len() >= MAX_TABLES { OTHER_TABLES } else { table };
        if let Some(w) = writes.get_mut(table) {
            return update(w);
        }
        let label = self.metrics.table_label(table);
        let w = writes.entry(table.to_owned()).or_insert_with(|| Written {
            writes: TableWrites::default(),
            invalidations: self.metrics.counter(m::INVALIDATIONS, &[("table", &label)]),
            key_invalidations: self.metrics.counter(m::KEY_INVALIDATIONS, &[("table", &label)]),
        });
        update(w);
    }

    /// Everything was invalidated (a write with unknown targets, or an operator's command).
    pub fn all_invalidated(&self) {
        self.metrics.counter(m::INVALIDATIONS, &[("table", "*all*")]).increment(1);
    }

    pub fn unknown_write(&self) {
        self.metrics.counter(m::UNKNOWN_WRITES, &[]).increment(1);
    }

    pub fn coalesced(&self, rule: &str) {
        self.metrics.counter(m::CACHE_COALESCED, &[("rule", rule)]).increment(1);
    }

    pub fn backend_error(&self) {
        self.metrics.backend_error();
    }

    pub fn detached(&self, delta: f64) {
        self.metrics.gauge(m::DETACHED_SESSIONS, &[]).increment(delta);
    }

    pub fn totals(&self) -> TotalsSnapshot {
        let t = &self.totals;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TotalsSnapshot {
            uptime: self.started.elapsed(),
            statements: get(&t.statements),
            hits: get(&t.hits),
            misses: get(&t.misses),
            passthrough: get(&t.passthrough),
            stale: get(&t.stale),
            errors: get(&t.errors),
            bytes_served: get(&t.bytes_served),
            busy: Duration::from_micros(get(&t.busy_micros)),
        }
    }

    pub fn queries(&self) -> Vec<QueryStat> {
        let mut v: Vec<QueryStat> = self.queries.lock().values().cloned().collect();
        v.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.normalized.cmp(&b.normalized)));
        v
    }

    pub fn table_writes(&self) -> HashMap<String, TableWrites> {
        self.table_writes.lock().iter().map(|(t, w)| (t.clone(), w.writes.clone())).collect()
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// How many keys a query draws from, judged from its `calls` and the `distinct` keys they used
/// with the keys taken as drawn evenly: the `n` for which `n·(1 − e^(−calls/n)) = distinct`
/// (the keys expected among `calls` even draws from `n`). `None` when every call used a new
/// key so far: no key was seen twice, and nothing says how many there are. Past 128 keys
/// `distinct` is a sketch's ([`Distinct`], about 1.6 % error): fewer repeats than four times
/// that (6.5 % of the keys) are not told from none.
pub fn key_space(calls: u64, distinct: u64) -> Option<f64> {
    let (c, d) = (calls as f64, distinct.max(1) as f64);
    let noise = if distinct > 128 { 0.065 * d } else { 0.0 };
    if c - d <= noise {
        return None;
    }
    let seen = |n: f64| n * -(-c / n).exp_m1();
    // `seen` grows with n, from below d at n = d towards c.
    let (mut low, mut high) = (d, 2.0 * d);
    while seen(high) < d {
        (low, high) = (high, high * 2.0);
        if high > 1e18 {
            return None;
        }
    }
    for _ in 0..64 {
        let mid = (low + high) / 2.0;
        if seen(mid) < d { low = mid } else { high = mid }
    }
    Some(high)
}

/// The fraction of calls a cache would answer for a query called `calls` times over `period`
/// with `distinct` keys seen, reading tables written `writes` times over the same period, with
/// entries living `ttl`, in a cache with room for `room` entries of its size (`None`: not
/// known).
///
/// Its keys are taken as drawn evenly from a [`key_space`] of `n`: each is read at `calls / n`
/// per period; an entry lives until its TTL or the next write (Poisson writes at rate w:
/// expected life `(1 − e^(−w·ttl)) / w`) and answers the calls for its key meanwhile; and no
/// more than `room` of the `n` keys can be held at once. Counting the keys actually seen, not
/// a bounded sample of them, is what tells a read of a million random keys (a rule would only
/// pay for fills) from one of a few hot ones. A workload skewed towards some keys hits more
/// often than this says: the estimate errs on the side of not caching.
pub fn estimated_hit_ratio(
    calls: u64,
    distinct: u64,
    writes: u64,
    period: Duration,
    ttl: Duration,
    room: Option<u64>,
) -> f64 {
    let Some(n) = key_space(calls, distinct) else { return 0.0 };
    let secs = period.as_secs_f64().max(1.0);
    let per_key = calls as f64 / secs / n;
    let w = writes as f64 / secs;
    let t = ttl.as_secs_f64();
    let life = if w > 0.0 { (1.0 - (-w * t).exp()) / w } else { t };
    let served = per_key * life;
    let ratio = served / (1.0 + served);
    match room {
        Some(room) => ratio.min(room as f64 / n),
        None => ratio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_estimate_behaves() {
        let minute = Duration::from_secs(60);
        let hot = estimated_hit_ratio(6000, 1, 0, minute, minute, None);
        assert!(hot > 0.99, "{hot}");
        let written = estimated_hit_ratio(6000, 1, 6000, minute, minute, None);
        assert!(written < 0.55 && written > 0.45, "{written}");
        // Every call a new key: nothing to say it would ever be read again.
        assert_eq!(estimated_hit_ratio(60, 60, 0, minute, minute, None), 0.0);
        // 300 000 reads of keys drawn evenly from a million (about 259 000 of them distinct)
        // over a minute, ten-minute entries: the key space is found again from the two counts…
        let n = key_space(300_000, 259_182).unwrap();
        assert!((n - 1e6).abs() < 1e4, "{n}");
        // … and with room for every key, an entry answers about three reads (what counting
        // at most 1 024 keys, as the advisor once did, made 0.99).
        let ten = Duration::from_secs(600);
        let roomy = estimated_hit_ratio(300_000, 259_182, 0, minute, ten, None);
        assert!(roomy > 0.7 && roomy < 0.8, "{roomy}");
        // With room for a tenth of them, a tenth at most.
        let cramped = estimated_hit_ratio(300_000, 259_182, 0, minute, ten, Some(100_000));
        assert!((cramped - 0.1).abs() < 0.01, "{cramped}");
        // A few hot keys are still hot.
        assert_eq!(key_space(6000, 10).map(f64::round), Some(10.0));
    }

    #[test]
    fn distinct_keys_are_counted_past_any_bound() {
        // (Hashed with the sketch's own fixed hasher here, so the figures are the same each run.)
        let mut d = Distinct::<u64>::new();
        (0..100_000u64).for_each(|i| d.insert(&i));
        let n = d.estimate() as f64;
        assert!((n - 100_000.0).abs() < 8_000.0, "{n}");
        let mut few = Distinct::<u64>::new();
        (0..20u64).for_each(|i| few.insert(&(i % 5)));
        assert_eq!(few.estimate(), 5);
        // Repeats within the sketch's error are not taken for re-use; below 128 keys, every
        // repeat counts.
        assert_eq!(key_space(100_000, 95_000), None);
        assert!(key_space(100, 99).is_some());
        // A read's text and parameters make its key.
        let sql = "SELECT v FROM t WHERE k = $1";
        let p = |v: &'static [u8]| read_hash("db", "app", sql, &[Some(bytes::Bytes::from_static(v))]);
        assert_eq!(p(b"1"), p(b"1"));
        assert_ne!(p(b"1"), p(b"2"));
        assert_ne!(read_hash("db", "app", "SELECT 1", &[None]), read_hash("db", "app", "SELECT 1", &[]));
        assert_ne!(read_hash("db", "app", "SELECT 1", &[]), read_hash("db", "other", "SELECT 1", &[]));
    }

    #[test]
    fn records_feed_totals_queries_and_metrics() {
        let s = Stats::new(10, Duration::from_secs(60));
        let o = Observation {
            rule: Some(Arc::new(Rule::cache("r", Duration::from_secs(1)))),
            key: Some(1),
            stale: true,
            rows: 1,
            ..Observation::new("db".into(), Arc::new(crate::query::classify::classify("SELECT 1")), Outcome::Hit)
        };
        s.record(&o, 40, false);
        s.record(&Observation { outcome: Outcome::Miss, key: Some(2), ..o.clone() }, 0, false);
        let t = s.totals();
        assert_eq!((t.statements, t.hits, t.misses, t.stale, t.bytes_served), (2, 1, 1, 1, 40));
        let q = &s.queries()[0];
        assert_eq!((q.calls, q.hits, q.misses, q.keys.estimate()), (2, 1, 1, 2));
        let text = s.metrics.render();
        assert!(text.contains("pgcache_cache_stale_served_total{rule=\"r\"} 1"), "{text}");
        // A read admission forwarded keeps the query its rule's; any other forward does not.
        let forwarded =
            |reason| Observation { outcome: Outcome::Passthrough, rule: None, reason: Some(reason), ..o.clone() };
        s.record(&forwarded(Reason::NotAdmitted), 0, false);
        assert_eq!(s.queries()[0].rule.as_ref().map(|r| &*r.name), Some("r"));
        s.record(&forwarded(Reason::NoMatch), 0, false);
        assert!(s.queries()[0].rule.is_none());
        // A read not decided counts a call and no key: the estimate compares keys with the
        // calls that counted one.
        s.record(&Observation { key: None, ..forwarded(Reason::Isolation) }, 0, false);
        let q = &s.queries()[0];
        assert_eq!((q.calls, q.keyed_calls, q.keys.estimate()), (5, 4, 2));
    }
}
