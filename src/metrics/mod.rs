//! Every Prometheus metric pgcache exports: names, kinds and help texts in one place (the
//! names are part of the interface; `deploy/` alerts and dashboards are checked against this
//! list), and the recorder they are kept in.
//!
//! Each server owns its own `metrics-exporter-prometheus` recorder and registers its handles
//! through it, rather than installing the `metrics` crate's process-wide global recorder: many
//! servers can then run in one process (as the tests do) with separate counts. Histograms use
//! explicit buckets, rendered as real Prometheus histograms (summaries cannot be aggregated
//! across the replicas of a sidecar). One family is kept and rendered by pgcache itself, the
//! statement durations, recorded for every statement ([`durations`] says why).
//!
//! A leaf: it imports nothing from the crate; every module above records through it.

mod durations;

use std::collections::HashSet;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use parking_lot::Mutex;

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

pub const CACHE_HITS: &str = "pgcache_cache_hits_total";
pub const CACHE_MISSES: &str = "pgcache_cache_misses_total";
pub const CACHE_STALE_SERVED: &str = "pgcache_cache_stale_served_total";
pub const CACHE_COALESCED: &str = "pgcache_cache_coalesced_total";
pub const CACHE_SERVED_BYTES: &str = "pgcache_cache_served_bytes_total";
pub const CACHE_ENTRIES: &str = "pgcache_cache_entries";
pub const CACHE_BYTES: &str = "pgcache_cache_bytes";
pub const CACHE_CAPACITY_BYTES: &str = "pgcache_cache_capacity_bytes";
pub const CACHE_EVICTIONS: &str = "pgcache_cache_evictions_total";
pub const INVALIDATIONS: &str = "pgcache_invalidations_total";
pub const KEY_INVALIDATIONS: &str = "pgcache_key_invalidations_total";
pub const UNKNOWN_WRITES: &str = "pgcache_unknown_writes_total";
pub const QUERY_DURATION: &str = "pgcache_query_duration_seconds";
pub const RUNTIME_WORKERS: &str = "pgcache_runtime_workers";
pub const CLIENT_CONNECTIONS: &str = "pgcache_client_connections";
pub const DETACHED_SESSIONS: &str = "pgcache_detached_sessions";
pub const BACKEND_CONNECTIONS: &str = "pgcache_backend_connections";
pub const POOL_WAIT: &str = "pgcache_pool_wait_seconds";
pub const THROTTLED: &str = "pgcache_throttled_statements_total";
pub const BACKEND_ERRORS: &str = "pgcache_backend_errors_total";
pub const HANDOFFS: &str = "pgcache_backend_handoffs_total";
pub const SETTINGS_REPLAYS: &str = "pgcache_settings_replays_total";
pub const LOGIN_FAILURES: &str = "pgcache_login_failures_total";
pub const PEER_REJECTED: &str = "pgcache_peer_messages_rejected_total";
pub const L2_HITS: &str = "pgcache_l2_hits_total";
pub const L2_MISSES: &str = "pgcache_l2_misses_total";
pub const L2_ERRORS: &str = "pgcache_l2_errors_total";
pub const L2_SKIPPED: &str = "pgcache_l2_skipped_total";
pub const L2_STORES: &str = "pgcache_l2_stores_total";
pub const L2_BUMPS: &str = "pgcache_l2_version_bumps_total";
pub const L2_DURATION: &str = "pgcache_l2_duration_seconds";
pub const L2_BREAKER_OPEN: &str = "pgcache_l2_breaker_open";
pub const PINS: &str = "pgcache_pins_total";
pub const RULES_RELOAD: &str = "pgcache_rules_reload_total";
pub const RULES_LOADED: &str = "pgcache_rules_loaded";
pub const WARM_STATEMENTS: &str = "pgcache_warm_statements_total";
pub const WARM_PENDING: &str = "pgcache_warm_pending";
pub const FILLS_NOT_ADMITTED: &str = "pgcache_cache_fills_not_admitted_total";
pub const REPLICA_UP: &str = "pgcache_replica_up";
pub const REPLICA_LAG: &str = "pgcache_replica_lag_bytes";
pub const REPLICA_LAG_SECONDS: &str = "pgcache_replica_lag_seconds";
pub const REPLICA_READS: &str = "pgcache_replica_reads_total";
pub const REPLICA_FALLBACKS: &str = "pgcache_replica_fallbacks_total";
pub const REPLICA_FILLS_SKIPPED: &str = "pgcache_replica_fills_skipped_total";
pub const PEER_LISTENING: &str = "pgcache_peer_listening";
pub const PEER_SENT: &str = "pgcache_peer_notifications_sent_total";
pub const PEER_RECEIVED: &str = "pgcache_peer_notifications_received_total";
pub const PEER_COALESCED: &str = "pgcache_peer_invalidations_coalesced_total";
pub const PEER_RESYNCS: &str = "pgcache_peer_resyncs_total";
pub const PEER_DELAY: &str = "pgcache_peer_invalidation_delay_seconds";

