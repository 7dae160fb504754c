//! The shared L2 on a real `redis-server`: a fleet asks Postgres once per key, a new instance
//! starts warm, no instance serves a row a write made old (the randomized checker across three
//! instances), and Redis killed and restarted empty costs no client an error and serves nothing
//! stale. Each has its negative control: with the L2's versions not checked, the checker sees
//! stale reads.

mod common;

use std::time::Duration;

use common::checker::{KEYS, run_checker};
use common::redis::Redis;
use common::{PgCluster, Proxy, executions, rules_dir, text};
use pgcache::config::{Config, L2Config, Password};

fn l2(redis: &Redis) -> L2Config {
    L2Config {
        url: Password::new(redis.url()),
        timeout: Duration::from_millis(200),
        prefix: format!("t{}:", rand::random::<u32>()),
        max_value_bytes: 1 << 20,
        compress_above: 0,
        failures: 3,
        cooldown: Duration::from_millis(500),
        check_versions: true,
    }
}

const RULES: &str = "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n";

/// `n` instances sharing `l2` in front of a fresh database of items.
async fn fleet(n: usize, l2: &L2Config) -> (Vec<Proxy>, String, tokio_postgres::Client, tempfile::TempDir) {
    let cluster = PgCluster::shared();
    let schema = "CREATE TABLE items (id int PRIMARY KEY, v text);
                  INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;";
    let (db, admin) = common::fresh_db(cluster, "l2", schema).await;
    let dir = rules_dir(&[("r.toml", RULES)]);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut c: Config = Proxy::config(cluster);
        c.rules = dir.path().to_owned();
        c.rules_explicit = true;
        c.l2 = Some(l2.clone());
        out.push(Proxy::start(c).await);
    }
    (out, db, admin, dir)
}

