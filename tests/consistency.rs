//! A randomized consistency checker: clients read and write version counters through pgcache
//! concurrently; every read that starts after a write was acknowledged must see that write (or
//! a later one). It must find no violation — and it must find violations when invalidation is
//! switched off, which proves it can fail. Spread over several instances (writes through one,
//! reads through all), a read must see every write acknowledged more than the peer window
//! before it started — and without peer invalidation it does not.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{PgCluster, Proxy, rules_dir};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

const KEYS: usize = 4;
const CLIENTS: u64 = 8;
const OPS: usize = 300;

struct Outcome {
    violations: u64,
    reads: u64,
    writes: u64,
}

/// Per key, the versions acknowledged to clients and when.
type Acked = Arc<Vec<Mutex<Vec<(i64, Instant)>>>>;

/// The highest version of `key` acknowledged at least `window` before `at`.
fn floor(acked: &Acked, key: usize, at: Instant, window: Duration) -> i64 {
    acked[key].lock().iter().filter(|(_, t)| *t + window <= at).map(|(v, _)| *v).max().unwrap_or(0)
}

async fn run_checker(instances: usize, window: Duration, tweak: impl Fn(&mut pgcache::config::Config)) -> Outcome {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("consistency").await;
    let admin = cluster.admin(&db).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE counters (id int PRIMARY KEY, version int NOT NULL);
             INSERT INTO counters SELECT g, 0 FROM generate_series(0, {}) g;",
            KEYS - 1
        ))
        .await
        .unwrap();
    let dir = rules_dir(&[(
        "rules.toml",
        "[[rule]]\nname = \"counters\"\nmatch = { tables = [\"counters\"] }\nttl = \"1h\"\n",
    )]);
    let mut proxies = Vec::new();
    for _ in 0..instances {
        let mut config = Proxy::config(cluster);
        config.rules = dir.path().to_owned();
        config.rules_explicit = true;
        config.pool.max_size = CLIENTS as usize + 2;
        tweak(&mut config);
        proxies.push(Proxy::start(config).await);
    }

    let acked: Acked = Arc::new((0..KEYS).map(|_| Mutex::new(Vec::new())).collect());
    let violations = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for seed in 0..CLIENTS {
        let c = proxies[seed as usize % instances].connect(&db, &cluster.superuser()).await;
        let (acked, violations, reads, writes) = (acked.clone(), violations.clone(), reads.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let read = c.prepare("SELECT version FROM counters WHERE id = $1").await.unwrap();
            for _ in 0..OPS {
                let key = rng.random_range(0..KEYS);
                // Across instances the writes go through the first instance only, the reads
                // through all: only its invalidations keep the others fresh. (An instance's own
                // writes invalidate its own entries of the keys written, so no instance but the
                // first may write.)
                let writer = (seed as usize).is_multiple_of(instances);
                if writer && rng.random_bool(0.25) {
                    let row = c
                        .query_one(
                            "UPDATE counters SET version = version + 1 WHERE id = $1 RETURNING version",
                            &[&(key as i32)],
                        )
                        .await
                        .unwrap();
                    acked[key].lock().push((row.get::<_, i32>(0) as i64, Instant::now()));
                    writes.fetch_add(1, Ordering::Relaxed);
                } else {
                    let started = Instant::now();
                    let floor = floor(&acked, key, started, window);
                    // Both protocols: a prepared statement, and a simple query.
                    let seen: i64 = if rng.random_bool(0.5) {
                        c.query_one(&read, &[&(key as i32)]).await.unwrap().get::<_, i32>(0) as i64
                    } else {
                        let msgs =
                            c.simple_query(&format!("SELECT version FROM counters WHERE id = {key}")).await.unwrap();
                        msgs.iter()
                            .find_map(|m| match m {
                                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
                                _ => None,
                            })
                            .unwrap()
                    };
                    reads.fetch_add(1, Ordering::Relaxed);
                    if seen < floor {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Outcome {
        violations: violations.load(Ordering::Relaxed),
        reads: reads.load(Ordering::Relaxed),
        writes: writes.load(Ordering::Relaxed),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_read_after_an_acknowledged_write_sees_old_rows() {
    let o = run_checker(1, Duration::ZERO, |_| {}).await;
    assert!(o.reads > 1000 && o.writes > 300, "{} reads, {} writes", o.reads, o.writes);
    assert_eq!(
        o.violations, 0,
        "{} of {} reads saw a version older than one already acknowledged",
        o.violations, o.reads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checker_catches_stale_reads_when_invalidation_is_off() {
    let o = run_checker(1, Duration::ZERO, |c| c.cache.invalidate_on_writes = false).await;
    assert!(o.violations > 0, "with invalidation off the checker must see stale reads ({} reads)", o.reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_transaction_pooling_with_fewer_backends_than_clients_no_read_sees_old_rows() {
    let o = run_checker(1, Duration::ZERO, |c| {
        c.pool.mode = pgcache::config::PoolMode::Transaction;
        c.pool.max_size = 3;
    })
    .await;
    assert!(o.reads > 1000 && o.writes > 300, "{} reads, {} writes", o.reads, o.writes);
    assert_eq!(o.violations, 0, "{} of {} reads saw an old version", o.violations, o.reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_transaction_pooling_the_checker_catches_stale_reads_when_invalidation_is_off() {
    let o = run_checker(1, Duration::ZERO, |c| {
        c.pool.mode = pgcache::config::PoolMode::Transaction;
        c.pool.max_size = 3;
        c.cache.invalidate_on_writes = false;
    })
    .await;
    assert!(o.violations > 0, "with invalidation off the checker must see stale reads ({} reads)", o.reads);
}

/// The peer window the checker allows across instances. (Measured p99 is a few milliseconds,
/// see bench/peers.sh; this leaves room for a loaded CI machine.)
const PEER_WINDOW: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_spread_over_three_instances_see_every_acknowledged_write() {
    let o = run_checker(3, PEER_WINDOW, |_| {}).await;
    assert!(o.reads > 1000 && o.writes > 50, "{} reads, {} writes", o.reads, o.writes);
    assert_eq!(
        o.violations, 0,
        "{} of {} reads through one instance saw a version older than one acknowledged through another more than {PEER_WINDOW:?} earlier",
        o.violations, o.reads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn across_instances_the_checker_catches_stale_reads_without_peers() {
    // Same fleet, peer invalidation off: each instance invalidates for its own clients only.
    let o = run_checker(3, PEER_WINDOW, |c| c.peers.enabled = false).await;
    assert!(o.violations > 0, "without peer invalidation the checker must see stale reads ({} reads)", o.reads);
}
