//! When Postgres goes away, an idle session that holds no backend-only state stays open:
//! cached reads are answered (past their TTL within the rule's `stale_if_error` window),
//! other statements get `ERROR 08006` without losing the session, and when Postgres is back
//! the session continues on a new backend with its settings and prepared statements intact.

mod common;

use std::time::Duration;

use common::{ClusterOptions, PgCluster, Proxy, rules_dir, try_text as text};

const RULES: &str = r#"
[[rule]]
name = "items"
match = { tables = ["items"] }
ttl = "1s"
stale_if_error = "1m"

[[rule]]
name = "brief"
match = { tables = ["brief"] }
ttl = "1s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_an_outage_and_serve_stale_if_error() {
    let cluster = PgCluster::start(ClusterOptions::default());
    cluster
        .admin("postgres")
        .await
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one'), (2, 'two');
             CREATE TABLE brief (v text); INSERT INTO brief VALUES ('b');
             CREATE TABLE other (v text); INSERT INTO other VALUES ('o');",
        )
        .await
        .unwrap();
    let dir = rules_dir(&[("rules.toml", RULES)]);
    let mut config = Proxy::config(&cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    let proxy = Proxy::start(config).await;
    let c = proxy.connect("postgres", "postgres").await;
    c.batch_execute("SET search_path = public; SET extra_float_digits = 1").await.unwrap();
    let stmt = c.prepare("SELECT v FROM items WHERE id = $1").await.unwrap();
    assert_eq!(c.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, String>(0), "one");
    assert_eq!(text(&c, "SELECT v FROM items WHERE id = 2").await.unwrap(), "two");
    assert_eq!(text(&c, "SELECT v FROM brief").await.unwrap(), "b");

    cluster.stop_server();
    tokio::time::sleep(Duration::from_millis(1300)).await;

    // Past the TTL, within stale_if_error: served while Postgres is down, in both protocols.
    assert_eq!(c.query_one(&stmt, &[&1i32]).await.unwrap().get::<_, String>(0), "one");
    assert_eq!(text(&c, "SELECT v FROM items WHERE id = 2").await.unwrap(), "two");
    // Without stale_if_error, and uncached statements: an ERROR, not a dead session.
    for sql in ["SELECT v FROM brief", "SELECT v FROM other"] {
        let err = text(&c, sql).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("08006"), "{sql}: {err:?}");
    }
    assert!(!c.is_closed());

    cluster.start_server();
    let mut back = None;
    for _ in 0..50 {
        if let Ok(v) = text(&c, "SELECT v FROM other").await {
            back = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back.as_deref(), Some("o"), "the same session works again");
    // Its prepared statement and settings moved with it.
    assert_eq!(c.query_one(&stmt, &[&2i32]).await.unwrap().get::<_, String>(0), "two");
    assert_eq!(text(&c, "SHOW extra_float_digits").await.unwrap(), "1");
    assert_eq!(text(&c, "SHOW search_path").await.unwrap(), "public");
}
