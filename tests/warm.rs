//! Warm start without an L2 (`[cache] warm_file`): an instance that shuts down writes its hot
//! statements (not rows), and the next one re-runs them at start, so clients' first reads are
//! hits — each under the session state it was computed in, only while a rule still caches it,
//! and for a role other than the upstream user only once that role has logged in again.

mod common;

use std::time::Duration;

use common::{PgCluster, Proxy, cache_env, executions, text};
use pgcache::cache::warm;
use pgcache::config::Config;

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);
    INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;";
const RULES: &str = "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n";
const ZONED: &str = "SELECT v, '2024-01-01 00:00:00+00'::timestamptz::text FROM items WHERE id = 1";

/// A second instance like `config`, with the rules in `rules`.
async fn restart(config: &Config, rules: &std::path::Path) -> Proxy {
    let mut c = config.clone();
    c.rules = rules.to_owned();
    Proxy::start(c).await
}

async fn warmed(p: &Proxy, outcome: &str, n: f64) -> bool {
    let series = format!("pgcache_warm_statements_total{{outcome=\"{outcome}\"}}");
    for _ in 0..200 {
        if p.metric(&series).await >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_serves_its_hot_statements_from_its_first_read() {
    let cluster = PgCluster::shared();
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("warm.json");
    let env = cache_env(cluster, "warm", SCHEMA, RULES, |c| {
        c.cache.warm_file = Some(file.clone());
        c.cache.warm_rate = 1000;
    })
    .await;
    let config = (**env.proxy.shared.config()).clone();
    let (db, user) = (env.db.clone(), cluster.superuser());
    // Simple and extended protocol, and one statement under a session setting that changes
    // its answer.
    let c = env.proxy.connect(&db, &user).await;
    for id in 1..=10 {
        for _ in 0..3 {
            assert_eq!(text(&c, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
        }
    }
    for id in 11..=15 {
        let row = c.query_one("SELECT v FROM items WHERE id = $1", &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("v{id}"));
    }
    let zoned = env.proxy.connect(&db, &user).await;
    text(&zoned, "SET TimeZone = 'Asia/Kathmandu'").await;
    assert_eq!(text(&zoned, ZONED).await, "v1,2024-01-01 05:45:00+05:45");
    // As on SIGTERM: sessions drain, then the file is written.
    drop((c, zoned));
    env.proxy.shutdown().await;
    let saved = warm::load(&file).expect("the warm file");
    assert_eq!(saved.len(), 16, "every statement that filled the cache: {saved:?}");
    assert!(
        saved.iter().any(|r| r.extended.is_some())
            && saved.iter().any(|r| r.settings.iter().any(|(n, _)| n == "TimeZone"))
    );
    let text_of_file = std::fs::read_to_string(&file).unwrap();
    assert!(!text_of_file.contains("\"v3\""), "recipes, not rows");

    let next = restart(&config, env.dir.path()).await;
    assert!(warmed(&next, "filled", 16.0).await, "the 16 statements re-ran at start");
    let before = executions(&env.admin, "FROM items").await;
    let c = next.connect(&db, &user).await;
    for id in 1..=10 {
        assert_eq!(text(&c, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
    }
    for id in 11..=15 {
        let row = c.query_one("SELECT v FROM items WHERE id = $1", &[&id]).await.unwrap();
        assert_eq!(row.get::<_, String>(0), format!("v{id}"));
    }
    let zoned = next.connect(&db, &user).await;
    text(&zoned, "SET TimeZone = 'Asia/Kathmandu'").await;
    assert_eq!(text(&zoned, ZONED).await, "v1,2024-01-01 05:45:00+05:45");
    assert_eq!(executions(&env.admin, "FROM items").await, before, "every first read was a hit");
    // The entry warmed under Kathmandu's time zone is that state's only: a default session
    // computes its own.
    assert_eq!(text(&c, ZONED).await, "v1,2024-01-01 00:00:00+00");
    assert_eq!(executions(&env.admin, "FROM items").await, before + 1);
    // Warmed entries are invalidated like any other.
    text(&c, "UPDATE items SET v = 'new' WHERE id = 3").await;
    assert_eq!(text(&c, "SELECT v FROM items WHERE id = 3").await, "new");
    drop((c, zoned));
    next.shutdown().await;
    // The warmed statements are kept for the next start, with the default zone's fill.
    assert_eq!(warm::load(&file).unwrap().len(), 17);

    // A rule removed since: nothing is warmed.
    let empty = common::rules_dir(&[("rules.toml", "")]);
    let ruleless = restart(&config, empty.path()).await;
    assert!(warmed(&ruleless, "skipped", 16.0).await);
    assert_eq!(ruleless.shared.store.len(), 0);
    ruleless.shutdown().await;
}

/// pgcache holds no passwords: a role's statements re-run only after it has logged in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roles_statements_wait_for_its_log_in() {
    let cluster = PgCluster::shared();
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("warm.json");
    let role = common::unique_db("warm_app");
    let schema = format!("{SCHEMA} CREATE ROLE {role} LOGIN PASSWORD 'app-secret'; GRANT SELECT ON items TO {role};");
    let env = cache_env(cluster, "warmrole", &schema, RULES, |c| c.cache.warm_file = Some(file.clone())).await;
    let config = (**env.proxy.shared.config()).clone();
    let url = |p: &Proxy| format!("postgres://{role}:app-secret@127.0.0.1:{}/{}?sslmode=disable", p.port(), env.db);
    let c = common::proxy::connect(&url(&env.proxy)).await;
    for id in 1..=5 {
        assert_eq!(text(&c, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
    }
    drop(c);
    env.proxy.shutdown().await;
    assert!(warm::load(&file).unwrap().iter().all(|r| r.user == role));

    let next = restart(&config, env.dir.path()).await;
    let pending = common::eventually(Duration::from_secs(10), || {
        next.shared.stats.metrics.render().contains("pgcache_warm_pending 5")
    })
    .await;
    assert!(pending, "five statements wait for the role");
    assert_eq!(next.shared.store.len(), 0, "nothing ran as a role pgcache cannot log in as");
    let c = common::proxy::connect(&url(&next)).await;
    text(&c, "SELECT 1").await;
    assert!(warmed(&next, "filled", 5.0).await, "warmed once the role logged in");
    let before = executions(&env.admin, "FROM items").await;
    for id in 1..=5 {
        assert_eq!(text(&c, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
    }
    assert_eq!(executions(&env.admin, "FROM items").await, before);
}
