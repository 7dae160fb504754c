//! The result cache through real clients: hits proven by Postgres not executing the query
//! (pg_stat_statements), in both protocols.

mod common;

use common::{PgCluster, Proxy, executions, rules_dir};

const RULES: &str = r#"
[[rule]]
name = "items"
match = { tables = ["items"] }
ttl = "60s"
"#;

async fn setup(rules: &str) -> (&'static PgCluster, Proxy, String, tempfile::TempDir, tokio_postgres::Client) {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("cache").await;
    let admin = cluster.admin(&db).await;
    admin
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);
             INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let dir = rules_dir(&[("10-test.toml", rules)]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    (cluster, Proxy::start(config).await, db, dir, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_protocol_hit_skips_the_backend() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let c = proxy.connect(&db, &cluster.superuser()).await;
    let first = c.simple_query("SELECT name FROM items WHERE id = 7").await.unwrap();
    let before = executions(&admin, "FROM items WHERE id =").await;
    for _ in 0..20 {
        let again = c.simple_query("SELECT name FROM items WHERE id = 7").await.unwrap();
        assert_eq!(format!("{again:?}"), format!("{first:?}"));
    }
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, before, "repeats were served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_hit_with_tokio_postgres() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let c = proxy.connect(&db, &cluster.superuser()).await;
    let stmt = c.prepare("SELECT id, name, price FROM items WHERE id = $1").await.unwrap();
    let first: Vec<(i32, String)> =
        c.query(&stmt, &[&7i32]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    let before = executions(&admin, "FROM items WHERE id =").await;
    for _ in 0..20 {
        let rows = c.query(&stmt, &[&7i32]).await.unwrap();
        let again: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(again, first);
        // query_one through a fresh unnamed statement too (Parse + Bind + Execute).
        let row = c.query_one("SELECT id, name, price FROM items WHERE id = $1", &[&7i32]).await.unwrap();
        assert_eq!(row.get::<_, String>(1), "item 7");
    }
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, before, "repeats were served from the cache");
    // Another parameter value is another key.
    let row = c.query_one(&stmt, &[&8i32]).await.unwrap();
    assert_eq!(row.get::<_, String>(1), "item 8");
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_hits_in_every_mode() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "SELECT name, price FROM items WHERE id = 42;\n").unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let before = executions(&admin, "FROM items WHERE id =").await;
        let args: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.port().to_string(),
            "-U",
            &cluster.superuser(),
            "-n",
            "-M",
            mode,
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "100",
            "-f",
            script.path().to_str().unwrap(),
            &db,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let out = common::run_tool("pgbench", args, vec![], None).await;
        let text = common::stdout(&out);
        assert!(
            out.status.success() && text.contains("number of failed transactions: 0"),
            "{mode}: {text}{}",
            common::stderr(&out)
        );
        let ran = executions(&admin, "FROM items WHERE id =").await - before;
        // At most one execution per client per protocol (the first fill), out of 400 queries.
        assert!(ran <= 4, "{mode}: Postgres executed the query {ran} times for 400 queries");
    }
}
