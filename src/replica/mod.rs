//! Streaming replicas (`--replica`): where a read may go instead of the primary, and when.
//!
//! The monitor ([`monitor`]) samples the primary's WAL insert position and each replica's
//! replay position every `replica.check_interval`. Samples of the primary are numbered by the
//! [`WalClock`] that invalidations are also noted on, so "the first sample taken after this
//! write committed" has a number the moment the write is seen, and a WAL position as soon as
//! that sample returns — no round trip on the write's path. A position read after the commit
//! is at or past its commit record; once a replica has replayed it, every new snapshot there
//! shows the write (Postgres docs, "Hot Standby").
//!
//! - A session's read goes to a replica only if that replica has replayed the position that
//!   follows the session's last committed write (`read_your_writes = "session"`), or every
//!   write this instance saw (`"causal"`); otherwise to the primary. A replica down, not in
//!   recovery, or more than `max_lag_bytes` behind gets nothing.
//! - A cache fill is stored from a replica only if that replica had replayed, before the
//!   statement was sent, the position that follows the last write that moved a generation
//!   counter the fill depends on ([`Replicas::fill_storable`]; each counter keeps the sample
//!   number of its last move, [`crate::cache::generation::Gen`]): those writes are then in
//!   what the replica read, so the fill cannot bring back rows their invalidations removed.
//!   Writes to other tables, or to other keys of a table read by key, do not hold it back.
//!
//! Which statements may go to a replica at all is [`route::eligible`]'s to say.

pub mod monitor;
pub mod route;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::{Credentials, Endpoint, Pools};
use crate::cache::generation::WalClock;
use crate::config::{PoolConfig, ReadYourWrites, ReplicasConfig};
use crate::metrics::{self, Metrics};
use crate::net::tls::TlsError;

/// How many samples of the primary's position are kept (at the default interval, 25 s).
const SAMPLES: usize = 256;

/// What the monitor last found a replica to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Not checked yet.
    Unknown = 0,
    Up = 1,
    /// Further behind than `max_lag_bytes`.
    Lagging = 2,
    /// Unreachable, or not a standby (promoted, or misconfigured).
    Down = 3,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Up,
            2 => State::Lagging,
            3 => State::Down,
            _ => State::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Lagging => "lagging",
            State::Down => "down",
        }
    }
}

/// One replica: its pools and what the monitor knows of it.
pub struct Node {
    /// `host:port`, for logs, metrics and `SHOW REPLICAS`.
    pub name: String,
    pub pools: Pools,
    pub weight: u32,
    state: AtomicU8,
    /// The replay position last read (bytes of WAL).
    replay: AtomicU64,
    lag: AtomicU64,
    /// How long it has lacked WAL the primary had, in microseconds.
    lag_micros: AtomicU64,
    /// Since when it has lacked WAL the primary had flushed (`None`: caught up).
    lacking_since: Mutex<Option<Instant>>,
    /// Reads sent to it.
    pub reads: AtomicU64,
    /// Why its last check failed.
    pub last_error: Mutex<Option<String>>,
}

impl Node {
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn replay(&self) -> u64 {
        self.replay.load(Ordering::Acquire)
    }

    pub fn lag(&self) -> u64 {
        self.lag.load(Ordering::Relaxed)
    }

    /// How long it has lacked WAL the primary had, when last checked.
    pub fn lag_time(&self) -> Duration {
        Duration::from_micros(self.lag_micros.load(Ordering::Relaxed))
    }
}

/// One reading of the primary's WAL positions.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Its number on the [`WalClock`], taken before it was asked for.
    number: u64,
    /// `pg_current_wal_insert_lsn()`: at or past every commit record before the sample, what
    /// a read after those writes waits for (a record not yet flushed included: the safe side).
    insert: u64,
    /// `pg_current_wal_flush_lsn()`: what a replica could have received, what lag is measured
    /// against (WAL inserted but not yet flushed is no replica's fault).
    flush: u64,
    at: Instant,
}

/// Every replica, the primary's position samples, and the routing decisions made from them.
pub struct Replicas {
    pub nodes: Vec<Node>,
    config: ReplicasConfig,
    clock: Arc<WalClock>,
    /// The primary's positions, oldest first.
    samples: Mutex<VecDeque<Sample>>,
    /// `causal`: the first sample after the last write this instance saw.
    last_write: AtomicU64,
    /// The first sample after the last schema change this instance saw.
    last_ddl: AtomicU64,
    turn: AtomicUsize,
    metrics: Arc<Metrics>,
    /// A read went to the primary only because no sample after its session's write had been
    /// taken, or replayed, yet: the monitor checks again soon rather than at its next tick.
    pub(super) wanted: tokio::sync::Notify,
}

