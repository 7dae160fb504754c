//! The randomized read-after-write checker (tests/consistency.rs, tests/l2.rs): clients read
//! and write version counters through one or more pgcache instances concurrently; a read that
//! starts more than `window` after a write was acknowledged must see it (or a later one).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};

use super::{PgCluster, Proxy, rules_dir};

pub const KEYS: usize = 4;
const CLIENTS: u64 = 8;
const OPS: usize = 300;

pub struct Outcome {
    pub violations: u64,
    pub reads: u64,
    pub writes: u64,
}

/// Per key, the versions acknowledged to clients and when.
type Acked = Arc<Vec<Mutex<Vec<(i64, Instant)>>>>;

/// The highest version of `key` acknowledged at least `window` before `at`.
fn floor(acked: &Acked, key: usize, at: Instant, window: Duration) -> i64 {
    acked[key].lock().iter().filter(|(_, t)| *t + window <= at).map(|(v, _)| *v).max().unwrap_or(0)
}

/// The version of `key` read through `c`.
async fn version(c: &tokio_postgres::Client, key: usize) -> i64 {
    let row = c.query_one("SELECT version FROM counters WHERE id = $1", &[&(key as i32)]).await.unwrap();
    row.get::<_, i32>(0) as i64
}

pub async fn run_checker(instances: usize, window: Duration, tweak: impl Fn(&mut pgcache::config::Config)) -> Outcome {
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
    if instances > 1 {
        // A phase that does not depend on timing: every instance caches each key, one writes
        // it, and once the window has passed every instance reads it again. An instance that
        // did not hear of the write is certain to serve its entry (an hour's TTL).
        let mut clients = Vec::new();
        for p in &proxies {
            clients.push(p.connect(&db, &cluster.superuser()).await);
        }
        for key in 0..KEYS {
            for c in &clients {
                version(c, key).await;
            }
            let row = clients[0]
                .query_one(
                    "UPDATE counters SET version = version + 1 WHERE id = $1 RETURNING version",
                    &[&(key as i32)],
                )
                .await
                .unwrap();
            acked[key].lock().push((row.get::<_, i32>(0) as i64, Instant::now()));
            writes.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(window + Duration::from_millis(50)).await;
            for c in &clients[1..] {
                let floor = floor(&acked, key, Instant::now(), window);
                reads.fetch_add(1, Ordering::Relaxed);
                if version(c, key).await < floor {
                    violations.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    Outcome {
        violations: violations.load(Ordering::Relaxed),
        reads: reads.load(Ordering::Relaxed),
        writes: writes.load(Ordering::Relaxed),
    }
}
