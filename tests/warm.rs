//! Warm start without an L2 (`[cache] warm_file`): an instance that shuts down writes its hot
//! statements (not rows), and the next one re-runs them at start, so clients' first reads are
//! hits — each under the session state it was computed in, only while a rule still caches it,
//! and for a role only once that role has logged in again (pgcache holds no passwords).

mod common;

use std::time::Duration;

use common::{PgCluster, Proxy, cache_env, executions, text};
use pgcache::cache::warm;
use pgcache::config::Config;

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);
    INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;";
const RULES: &str =
    "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\nallow_stable_functions = true\n";
const ZONED: &str = "SELECT v, '2024-01-01 00:00:00+00'::timestamptz::text FROM items WHERE id = 1";
const TENANT: &str = "SELECT v, current_setting('app.tenant', true) FROM items WHERE id = 2";

/// A second instance like `config`, with the rules in `rules`.
async fn restart(config: &Config, rules: &std::path::Path) -> Proxy {
    let mut c = config.clone();
    c.rules = rules.to_owned();
    Proxy::start(c).await
}

/// Waits until `n` warm statements had `outcome`; then checks no more did.
async fn warmed(p: &Proxy, outcome: &str, n: f64) {
    let series = format!("pgcache_warm_statements_total{{outcome=\"{outcome}\"}}");
    for _ in 0..200 {
        if p.metric(&series).await >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.metric(&series).await, n, "{outcome}");
}

/// The value of the `pgcache_warm_pending` gauge.
fn pending(p: &Proxy) -> Option<f64> {
    let text = p.shared.stats.metrics.render();
    text.lines().find_map(|l| l.strip_prefix("pgcache_warm_pending ")).and_then(|v| v.trim().parse().ok())
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
    // A custom setting the statement reads: unset, and set.
    assert_eq!(text(&c, TENANT).await, "v2,NULL");
    text(&zoned, "SET app.tenant = '7'").await;
    assert_eq!(text(&zoned, TENANT).await, "v2,7");
    // As on SIGTERM: sessions drain, then the file is written.
    drop((c, zoned));
    env.proxy.shutdown().await;
    let (saved, _) = warm::load(&file, 1000).expect("the warm file");
    assert_eq!(saved.len(), 18, "every statement that filled the cache: {saved:?}");
    assert!(
        saved.iter().any(|r| r.extended.is_some())
            && saved.iter().any(|r| r.settings.iter().any(|(n, _)| n == "TimeZone"))
    );
    let text_of_file = std::fs::read_to_string(&file).unwrap();
    assert!(!text_of_file.contains("\"v3\""), "recipes, not rows");

    let next = restart(&config, env.dir.path()).await;
    // Nothing runs before the role has logged in (pgcache holds no password for it).
    assert!(common::eventually(Duration::from_secs(10), || pending(&next) == Some(18.0)).await);
    assert_eq!(next.shared.store.len(), 0);
    let c = next.connect(&db, &user).await;
    warmed(&next, "filled", 18.0).await;
    let before = executions(&env.admin, "FROM items").await;
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
    assert_eq!(text(&c, TENANT).await, "v2,NULL");
    text(&zoned, "SET app.tenant = '7'").await;
    assert_eq!(text(&zoned, TENANT).await, "v2,7");
    assert_eq!(executions(&env.admin, "FROM items").await, before, "every first read was a hit");
    // The entry warmed under Kathmandu's time zone is that state's only: a default session
    // computes its own.
    assert_eq!(text(&c, ZONED).await, "v1,2024-01-01 00:00:00+00");
    assert_eq!(executions(&env.admin, "FROM items").await, before + 1);
    // Warmed entries are invalidated like any other.
    text(&c, "UPDATE items SET v = 'new' WHERE id = 3").await;
    assert_eq!(text(&c, "SELECT v FROM items WHERE id = 3").await, "new");
    drop((c, zoned));
    // The warmed statements are kept for the next start, but not those the write made old.
    let live: std::collections::HashSet<warm::Recipe> = next
        .shared
        .store
        .entries()
        .into_iter()
        .filter(|(_, e)| !e.invalidated())
        .filter_map(|(_, e)| e.recipe.as_deref().cloned())
        .collect();
    assert!(live.len() >= 15, "the point reads of other keys and the new read of id 3: {live:?}");
    next.shutdown().await;
    let kept = warm::load(&file, 1000).unwrap().0;
    assert_eq!(kept.iter().cloned().collect::<std::collections::HashSet<_>>(), live);
    assert_eq!(kept.len(), live.len());

    // A rule removed since: nothing is warmed.
    let empty = common::rules_dir(&[("rules.toml", "")]);
    let ruleless = restart(&config, empty.path()).await;
    let c = ruleless.connect(&db, &user).await;
    warmed(&ruleless, "skipped", kept.len() as f64).await;
    assert_eq!(ruleless.shared.store.len(), 0);
    drop(c);
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
    let (saved, _) = warm::load(&file, 1000).unwrap();
    assert!(saved.len() == 5 && saved.iter().all(|r| r.user == role));

    let next = restart(&config, env.dir.path()).await;
    let waiting = common::eventually(Duration::from_secs(10), || pending(&next) == Some(5.0)).await;
    assert!(waiting, "five statements wait for the role");
    assert_eq!(next.shared.store.len(), 0, "nothing ran as a role pgcache cannot log in as");
    // Shut down before the role came back: its statements are kept for the next start.
    next.shutdown().await;
    assert_eq!(warm::load(&file, 1000).unwrap().0, saved);

    let next = restart(&config, env.dir.path()).await;
    let c = common::proxy::connect(&url(&next)).await;
    text(&c, "SELECT 1").await;
    warmed(&next, "filled", 5.0).await;
    let before = executions(&env.admin, "FROM items").await;
    for id in 1..=5 {
        assert_eq!(text(&c, &format!("SELECT v FROM items WHERE id = {id}")).await, format!("v{id}"));
    }
    assert_eq!(executions(&env.admin, "FROM items").await, before);
}
