//! A randomized consistency checker: clients read and write version counters through pgcache
//! concurrently; every read that starts after a write was acknowledged must see that write (or
//! a later one). It must find no violation — and it must find violations when invalidation is
//! switched off, which proves it can fail. Spread over several instances (writes through one,
//! reads through all), a read must see every write acknowledged more than the peer window
//! before it started — and without peer invalidation it does not.

mod common;

use std::time::Duration;

use common::checker::{KEYS, run_checker};
use common::{PgCluster, Proxy, rules_dir};
use rand::{Rng, SeedableRng};

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
    // The checker's last phase makes this certain, whatever the timing: each key cached by
    // every instance, written through one, read through the two others after the window.
    let o = run_checker(3, PEER_WINDOW, |c| c.peers.enabled = false).await;
    assert!(
        o.violations >= 2 * KEYS as u64,
        "without peer invalidation the checker must see stale reads ({} of {} reads)",
        o.violations,
        o.reads
    );
}

/// Writes of every shape against reads pinned to keys: after each write, the keys it may have
/// touched (and a few others, and a read of a whole group) read through pgcache, in both
/// protocols, must equal Postgres's answer. Sequential, so any difference is a stale read.
/// Returns the mismatches and the hits seen.
async fn run_key_checker(tweak: impl Fn(&mut pgcache::config::Config)) -> (u64, u64) {
    const N: i64 = 12;
    let cluster = PgCluster::shared();
    let db = cluster.create_db("keychecker").await;
    let admin = cluster.admin(&db).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE kt (id int8 PRIMARY KEY, v int NOT NULL, grp int NOT NULL);
             INSERT INTO kt SELECT g, 0, g % 3 FROM generate_series(0, {}) g;
             CREATE TABLE side (id int PRIMARY KEY, ref int8 NOT NULL);
             INSERT INTO side SELECT g, (g * 5) % {N} FROM generate_series(0, {}) g;",
            N - 1,
            N - 1
        ))
        .await
        .unwrap();
    let dir = rules_dir(&[("rules.toml", "[[rule]]\nname = \"kt\"\nmatch = { tables = [\"kt\"] }\nttl = \"1h\"\n")]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    tweak(&mut config);
    let proxy = Proxy::start(config).await;
    let c = proxy.connect(&db, &cluster.superuser()).await;
    let by_key = c.prepare("SELECT v FROM kt WHERE id = $1").await.unwrap();
    let any_sql = "SELECT string_agg(v::text, ',' ORDER BY id) FROM kt WHERE id = ANY($1)";
    let by_keys = c.prepare(any_sql).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut mismatches = 0;
    let read = |k: i64| format!("SELECT v FROM kt WHERE id = {k}");
    for _ in 0..250 {
        let (a, b) = (rng.random_range(0..N), rng.random_range(0..N));
        let g = rng.random_range(0..3);
        let write = match rng.random_range(0..13) {
            0 => format!("UPDATE kt SET v = v + 1 WHERE id = {a}"),
            1 => format!("UPDATE kt SET v = v + 1 WHERE id IN ({a}, {b})"),
            2 => format!("UPDATE kt SET v = v + 1 WHERE grp = {g}"),
            3 => format!("UPDATE kt SET v = v + 1 WHERE id = {a} OR id = {b}"),
            4 => format!("DELETE FROM kt WHERE id = '{a}'"),
            5 => format!(
                "INSERT INTO kt (id, v, grp) VALUES ({a}, 100, {g}) ON CONFLICT (id) DO UPDATE SET v = kt.v + 1"
            ),
            6 => format!("INSERT INTO kt (id, v, grp) VALUES ({a}, 7, {g}) ON CONFLICT DO NOTHING"),
            7 => format!("UPDATE kt SET v = v + 1 FROM side WHERE side.id = {a} AND kt.id = side.ref"),
            8 => {
                format!("BEGIN; UPDATE kt SET v = v + 1 WHERE id = {a}; UPDATE kt SET v = v + 2 WHERE id = {b}; COMMIT")
            }
            9 => format!("UPDATE kt SET v = v + 1 WHERE id = {a} AND v < 1000000 RETURNING v"),
            10 | 12 => String::new(), // parameterized, below
            _ => format!("WITH m AS (UPDATE kt SET v = v + 1 WHERE id = {a} RETURNING id) SELECT count(*) FROM m"),
        };
        if write.is_empty() && rng.random_bool(0.5) {
            c.execute("UPDATE kt SET v = v + 1 WHERE id = $1::BIGINT", &[&a]).await.unwrap();
        } else if write.is_empty() {
            c.execute("UPDATE kt SET v = v + 1 WHERE id = ANY($1)", &[&vec![a, b]]).await.unwrap();
        } else {
            c.batch_execute(&write).await.unwrap_or_else(|e| panic!("{write}: {e}"));
        }
        let mut keys = vec![a, b, rng.random_range(0..N), rng.random_range(0..N)];
        keys.extend(side_refs(&admin, a).await);
        for k in keys {
            let want = common::text(&admin, &read(k)).await;
            let simple = common::text(&c, &read(k)).await;
            let prepared = c.query_opt(&by_key, &[&k]).await.unwrap().map(|r| r.get::<_, i32>(0).to_string());
            if simple != want || prepared.unwrap_or_default() != want {
                mismatches += 1;
            }
        }
        let pair = vec![a, rng.random_range(0..N)];
        let got: Option<String> = c.query_one(&by_keys, &[&pair]).await.unwrap().get(0);
        let want: Option<String> = admin.query_one(any_sql, &[&pair]).await.unwrap().get(0);
        if got != want {
            mismatches += 1;
        }
        let group = format!("SELECT string_agg(v::text, ',' ORDER BY id) FROM kt WHERE grp = {g}");
        if common::text(&c, &group).await != common::text(&admin, &group).await {
            mismatches += 1;
        }
    }
    (mismatches, proxy.shared.stats.totals().hits)
}

/// The keys of kt that side row `id` refers to.
async fn side_refs(admin: &tokio_postgres::Client, id: i64) -> Vec<i64> {
    let rows = admin.query("SELECT ref FROM side WHERE id = $1", &[&(id as i32)]).await.unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_of_every_shape_leave_no_key_stale() {
    let (mismatches, hits) = run_key_checker(|_| {}).await;
    assert!(hits > 500, "the reads were served from the cache ({hits} hits)");
    assert_eq!(mismatches, 0, "reads through pgcache differed from Postgres after a write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_checker_catches_stale_reads_when_invalidation_is_off() {
    let (mismatches, _) = run_key_checker(|c| c.cache.invalidate_on_writes = false).await;
    assert!(mismatches > 0, "with invalidation off the key checker must see stale reads");
}