/// Every metric: name, kind, help text.
pub const ALL: &[(&str, Kind, &str)] = &[
    (CACHE_HITS, Kind::Counter, "Statements answered from the cache, by rule."),
    (CACHE_MISSES, Kind::Counter, "Cacheable statements sent to Postgres because no usable entry existed, by rule."),
    (
        CACHE_STALE_SERVED,
        Kind::Counter,
        "Hits served past their TTL (stale-while-revalidate or stale-if-error), by rule.",
    ),
    (
        CACHE_COALESCED,
        Kind::Counter,
        "Misses that waited for an identical miss in flight instead of querying, by rule.",
    ),
    (CACHE_SERVED_BYTES, Kind::Counter, "Bytes of results answered from the cache, by rule."),
    (CACHE_ENTRIES, Kind::Gauge, "Entries in the cache."),
    (CACHE_BYTES, Kind::Gauge, "Bytes held by the cache."),
    (CACHE_CAPACITY_BYTES, Kind::Gauge, "Configured cache size in bytes (cache.max_bytes)."),
    (CACHE_EVICTIONS, Kind::Counter, "Entries evicted to stay within the byte bound."),
    (RUNTIME_WORKERS, Kind::Gauge, "Threads running the sessions (worker_threads)."),
    (
        INVALIDATIONS,
        Kind::Counter,
        "Invalidations caused by writes, by table (\"*all*\" for everything, \"other\" past the label cap).",
    ),
    (
        KEY_INVALIDATIONS,
        Kind::Counter,
        "Of those, writes that invalidated only the primary keys they wrote (the rest of the table stayed cached), by table.",
    ),
    (
        UNKNOWN_WRITES,
        Kind::Counter,
        "Writes whose targets pgcache could not know (DO, CALL, volatile user functions, triggers).",
    ),
    (QUERY_DURATION, Kind::Histogram, "Statement duration as the client sees it, by outcome (hit, miss, passthrough)."),
    (CLIENT_CONNECTIONS, Kind::Gauge, "Client connections in a session."),
    (
        DETACHED_SESSIONS,
        Kind::Gauge,
        "Client sessions without a backend (Postgres unreachable; serving from the cache).",
    ),
    (BACKEND_CONNECTIONS, Kind::Gauge, "Backend connections, by state (active, idle)."),
    (POOL_WAIT, Kind::Histogram, "Time clients waited for a backend connection, by pool (database, user)."),
    (
        THROTTLED,
        Kind::Counter,
        "Statements that waited their turn under pool.max_statements_per_second, by pool (database, user).",
    ),
    (
        HANDOFFS,
        Kind::Counter,
        "Transaction pooling: backends given back to the pool at the end of a client's transaction.",
    ),
    (
        SETTINGS_REPLAYS,
        Kind::Counter,
        "Transaction pooling: backends whose session settings were reset and replayed for the client that took them.",
    ),
    (
        PINS,
        Kind::Counter,
        "Transaction pooling: sessions pinned to their backend by state that cannot move (LISTEN, WITH HOLD cursors, SQL PREPARE, advisory locks, temporary objects, LOAD, unreplayable settings), by reason.",
    ),
    (BACKEND_ERRORS, Kind::Counter, "Failures to connect to Postgres and backend connections lost mid-session."),
    (
        LOGIN_FAILURES,
        Kind::Counter,
        "Client log-ins refused: a wrong password or proof, an unknown role, a role without a usable verifier.",
    ),
    (
        WARM_STATEMENTS,
        Kind::Counter,
        "Warm-file statements re-run at start, by outcome (filled, present: already cached or found in the L2, skipped: no longer cacheable, failed).",
    ),
    (
        WARM_PENDING,
        Kind::Gauge,
        "Warm-file statements waiting for their role to log in (its credentials) before they re-run.",
    ),
    (
        FILLS_NOT_ADMITTED,
        Kind::Counter,
        "Misses not stored because their rule's entries are seldom read again and the key was not missed recently (cache.admission).",
    ),
    (
        REPLICA_UP,
        Kind::Gauge,
        "1 while a replica gets reads (checked, in recovery, within replica.max_lag_bytes and max_lag_time), by replica.",
    ),
    (REPLICA_LAG, Kind::Gauge, "Bytes of WAL a replica had not replayed when last checked, by replica."),
    (
        REPLICA_LAG_SECONDS,
        Kind::Gauge,
        "How long a replica has lacked WAL the primary had (0 when it has replayed every sampled position), by replica.",
    ),
    (REPLICA_READS, Kind::Counter, "Requests sent to a replica, by replica."),
    (
        REPLICA_FALLBACKS,
        Kind::Counter,
        "Read-only requests sent to the primary instead of a replica, by reason (behind: none had replayed the session's writes; unavailable; fill: a cache fill no replica could store; connect_failed; busy: its pool was full; primary_share: replica.primary_weight).",
    ),
    (
        REPLICA_FILLS_SKIPPED,
        Kind::Counter,
        "Cache misses a replica answered that were not stored (the replica had not replayed the last invalidation).",
    ),
    (RULES_RELOAD, Kind::Counter, "Rule reloads, by result (success, failure)."),
    (RULES_LOADED, Kind::Gauge, "Rules in force."),
    (
        PEER_LISTENING,
        Kind::Gauge,
        "1 while this instance listens for other instances' invalidations of a database (caching for it is off otherwise), by database.",
    ),
    (PEER_SENT, Kind::Counter, "Invalidation notifications published to the other instances."),
    (PEER_RECEIVED, Kind::Counter, "Invalidation notifications received from other instances and bypass triggers."),
    (L2_HITS, Kind::Counter, "L1 misses answered from the shared L2 (Redis/Valkey)."),
    (L2_MISSES, Kind::Counter, "L1 misses the L2 did not hold either."),
    (
        L2_ERRORS,
        Kind::Counter,
        "L2 calls that failed or took longer than l2.timeout (the L2 is skipped, nothing fails).",
    ),
    (L2_SKIPPED, Kind::Counter, "L2 look-ups and stores skipped while its breaker was open."),
    (L2_STORES, Kind::Counter, "Fills stored in the L2."),
    (L2_BUMPS, Kind::Counter, "L2 versions moved by writes (this instance's, other instances', bypass triggers')."),
    (L2_DURATION, Kind::Histogram, "L2 call latency, by op (lookup, store, bump)."),
    (L2_BREAKER_OPEN, Kind::Gauge, "1 while the L2's breaker is open (the L2 is not used)."),
    (
        PEER_REJECTED,
        Kind::Counter,
        "Messages on the invalidation channel dropped: not sealed with the fleet's secret, or not a pgcache message.",
    ),
    (
        PEER_COALESCED,
        Kind::Counter,
        "Committed writes whose invalidations were merged into a notification carrying others.",
    ),
    (
        PEER_RESYNCS,
        Kind::Counter,
        "Times everything cached for a database was dropped because a message may have been missed (reconnect, a silent instance).",
    ),
    (
        PEER_DELAY,
        Kind::Histogram,
        "Delay from another instance's publication (or a bypass trigger's commit) to this instance's invalidation.",
    ),
];

