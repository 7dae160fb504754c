//! Entry lifecycle: TTL expiry, stale-while-revalidate, single-flight, the byte bound, and
//! rule reloads while queries run.

mod common;

use std::time::Duration;

use common::{CacheEnv, PgCluster, cache_env, executions, rules_dir, text};
use pgcache::config::Config;

async fn env(rules: &str, tweak: impl FnOnce(&mut Config)) -> CacheEnv {
    let schema = "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;";
    cache_env(PgCluster::shared(), "life", schema, rules, tweak).await
}

const SQL: &str = "SELECT v FROM items WHERE id = 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_after_their_ttl() {
    let e = env("[[rule]]\nname = \"short\"\nmatch = { tables = [\"items\"] }\nttl = \"1s\"\n", |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    text(&c, SQL).await;
    let n = executions(&e.admin, "FROM items WHERE id").await;
    text(&c, SQL).await;
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n, "hit within the TTL");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    text(&c, SQL).await;
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n + 1, "miss after the TTL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_are_served_while_refreshed_in_the_background() {
    let rule =
        "[[rule]]\nname = \"swr\"\nmatch = { tables = [\"items\"] }\nttl = \"2s\"\nstale_while_revalidate = \"1m\"\n";
    let e = env(rule, |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    c.batch_execute("SET search_path = public; SET TimeZone = 'Asia/Tokyo'").await.unwrap();
    assert_eq!(text(&c, SQL).await, "v1");
    // A write pgcache does not see: only the TTL and the refresh can pick it up.
    e.admin.batch_execute("UPDATE items SET v = 'changed' WHERE id = 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let n = executions(&e.admin, "FROM items WHERE id").await;
    assert_eq!(text(&c, SQL).await, "v1", "the stale entry is served at once");
    let mut seen = String::new();
    for _ in 0..40 {
        seen = text(&c, SQL).await;
        if seen == "changed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, "changed", "the background refresh replaced the entry");
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n + 1, "one refresh; every read was a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_refresh_replays_extended_requests_with_their_parameters() {
    let rule =
        "[[rule]]\nname = \"swr\"\nmatch = { tables = [\"items\"] }\nttl = \"2s\"\nstale_while_revalidate = \"1m\"\n";
    let e = env(rule, |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    let sql = "SELECT v FROM items WHERE id = $1";
    let read = || async { c.query_one(sql, &[&7i32]).await.unwrap().get::<_, String>(0) };
    assert_eq!(read().await, "v7");
    e.admin.batch_execute("UPDATE items SET v = 'changed' WHERE id = 7").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let n = executions(&e.admin, "FROM items WHERE id = $1").await;
    assert_eq!(read().await, "v7", "the stale entry is served at once");
    let mut seen = String::new();
    for _ in 0..40 {
        seen = read().await;
        if seen == "changed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, "changed", "the refresh ran the statement with the client's binary parameter");
    assert_eq!(executions(&e.admin, "FROM items WHERE id = $1").await, n + 1, "one refresh; every read was a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_too_large_for_the_rule_is_not_stored() {
    let rule = "[[rule]]\nname = \"swr\"\nmatch = { tables = [\"items\"] }\nttl = \"2s\"\n\
                stale_while_revalidate = \"1m\"\nmax_entry_bytes = 500\n";
    let e = env(rule, |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    assert_eq!(text(&c, SQL).await, "v1");
    e.admin.batch_execute("UPDATE items SET v = repeat('x', 2000) WHERE id = 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let n = executions(&e.admin, "FROM items WHERE id").await;
    assert_eq!(text(&c, SQL).await, "v1", "the stale entry is served and a refresh starts");
    for _ in 0..40 {
        if executions(&e.admin, "FROM items WHERE id").await > n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n + 1, "the refresh ran");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its 2 kB result is over the rule's 500 bytes: the stale entry was not replaced by it.
    assert_eq!(text(&c, SQL).await, "v1", "still the stale entry, not an oversized one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_run_once() {
    let e =
        env("[[rule]]\nname = \"agg\"\nmatch = { tables = [\"items\"] }\nttl = \"1m\"\n", |c| c.pool.max_size = 100)
            .await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        let c = e.proxy.connect(&e.db, "postgres").await;
        // Settle each session's settings probe first, so the misses start together.
        c.simple_query("SELECT 1").await.unwrap();
        clients.push(c);
    }
    let slow = "SELECT count(*) FROM items a, items b, items c WHERE a.id + b.id + c.id > 0";
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let before = executions(&e.admin, "FROM items a, items b").await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let b = barrier.clone();
            tokio::spawn(async move {
                b.wait().await;
                text(&c, slow).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "1000000");
    }
    assert_eq!(executions(&e.admin, "FROM items a, items b").await - before, 1, "100 concurrent misses, one execution");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_bound_holds_under_a_flood_of_distinct_keys() {
    let e = env("[[rule]]\nname = \"all\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n", |c| {
        c.cache.max_bytes = 256 * 1024
    })
    .await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    let store = &e.proxy.shared.store;
    for i in 0..3000 {
        text(&c, &format!("SELECT repeat(v, 50) || {i} FROM items WHERE id = {}", i % 100 + 1)).await;
        assert!(store.bytes() <= store.capacity(), "{} bytes held, capacity {}", store.bytes(), store.capacity());
    }
    assert!(store.evictions() > 0, "the flood forced evictions");
    assert!(store.len() > 10, "the cache still holds entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_reload_swaps_atomically_and_a_broken_file_keeps_the_old_rules() {
    let cache = "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n";
    let e = env(cache, |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    text(&c, SQL).await;
    // Queries keep running while the rules change underneath them.
    let url = e.proxy.url(&e.db, "postgres");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runner = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = common::proxy::connect(&url).await;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(text(&c, SQL).await, "v1");
                n += 1;
            }
            n
        })
    };
    let path = e.dir.path().join("rules.toml");
    std::fs::write(&path, "[[rule]]\nname = \"broken\"\nmatch = {}\nttl = \"1h\"\n").unwrap();
    assert!(e.proxy.shared.rules.reload().is_err());
    assert_eq!(e.proxy.shared.rules.current().rules[0].name, "items", "old rules kept");
    let n = executions(&e.admin, "FROM items WHERE id").await;
    text(&c, SQL).await;
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n, "still served from the cache");
    std::fs::write(&path, "[[rule]]\nname = \"off\"\nmatch = { tables = [\"items\"] }\naction = \"bypass\"\n").unwrap();
    // The directory watcher picks the change up by itself.
    let swapped =
        common::eventually(Duration::from_secs(5), || e.proxy.shared.rules.current().rules[0].name == "off").await;
    assert!(swapped);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(runner.await.unwrap() > 0, "queries ran throughout the swaps");
    let n = executions(&e.admin, "FROM items WHERE id").await;
    text(&c, SQL).await;
    text(&c, SQL).await;
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n + 2, "bypassed after the reload");
}

#[test]
fn check_rules_validates_the_shipped_examples_and_reports_errors() {
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["check-rules", concat!(env!("CARGO_MANIFEST_DIR"), "/rules")])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("never-sessions"));
    let dir = rules_dir(&[("bad.toml", "[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\nttl = \"soon\"\n")]);
    let bad =
        std::process::Command::new(env!("CARGO_BIN_EXE_pgcache")).arg("check-rules").arg(dir.path()).output().unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad.toml:4") && err.contains("ttl"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_over_max_entry_bytes_stream_through_uncached() {
    let rule = "[[rule]]\nname = \"small\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\nmax_entry_bytes = 500\n";
    let e = env(rule, |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    let big = "SELECT string_agg(repeat(v, 5), ',') FROM items";
    let small = "SELECT v FROM items WHERE id = 3";
    for _ in 0..3 {
        assert!(text(&c, big).await.len() > 500);
        assert_eq!(text(&c, small).await, "v3");
    }
    assert_eq!(executions(&e.admin, "SELECT string_agg").await, 3, "too large: every read reached Postgres");
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, 1, "small enough: cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_caching_inside_repeatable_read_or_serializable_transactions() {
    let e = env("[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n", |_| {}).await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    text(&c, SQL).await;
    for begin in ["BEGIN ISOLATION LEVEL REPEATABLE READ", "BEGIN ISOLATION LEVEL SERIALIZABLE"] {
        c.batch_execute(begin).await.unwrap();
        let n = executions(&e.admin, "FROM items WHERE id").await;
        text(&c, SQL).await;
        text(&c, SQL).await;
        assert_eq!(
            executions(&e.admin, "FROM items WHERE id").await,
            n + 2,
            "{begin}: the snapshot must be the transaction's"
        );
        c.batch_execute("COMMIT").await.unwrap();
    }
    // A plain READ COMMITTED transaction that has not written may use the cache.
    c.batch_execute("BEGIN").await.unwrap();
    let n = executions(&e.admin, "FROM items WHERE id").await;
    text(&c, SQL).await;
    assert_eq!(executions(&e.admin, "FROM items WHERE id").await, n);
    c.batch_execute("COMMIT").await.unwrap();
}