/// Waits until every instance's L2 connection is up.
async fn connected(fleet: &[Proxy]) {
    let up = common::eventually(Duration::from_secs(10), || {
        fleet.iter().all(|p| p.shared.l2.as_ref().is_some_and(|l| l.state().connected))
    })
    .await;
    assert!(up, "the instances reached the L2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_asks_postgres_once_per_key_and_a_new_instance_starts_warm() {
    let redis = Redis::start();
    let l2 = l2(&redis);
    let (fleet, db, admin, _dir) = fleet(3, &l2).await;
    connected(&fleet).await;
    let user = PgCluster::shared().superuser();
    let mut clients = Vec::new();
    for p in &fleet {
        let c = p.connect(&db, &user).await;
        // Each instance hears the others before it uses the cache (its link starts on first use).
        text(&c, "SELECT 1 FROM items WHERE id = 0").await;
        let db = db.clone();
        let listening = common::eventually(Duration::from_secs(10), || p.shared.peers.listening(&db)).await;
        assert!(listening);
        clients.push(c);
    }
    // The instance that fills a key stores it in the L2 in the background, after its client
    // has the answer: the others ask once it has landed.
    let stored = || fleet.iter().map(|p| p.shared.l2.as_ref().map_or(0, |l| l.state().stores)).sum::<u64>();
    for id in 1..=20 {
        for (i, c) in clients.iter().enumerate() {
            let before = stored();
            assert_eq!(text(c, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
            if i == 0 {
                let landed = common::eventually(Duration::from_secs(10), || stored() > before).await;
                assert!(landed, "the fill of id {id} reached the L2");
            }
        }
    }
    let ran = executions(&admin, "SELECT v FROM items WHERE id").await;
    assert_eq!(ran, 20, "Postgres ran each of the 20 distinct queries once for three instances");
    let l2_hits: f64 = {
        let mut n = 0.0;
        for p in &fleet {
            n += p.metric("pgcache_l2_hits_total").await;
        }
        n
    };
    assert_eq!(l2_hits, 40.0, "the two other instances' first reads were L2 hits");
    // A new instance serves hits at once.
    let mut c: Config = Proxy::config(PgCluster::shared());
    c.rules = _dir.path().to_owned();
    c.rules_explicit = true;
    c.l2 = Some(l2.clone());
    let late = Proxy::start(c).await;
    connected(std::slice::from_ref(&late)).await;
    let lc = late.connect(&db, &user).await;
    text(&lc, "SELECT 1 FROM items WHERE id = 0").await;
    let listening = common::eventually(Duration::from_secs(10), || late.shared.peers.listening(&db)).await;
    assert!(listening);
    for id in 1..=20 {
        assert_eq!(text(&lc, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
    }
    assert_eq!(executions(&admin, "SELECT v FROM items WHERE id").await, ran, "warm from its first query");
}

/// Results over `l2.compress_above` are stored compressed and served whole by another
/// instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_are_stored_compressed() {
    let redis = Redis::start();
    let mut l2 = l2(&redis);
    l2.compress_above = 1024;
    let (fleet, db, admin, _dir) = fleet(2, &l2).await;
    connected(&fleet).await;
    let user = PgCluster::shared().superuser();
    for p in &fleet {
        // The L2 is used once the instance hears its peers (its link starts on first use).
        text(&p.connect(&db, &user).await, "SELECT 1 FROM items WHERE id = 0").await;
        let db = db.clone();
        assert!(common::eventually(Duration::from_secs(10), || p.shared.peers.listening(&db)).await);
    }
    let read = "SELECT v, repeat(v, 20000) FROM items WHERE id = 3";
    let first = text(&fleet[0].connect(&db, &user).await, read).await;
    assert_eq!(first.len(), "v3,".len() + 2 * 20000);
    // The fill is written to the L2 in the background.
    let stored =
        common::eventually(Duration::from_secs(5), || fleet[0].shared.l2.as_ref().unwrap().state().stores >= 1).await;
    assert!(stored);
    assert_eq!(text(&fleet[1].connect(&db, &user).await, read).await, first);
    assert_eq!(executions(&admin, "repeat(v").await, 1, "the second instance's read was an L2 hit");
    let keys = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan", "--pattern", &format!("{}e:*", l2.prefix)])
        .output()
        .unwrap();
    let keys = String::from_utf8(keys.stdout).unwrap();
    let key = keys.lines().next().expect("an entry in the L2");
    let len =
        std::process::Command::new("redis-cli").args(["-p", &redis.port.to_string(), "STRLEN", key]).output().unwrap();
    let len: usize = String::from_utf8(len.stdout).unwrap().trim().parse().unwrap();
    assert!(len < 2_000, "{len} bytes stored for a 40 kB result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_is_never_read_old_through_another() {
    let redis = Redis::start();
    let l2 = l2(&redis);
    let (fleet, db, _admin, _dir) = fleet(2, &l2).await;
    connected(&fleet).await;
    let user = PgCluster::shared().superuser();
    let (a, b) = (fleet[0].connect(&db, &user).await, fleet[1].connect(&db, &user).await);
    let read = "SELECT v FROM items WHERE id = 7";
    assert_eq!(text(&a, read).await, "v7");
    // B's write moves the L2's versions before B's client sees it complete: a read through
    // a third instance (empty L1, so straight to the L2) finds the new row at once.
    b.batch_execute("UPDATE items SET v = 'new' WHERE id = 7").await.unwrap();
    let mut c: Config = Proxy::config(PgCluster::shared());
    c.rules = _dir.path().to_owned();
    c.rules_explicit = true;
    c.l2 = Some(l2.clone());
    let third = Proxy::start(c).await;
    connected(std::slice::from_ref(&third)).await;
    assert_eq!(text(&third.connect(&db, &user).await, read).await, "new");
}

/// The peers' window the checker allows (as in tests/consistency.rs).
const WINDOW: Duration = Duration::from_millis(250);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_sharing_the_l2_see_every_acknowledged_write() {
    let redis = Redis::start();
    let shared = l2(&redis);
    let o = run_checker(3, WINDOW, |c| c.l2 = Some(shared.clone())).await;
    assert!(o.reads > 1000 && o.writes > 50, "{} reads, {} writes", o.reads, o.writes);
    assert_eq!(o.violations, 0, "{} of {} reads saw an old version", o.violations, o.reads);
}

/// With the peers off the L2's versions are the only channel: every L1 hit is confirmed by
/// them (one round trip), so no instance serves what another instance's write made old.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_peers_the_l2_versions_alone_keep_three_instances_coherent() {
    let redis = Redis::start();
    let shared = l2(&redis);
    let o = run_checker(3, Duration::ZERO, |c| {
        c.l2 = Some(shared.clone());
        c.peers.enabled = false;
    })
    .await;
    assert!(o.reads > 1000 && o.writes > 50, "{} reads, {} writes", o.reads, o.writes);
    assert_eq!(o.violations, 0, "{} of {} reads saw an old version", o.violations, o.reads);
}

/// ... and the negative control: the versions not checked, L1 hits go unconfirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_peers_and_unchecked_versions_the_checker_sees_stale_reads() {
    let redis = Redis::start();
    let mut unchecked = l2(&redis);
    unchecked.check_versions = false;
    let o = run_checker(3, Duration::ZERO, |c| {
        c.l2 = Some(unchecked.clone());
        c.peers.enabled = false;
    })
    .await;
    assert!(o.violations >= 2 * KEYS as u64, "{} of {} reads were stale", o.violations, o.reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_checker_catches_stale_reads_when_the_l2_versions_are_not_checked() {
    let redis = Redis::start();
    let mut unchecked = l2(&redis);
    unchecked.check_versions = false;
    let o = run_checker(3, WINDOW, |c| c.l2 = Some(unchecked.clone())).await;
    assert!(
        o.violations >= 2 * KEYS as u64,
        "an L2 entry found whatever its versions is served stale ({} of {} reads)",
        o.violations,
        o.reads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_fails_open_and_serves_nothing_stale() {
    let mut redis = Redis::start();
    let l2 = l2(&redis);
    let (fleet, db, _admin, _dir) = fleet(2, &l2).await;
    connected(&fleet).await;
    let user = PgCluster::shared().superuser();
    let (a, b) = (fleet[0].connect(&db, &user).await, fleet[1].connect(&db, &user).await);
    let read = |id: i32| format!("SELECT v FROM items WHERE id = {id}");
    for id in 1..=5 {
        text(&a, &read(id)).await;
    }
    redis.kill();
    // Reads and writes carry on: L1 and Postgres answer, the breaker opens, nobody errs.
    for round in 0..20 {
        let id = 1 + round % 5;
        b.batch_execute(&format!("UPDATE items SET v = 'down{round}' WHERE id = {id}")).await.unwrap();
        assert_eq!(text(&b, &read(id)).await, format!("down{round}"));
    }
    assert!(
        fleet[1].metric("pgcache_l2_breaker_open").await == 1.0
            || fleet[1].metric("pgcache_l2_errors_total").await > 0.0
    );
    redis.restart_empty();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Written while Redis was down, read through the other instance: its L1 heard the write
    // (peers), and an empty L2 holds nothing old.
    for id in 1..=5 {
        let want: String = PgCluster::shared()
            .admin(&db)
            .await
            .query_one("SELECT v FROM items WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        let deadline = std::time::Instant::now() + WINDOW * 4;
        loop {
            let got = text(&a, &read(id)).await;
            if got == want {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "id {id}: {got} instead of {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The L2 is used again once Redis is back (and the reconnection, in the background, is
    // through): a key filled through one instance is an L2 hit through the other.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for id in 11.. {
        let hits = fleet[0].metric("pgcache_l2_hits_total").await + fleet[1].metric("pgcache_l2_hits_total").await;
        text(&b, &read(id)).await;
        text(&a, &read(id)).await;
        let after = fleet[0].metric("pgcache_l2_hits_total").await + fleet[1].metric("pgcache_l2_hits_total").await;
        if after > hits {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the L2 serves again after Redis came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