/// Histogram buckets, 50 µs to 10 s.
pub const BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// How a statement was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Passthrough,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Passthrough => "passthrough",
        }
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

/// One server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    tables: Mutex<HashSet<String>>,
    max_table_labels: usize,
    /// `pgcache_query_duration_seconds` per outcome, recorded per statement: kept and rendered
    /// by [`durations`], not the exporter.
    durations: durations::Durations,
    /// `pgcache_backend_handoffs_total`, registered once (counted per transaction).
    handoffs: Counter,
    /// `pgcache_cache_fills_not_admitted_total`, registered once (counted per miss of a gated
    /// rule).
    not_admitted: Counter,
}

/// One rule's counters, registered once per rule (see `Rule::counters`) rather than looked up
/// by name for every statement.
#[derive(Clone)]
pub struct RuleCounters {
    pub hits: Counter,
    pub served_bytes: Counter,
    pub stale_served: Counter,
    pub misses: Counter,
}

impl std::fmt::Debug for RuleCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuleCounters")
    }
}

impl Metrics {
    pub fn new(max_table_labels: usize) -> Self {
        let mut builder = PrometheusBuilder::new();
        for (name, kind, _) in ALL {
            if *kind == Kind::Histogram && *name != QUERY_DURATION {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full((*name).to_owned()), BUCKETS)
                    .expect("the bucket list is not empty");
            }
        }
        let recorder = builder.build_recorder();
        // (The statement durations are kept and rendered by `durations`, not the exporter.)
        for (name, kind, help) in ALL.iter().filter(|(name, ..)| *name != QUERY_DURATION) {
            let help = SharedString::from(*help);
            let key = (*name).into();
            match kind {
                Kind::Counter => recorder.describe_counter(key, None, help),
                Kind::Gauge => recorder.describe_gauge(key, None, help),
                Kind::Histogram => recorder.describe_histogram(key, Some(Unit::Seconds), help),
            }
        }
        let durations = durations::Durations::default();
        let handoffs = recorder.register_counter(&Self::key(HANDOFFS, &[]), &METADATA);
        let not_admitted = recorder.register_counter(&Self::key(FILLS_NOT_ADMITTED, &[]), &METADATA);
        Metrics { recorder, tables: Mutex::new(HashSet::new()), max_table_labels, durations, handoffs, not_admitted }
    }

    /// A miss was not stored: its rule's entries are seldom read again and its key was not
    /// seen recently ([`crate::cache::admission`]).
    pub fn not_admitted(&self) {
        self.not_admitted.increment(1);
    }

    /// Transaction pooling gave a backend back at the end of a transaction.
    pub fn handoff(&self) {
        self.handoffs.increment(1);
    }

    /// A statement of `outcome` took `took` (`pgcache_query_duration_seconds`).
    pub fn query_duration(&self, outcome: Outcome, took: std::time::Duration) {
        self.durations.record(outcome, took);
    }

    /// Registers the counters of the rule named `rule`.
    pub fn rule_counters(&self, rule: &str) -> RuleCounters {
        RuleCounters {
            hits: self.counter(CACHE_HITS, &[("rule", rule)]),
            served_bytes: self.counter(CACHE_SERVED_BYTES, &[("rule", rule)]),
            stale_served: self.counter(CACHE_STALE_SERVED, &[("rule", rule)]),
            misses: self.counter(CACHE_MISSES, &[("rule", rule)]),
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect::<Vec<_>>())
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder.register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        // Its family is rendered by `durations`: the exporter would render it a second time.
        debug_assert_ne!(name, QUERY_DURATION, "statement durations go through query_duration");
        self.recorder.register_histogram(&Self::key(name, labels), &METADATA)
    }

    /// Opening a connection to Postgres failed, or a backend was lost mid-session.
    pub fn backend_error(&self) {
        self.counter(BACKEND_ERRORS, &[]).increment(1);
    }

    /// How long clients waited for a backend connection of a pool: its histogram, which the
    /// pool keeps (registered once rather than looked up by its labels for every acquire).
    pub fn pool_wait(&self, database: &str, user: &str) -> Histogram {
        self.histogram(POOL_WAIT, &[("database", database), ("user", user)])
    }

    /// A rule reload succeeded or failed.
    pub fn rules_reloaded(&self, ok: bool) {
        self.counter(RULES_RELOAD, &[("result", if ok { "success" } else { "failure" })]).increment(1);
    }

    /// The label for a table: itself while fewer than the cap have been seen, else `other`.
    pub fn table_label(&self, table: &str) -> String {
        let mut seen = self.tables.lock();
        if seen.contains(table) {
            return table.to_owned();
        }
        if seen.len() < self.max_table_labels {
            seen.insert(table.to_owned());
            return table.to_owned();
        }
        "other".to_owned()
    }

    pub fn render(&self) -> String {
        let handle = self.recorder.handle();
        handle.run_upkeep();
        let mut text = handle.render();
        let help = ALL.iter().find(|(name, ..)| *name == QUERY_DURATION).map_or("", |(.., help)| *help);
        self.durations.render(help, &mut text);
        text
    }

    /// Folds recorded histogram samples into their buckets. The exporter keeps every sample
    /// until this runs, so the server calls it periodically whether or not anyone scrapes (and
    /// the statement durations' shards are folded too).
    pub fn upkeep(&self) {
        self.durations.fold();
        self.recorder.handle().run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_as_histograms_and_help_is_present() {
        let m = Metrics::new(2);
        m.query_duration(Outcome::Hit, std::time::Duration::from_micros(200));
        m.histogram(POOL_WAIT, &[("database", "d"), ("user", "u")]).record(0.0002);
        m.counter(CACHE_HITS, &[("rule", "r")]).increment(3);
        let text = m.render();
        assert!(text.contains("pgcache_query_duration_seconds_bucket{outcome=\"hit\",le=\"0.00025\"} 1"), "{text}");
        assert!(
            text.contains("pgcache_pool_wait_seconds_bucket{database=\"d\",user=\"u\",le=\"0.00025\"} 1"),
            "{text}"
        );
        assert!(text.contains("pgcache_cache_hits_total{rule=\"r\"} 3"), "{text}");
        assert!(text.contains("# HELP pgcache_cache_hits_total Statements answered from the cache"), "{text}");
        assert_eq!(text.matches("# TYPE pgcache_query_duration_seconds histogram").count(), 1, "{text}");
    }

    /// The durations pgcache renders itself and a histogram the exporter renders, fed the same
    /// samples, give the same buckets (as `le` strings), sum and count.
    #[test]
    fn durations_render_as_the_exporter_renders_a_histogram() {
        use std::collections::BTreeMap;
        use std::time::Duration;
        let m = Metrics::new(2);
        let exporter = m.histogram(POOL_WAIT, &[("database", "d"), ("user", "u")]);
        for v in [0.00002, 0.00005, 0.00007, 0.0003, 0.004, 0.7, 2.5, 12.0] {
            let took = Duration::from_secs_f64(v);
            m.query_duration(Outcome::Miss, took);
            exporter.record(took.as_secs_f64());
        }
        let text = m.render();
        // Each series of a family (whose lines contain `only`) as (suffix, `le`) -> value.
        let family = |prefix: &str, only: &str| -> BTreeMap<(String, String), String> {
            text.lines()
                .filter(|l| l.starts_with(prefix) && l.contains(only))
                .map(|l| {
                    let (series, value) = l.rsplit_once(' ').unwrap();
                    let suffix = series[prefix.len()..].split('{').next().unwrap().to_owned();
                    let le = series.split("le=\"").nth(1).map_or("", |r| r.split('"').next().unwrap()).to_owned();
                    ((suffix, le), value.to_owned())
                })
                .collect()
        };
        let ours = family(QUERY_DURATION, "outcome=\"miss\"");
        assert_eq!(ours.len(), BUCKETS.len() + 3, "{text}");
        assert_eq!(ours, family(POOL_WAIT, "database=\"d\""), "{text}");
    }

    #[test]
    fn table_labels_are_capped() {
        let m = Metrics::new(2);
        assert_eq!(m.table_label("a"), "a");
        assert_eq!(m.table_label("b"), "b");
        assert_eq!(m.table_label("c"), "other");
        assert_eq!(m.table_label("a"), "a");
    }

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut seen = HashSet::new();
        for (name, _, help) in ALL {
            assert!(name.starts_with("pgcache_") && seen.insert(*name) && !help.is_empty());
            // (Written as they are where pgcache renders a family itself: nothing to escape.)
            assert!(!help.contains(['\\', '\n']), "{name}");
        }
    }
}
