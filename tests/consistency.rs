//! A randomized consistency checker: clients read and write version counters through pgcache
//! concurrently; every read that starts after a write was acknowledged must see that write (or
//! a later one). It must find no violation — and it must find violations when invalidation is
//! switched off, which proves it can fail.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use common::{PgCluster, Proxy, rules_dir};
use rand::{Rng, SeedableRng};

const KEYS: usize = 4;
const CLIENTS: u64 = 8;
const OPS: usize = 300;

struct Outcome {
    violations: u64,
    reads: u64,
    writes: u64,
}

async fn run_checker(invalidate: bool) -> Outcome {
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
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    config.cache.invalidate_on_writes = invalidate;
    config.pool.max_size = CLIENTS as usize + 2;
    let proxy = Proxy::start(config).await;

    // The highest version acknowledged to any client, per key.
    let acked: Arc<Vec<AtomicI64>> = Arc::new((0..KEYS).map(|_| AtomicI64::new(0)).collect());
    let violations = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let writes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for seed in 0..CLIENTS {
        let c = proxy.connect(&db, &cluster.superuser()).await;
        let (acked, violations, reads, writes) = (acked.clone(), violations.clone(), reads.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let read = c.prepare("SELECT version FROM counters WHERE id = $1").await.unwrap();
            for _ in 0..OPS {
                let key = rng.random_range(0..KEYS);
                if rng.random_bool(0.25) {
                    let row = c
                        .query_one(
                            "UPDATE counters SET version = version + 1 WHERE id = $1 RETURNING version",
                            &[&(key as i32)],
                        )
                        .await
                        .unwrap();
                    acked[key].fetch_max(row.get::<_, i32>(0) as i64, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::Relaxed);
                } else {
                    let floor = acked[key].load(Ordering::SeqCst);
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
    let o = run_checker(true).await;
    assert!(o.reads > 1000 && o.writes > 300, "{} reads, {} writes", o.reads, o.writes);
    assert_eq!(
        o.violations, 0,
        "{} of {} reads saw a version older than one already acknowledged",
        o.violations, o.reads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checker_catches_stale_reads_when_invalidation_is_off() {
    let o = run_checker(false).await;
    assert!(o.violations > 0, "with invalidation off the checker must see stale reads ({} reads)", o.reads);
}