/// Why an eligible read went to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No replica has replayed what the read must see.
    Behind,
    /// No replica is up.
    Unavailable,
    /// A cache fill no replica could store (behind the last invalidation).
    Fill,
    /// Connecting to the chosen replica failed.
    ConnectFailed,
    /// The chosen replica's pool had no free connection.
    Busy,
    /// The read fell to the primary's share (`replica.primary_weight`).
    PrimaryShare,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::Behind => "behind",
            Fallback::Unavailable => "unavailable",
            Fallback::Fill => "fill",
            Fallback::ConnectFailed => "connect_failed",
            Fallback::Busy => "busy",
            Fallback::PrimaryShare => "primary_share",
        }
    }
}

impl Replicas {
    pub fn new(
        config: &ReplicasConfig,
        pool: &PoolConfig,
        credentials: &Arc<Credentials>,
        verify_interval: Duration,
        clock: Arc<WalClock>,
        metrics: Arc<Metrics>,
    ) -> Result<Replicas, TlsError> {
        let mut nodes = Vec::with_capacity(config.nodes.len());
        for n in &config.nodes {
            let endpoint = Arc::new(Endpoint::new(&n.upstream, pool.connect_timeout)?);
            let mut pools = Pools::new(pool.clone(), endpoint, verify_interval, metrics.clone());
            // The logins clients proved are good on a physical replica too: same roles.
            pools.credentials = credentials.clone();
            nodes.push(Node {
                name: n.upstream.describe(),
                pools,
                weight: n.weight,
                state: AtomicU8::new(State::Unknown as u8),
                replay: AtomicU64::new(0),
                lag: AtomicU64::new(0),
                lag_micros: AtomicU64::new(0),
                lacking_since: Mutex::new(None),
                reads: AtomicU64::new(0),
                last_error: Mutex::new(None),
            });
        }
        Ok(Replicas {
            nodes,
            config: config.clone(),
            clock,
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            last_write: AtomicU64::new(0),
            last_ddl: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
            metrics,
            wanted: tokio::sync::Notify::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn config(&self) -> &ReplicasConfig {
        &self.config
    }

    /// The primary's position in the first sample numbered `sample` or later, if it has
    /// returned (0: nothing to wait for).
    pub fn position_after(&self, sample: u64) -> Option<u64> {
        if sample == 0 {
            return Some(0);
        }
        let samples = self.samples.lock();
        samples.iter().find(|s| s.number >= sample).map(|s| s.insert)
    }

    /// The primary's latest sampled (flushed) position.
    pub fn primary_position(&self) -> Option<u64> {
        self.samples.lock().back().map(|s| s.flush)
    }

    /// How long replica `i`, which has replayed up to `replay`, has lacked WAL the primary had
    /// flushed: since the first sample past `replay` was read (zero if none is); recorded on
    /// the replica, with its metric. Measured from samples, so an idle primary costs a
    /// caught-up replica nothing, unlike the age of its last replayed transaction. When even
    /// the oldest sample kept is past `replay`, the replica has lacked WAL since before it: the
    /// earlier time it was already known to lack it stands.
    pub fn lag_time(&self, i: usize, replay: u64) -> Duration {
        let since = {
            let samples = self.samples.lock();
            samples.iter().position(|s| s.flush > replay).map(|at| (at, samples[at].at))
        };
        let node = &self.nodes[i];
        let mut lacking = node.lacking_since.lock();
        *lacking = match since {
            None => None,
            Some((0, at)) => Some(lacking.map_or(at, |before| before.min(at))),
            Some((_, at)) => Some(at),
        };
        let lag = lacking.map_or(Duration::ZERO, |t| t.elapsed());
        node.lag_micros.store(lag.as_micros() as u64, Ordering::Relaxed);
        self.metrics.gauge(metrics::REPLICA_LAG_SECONDS, &[("replica", node.name.as_str())]).set(lag.as_secs_f64());
        lag
    }

    /// A session's write committed just now: the sample its reads must wait for.
    pub fn note_write(&self) -> u64 {
        let sample = self.clock.next_sample();
        self.last_write.fetch_max(sample, Ordering::SeqCst);
        sample
    }

    /// A session's schema change committed just now: every read waits for a replica that has
    /// it (a table or column the replica lacks would be an error, not a stale row).
    pub fn note_ddl(&self) {
        self.last_ddl.fetch_max(self.clock.next_sample(), Ordering::SeqCst);
    }

    /// What a read of a session whose last write needs `own` must see, by `read_your_writes`
    /// (and, whatever it says, the last schema change this instance saw).
    pub fn needs(&self, own: u64) -> u64 {
        match self.config.read_your_writes {
            ReadYourWrites::Off => 0,
            ReadYourWrites::Session => own,
            // Another instance's write is heard of as an invalidation.
            ReadYourWrites::Causal => {
                own.max(self.last_write.load(Ordering::SeqCst)).max(self.clock.last_invalidation())
            }
        }
        .max(self.last_ddl.load(Ordering::SeqCst))
    }

    /// A replica for a read that must see the sample `need` (see [`Replicas::needs`]),
    /// weighted round robin over those that are up and have replayed it; `fill`: the read
    /// may fill the cache, whose counters last moved for a write at this sample, so only a
    /// replica that could store it will do. Counts the outcome.
    pub fn choose(&self, need: u64, fill: Option<u64>) -> Result<usize, Fallback> {
        let up: Vec<usize> =
            (0..self.nodes.len()).filter(|&i| self.nodes[i].weight > 0 && self.nodes[i].state() == State::Up).collect();
        if up.is_empty() {
            return Err(self.fell_back(Fallback::Unavailable));
        }
        let Some(required) = self.position_after(need) else {
            self.wanted.notify_one();
            return Err(self.fell_back(Fallback::Behind));
        };
        let mut ready: Vec<usize> = up.into_iter().filter(|&i| self.nodes[i].replay() >= required).collect();
        if ready.is_empty() {
            self.wanted.notify_one();
            return Err(self.fell_back(Fallback::Behind));
        }
        if let Some(at) = fill {
            ready.retain(|&i| self.fill_storable(i, at));
            if ready.is_empty() {
                return Err(self.fell_back(Fallback::Fill));
            }
        }
        let total: u64 = ready.iter().map(|&i| u64::from(self.nodes[i].weight)).sum();
        let primary = u64::from(self.config.primary_weight);
        let mut pick = (self.turn.fetch_add(1, Ordering::Relaxed) as u64) % (total + primary);
        if pick >= total {
            return Err(self.fell_back(Fallback::PrimaryShare));
        }
        let chosen = ready
            .iter()
            .copied()
            .find(|&i| {
                let w = u64::from(self.nodes[i].weight);
                if pick < w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .unwrap_or(ready[0]);
        Ok(chosen)
    }

    /// Counts a read that went to the primary although it could have gone to a replica.
    pub fn fell_back(&self, why: Fallback) -> Fallback {
        self.metrics.counter(metrics::REPLICA_FALLBACKS, &[("reason", why.as_str())]).increment(1);
        why
    }

    /// Counts a read sent to replica `i`.
    pub fn routed(&self, i: usize) {
        let node = &self.nodes[i];
        node.reads.fetch_add(1, Ordering::Relaxed);
        self.metrics.counter(metrics::REPLICA_READS, &[("replica", node.name.as_str())]).increment(1);
    }

    /// Whether a fill computed on replica `i` now may be stored: the replica had replayed,
    /// when last checked (before the fill's statement is sent), the position that follows the
    /// last write that moved the counters the fill depends on — `at`, read with the fill's
    /// snapshot of them ([`crate::cache::generation::written_at`]).
    pub fn fill_storable(&self, i: usize, at: u64) -> bool {
        if !self.config.check_fills {
            return true;
        }
        let replay = self.nodes[i].replay();
        match self.position_after(at) {
            Some(required) => replay >= required,
            None => false,
        }
    }

    /// Counts a fill a replica served that was not stored.
    pub fn fill_skipped(&self) {
        self.metrics.counter(metrics::REPLICA_FILLS_SKIPPED, &[]).increment(1);
    }

    fn sampled(&self, number: u64, insert: u64, flush: u64) {
        let mut samples = self.samples.lock();
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(Sample { number, insert, flush, at: Instant::now() });
    }

    fn set_state(&self, i: usize, state: State, replay: Option<u64>, error: Option<String>) {
        let node = &self.nodes[i];
        if let Some(replay) = replay {
            node.replay.store(replay, Ordering::Release);
            let lag = self.primary_position().map_or(0, |p| p.saturating_sub(replay));
            node.lag.store(lag, Ordering::Relaxed);
            self.metrics.gauge(metrics::REPLICA_LAG, &[("replica", node.name.as_str())]).set(lag as f64);
        }
        let before = State::from_u8(node.state.swap(state as u8, Ordering::AcqRel));
        if before == State::Down && state != State::Down {
            node.pools.all().iter().for_each(|p| p.forget_failure());
        }
        if before != state {
            match &error {
                Some(e) => {
                    tracing::warn!(replica = %node.name, state = state.as_str(), error = %e, "replica state changed")
                }
                None => tracing::info!(replica = %node.name, state = state.as_str(), "replica state changed"),
            }
        }
        let up = if state == State::Up { 1.0 } else { 0.0 };
        self.metrics.gauge(metrics::REPLICA_UP, &[("replica", node.name.as_str())]).set(up);
        *node.last_error.lock() = error;
    }

    /// Periodic upkeep of the replicas' pools.
    pub async fn maintain(&self) {
        for node in &self.nodes {
            node.pools.maintain().await;
        }
    }

    /// Closes idle connections and refuses new leases (shutdown).
    pub async fn close(&self) {
        for node in &self.nodes {
            node.pools.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReplicaNode, Upstream};

    fn replicas(n: usize, mode: ReadYourWrites) -> (Replicas, Arc<WalClock>) {
        with_clock(n, mode, Arc::new(WalClock::default()))
    }

    fn with_clock(n: usize, mode: ReadYourWrites, clock: Arc<WalClock>) -> (Replicas, Arc<WalClock>) {
        let config = ReplicasConfig {
            nodes: (0..n)
                .map(|i| ReplicaNode {
                    upstream: format!("postgres://u@127.0.0.1:{}/db", 6000 + i).parse::<Upstream>().unwrap(),
                    weight: 1,
                })
                .collect(),
            max_lag_bytes: 1000,
            max_lag_time: None,
            check_interval: Duration::from_millis(100),
            check_timeout: Duration::from_secs(1),
            read_your_writes: mode,
            primary_weight: 0,
            check_fills: true,
        };
        let pool = crate::config::Config::load(&Default::default()).unwrap().pool;
        let r = Replicas::new(
            &config,
            &pool,
            &Arc::new(Credentials::new(Duration::from_secs(60))),
            Duration::from_secs(60),
            clock.clone(),
            Arc::new(Metrics::new(10)),
        )
        .unwrap();
        (r, clock)
    }

    #[test]
    fn a_read_after_a_write_waits_for_a_sample_taken_after_it_and_for_its_replay() {
        let (r, clock) = replicas(1, ReadYourWrites::Session);
        r.sampled(clock.start_sample(), 100, 100);
        r.set_state(0, State::Up, Some(100), None);
        assert_eq!(r.choose(0, None), Ok(0), "no write: any replica that is up");
        let need = r.note_write();
        assert_eq!(r.choose(r.needs(need), None), Err(Fallback::Behind), "no sample taken after the write yet");
        r.sampled(clock.start_sample(), 150, 150);
        assert_eq!(r.choose(r.needs(need), None), Err(Fallback::Behind), "replayed 100 < 150");
        r.set_state(0, State::Up, Some(150), None);
        assert_eq!(r.choose(r.needs(need), None), Ok(0));
        assert_eq!(r.needs(0), 0, "session mode: another session's read waits for nothing");
    }

    #[test]
    fn causal_reads_wait_for_every_write_and_off_for_none() {
        let (r, clock) = replicas(1, ReadYourWrites::Causal);
        r.sampled(clock.start_sample(), 100, 100);
        r.set_state(0, State::Up, Some(100), None);
        let _ = r.note_write();
        assert_eq!(r.choose(r.needs(0), None), Err(Fallback::Behind), "another session's write counts");
        let (off, clock) = replicas(1, ReadYourWrites::Off);
        off.sampled(clock.start_sample(), 100, 100);
        off.set_state(0, State::Up, Some(50), None);
        let need = off.note_write();
        assert_eq!(off.choose(off.needs(need), None), Ok(0));
    }

    #[test]
    fn fills_are_stored_only_from_a_replica_past_the_writes_they_depend_on() {
        use crate::query::Relation;
        let g = crate::cache::Generations::default();
        let (r, clock) = with_clock(2, ReadYourWrites::Session, g.clock.clone());
        let (t, u) = (Relation::new(Some("public"), "t"), Relation::new(Some("public"), "u"));
        let at =
            |rel: &Relation| crate::cache::generation::written_at(&g.snapshot("db", std::slice::from_ref(rel), None));
        r.sampled(clock.start_sample(), 100, 100);
        r.set_state(0, State::Up, Some(100), None);
        r.set_state(1, State::Up, Some(100), None);
        assert_eq!(at(&t), 0, "nothing written yet");
        assert!(r.fill_storable(0, at(&t)));
        g.bump_relations(std::slice::from_ref(&t));
        assert!(!r.fill_storable(0, at(&t)), "no sample after the write yet");
        assert!(r.fill_storable(0, at(&u)), "a read of another table does not wait for it");
        r.sampled(clock.start_sample(), 200, 200);
        r.set_state(1, State::Up, Some(200), None);
        assert!(!r.fill_storable(0, at(&t)));
        assert!(r.fill_storable(1, at(&t)));
        assert_eq!(r.choose(0, Some(at(&t))), Ok(1), "a fill goes where it can be stored");
        r.set_state(1, State::Lagging, Some(200), None);
        assert_eq!(r.choose(0, Some(at(&t))), Err(Fallback::Fill));
        r.set_state(0, State::Down, None, Some("gone".into()));
        assert_eq!(r.choose(0, None), Err(Fallback::Unavailable));
    }

    #[test]
    fn reads_are_spread_by_weight() {
        let (mut r, clock) = replicas(2, ReadYourWrites::Session);
        r.nodes[1].weight = 3;
        r.sampled(clock.start_sample(), 1, 1);
        r.set_state(0, State::Up, Some(1), None);
        r.set_state(1, State::Up, Some(1), None);
        let picks: Vec<usize> = (0..8).map(|_| r.choose(0, None).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 2);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 6);
    }

    #[test]
    fn the_primary_takes_its_weight_of_the_reads_replicas_could_take() {
        let (mut r, clock) = replicas(2, ReadYourWrites::Session);
        r.config.primary_weight = 2;
        r.nodes[1].weight = 3;
        r.sampled(clock.start_sample(), 1, 1);
        r.set_state(0, State::Up, Some(1), None);
        r.set_state(1, State::Up, Some(1), None);
        let picks: Vec<Result<usize, Fallback>> = (0..12).map(|_| r.choose(0, None)).collect();
        assert_eq!(picks.iter().filter(|p| **p == Ok(0)).count(), 2);
        assert_eq!(picks.iter().filter(|p| **p == Ok(1)).count(), 6);
        assert_eq!(picks.iter().filter(|p| **p == Err(Fallback::PrimaryShare)).count(), 4);
        // With no replica ready the primary takes everything, as without a share.
        r.set_state(0, State::Down, None, Some("gone".into()));
        r.set_state(1, State::Down, None, Some("gone".into()));
        assert_eq!(r.choose(0, None), Err(Fallback::Unavailable));
    }

    #[test]
    fn time_lag_counts_from_the_first_sample_a_replica_lacks() {
        let (r, clock) = replicas(1, ReadYourWrites::Session);
        r.sampled(clock.start_sample(), 100, 100);
        r.sampled(clock.start_sample(), 100, 100);
        assert_eq!(r.lag_time(0, 100), Duration::ZERO, "an idle primary: no lag however old the samples");
        r.sampled(clock.start_sample(), 150, 150);
        std::thread::sleep(Duration::from_millis(2));
        assert!(r.lag_time(0, 100) >= Duration::from_millis(2), "lacking the 150 sample since it was read");
        // Stuck longer than the samples kept: the time it was first seen lacking stands.
        for _ in 0..SAMPLES {
            r.sampled(clock.start_sample(), 200, 200);
        }
        assert!(r.lag_time(0, 100) >= Duration::from_millis(2), "the 150 sample is gone; the lag is not");
        assert_eq!(r.lag_time(0, 200), Duration::ZERO);
        assert_eq!(r.nodes[0].lag_time(), Duration::ZERO);
    }
}
