//! What pgcache observes, for the admin console and Prometheus at once: totals, one row per
//! normalized query (calls, time, rows, outcomes, the rule that matched or why none could, the
//! tables read, how many distinct keys it used) and writes per table.
//! Each event is recorded once here and fed to [`Metrics`] too.
//!
//! Owns the observations; may use `cache`, `policy`, `rules`, `query` and below. Nothing here
//! changes what a client receives.

use std::collections::{HashMap, HashSet};
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
/// Distinct keys counted per query at most.
const MAX_KEYS: usize = 1024;

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
    /// [`key_hash`]es.
    pub keys: HashSet<u64, Hashed>,
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
    /// The distinct keys those wrote (up to a bound).
    pub keys: HashSet<KeyValue>,
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

/// A hash of a cache key, for this process only (admission, statistics, an observation's
/// key): foldhash, a fraction of SipHash's cost on keys of tens to hundreds of bytes, seeded at
/// random once per process.
pub fn key_hash(key: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    static STATE: std::sync::LazyLock<foldhash::quality::RandomState> = std::sync::LazyLock::new(Default::default);
    STATE.hash_one(key)
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
        self.metrics.query_duration(o.outcome).record(elapsed.as_secs_f64());
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
            keys: HashSet::default(),
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
        if let Some(k) = o.key
            && q.keys.len() < MAX_KEYS
        {
            q.keys.insert(k);
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
            for v in values.iter().take(MAX_KEYS.saturating_sub(w.writes.keys.len())) {
                w.writes.keys.insert(*v);
            }
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

/// The fraction of calls a cache would answer for a query called `calls` times over `period`
/// with `keys` distinct keys, reading tables written `writes` times over the same period, with
/// entries living `ttl`: each entry lives until its TTL or the next write (Poisson writes at
/// rate w: expected life (1 - e^{-w·ttl}) / w), and answers the calls for its key meanwhile.
pub fn estimated_hit_ratio(calls: u64, keys: usize, writes: u64, period: Duration, ttl: Duration) -> f64 {
    let secs = period.as_secs_f64().max(1.0);
    let per_key = calls as f64 / secs / keys.max(1) as f64;
    let w = writes as f64 / secs;
    let t = ttl.as_secs_f64();
    let life = if w > 0.0 { (1.0 - (-w * t).exp()) / w } else { t };
    let served = per_key * life;
    served / (1.0 + served)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_estimate_behaves() {
        let minute = Duration::from_secs(60);
        let hot = estimated_hit_ratio(6000, 1, 0, minute, minute);
        assert!(hot > 0.99, "{hot}");
        let written = estimated_hit_ratio(6000, 1, 6000, minute, minute);
        assert!(written < 0.55 && written > 0.45, "{written}");
        let spread = estimated_hit_ratio(60, 1000, 0, minute, minute);
        assert!(spread < 0.1, "{spread}");
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
        assert_eq!((q.calls, q.hits, q.misses, q.keys.len()), (2, 1, 1, 2));
        let text = s.metrics.render();
        assert!(text.contains("pgcache_cache_stale_served_total{rule=\"r\"} 1"), "{text}");
        // A read admission forwarded keeps the query its rule's; any other forward does not.
        let forwarded =
            |reason| Observation { outcome: Outcome::Passthrough, rule: None, reason: Some(reason), ..o.clone() };
        s.record(&forwarded(Reason::NotAdmitted), 0, false);
        assert_eq!(s.queries()[0].rule.as_ref().map(|r| &*r.name), Some("r"));
        s.record(&forwarded(Reason::NoMatch), 0, false);
        assert!(s.queries()[0].rule.is_none());
    }
}
