//! Key safety: two clients that could see different rows or bytes never share an entry, and
//! results that depend on the time or on volatile functions are never cached.

mod common;

use common::{CacheEnv, PgCluster, cache_env, executions, text};

const RULES: &str = r#"
[[rule]]
name = "everything"
match = { pattern = "(?i)select" }
ttl = "10m"
"#;

async fn env(schema: &str) -> CacheEnv {
    cache_env(PgCluster::shared(), "keys", schema, RULES, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_row_level_security_see_their_own_rows() {
    let roles = ["alice", "bob"].map(|r| format!("{r}_{}", std::process::id()));
    let e = env(&format!(
        "CREATE TABLE docs (owner text, body text);
         INSERT INTO docs VALUES ('{a}', 'for alice'), ('{b}', 'for bob');
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON docs USING (owner = current_user);
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{a}') THEN CREATE ROLE {a} LOGIN; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{b}') THEN CREATE ROLE {b} LOGIN; END IF;
         END $$;
         GRANT SELECT ON docs TO {a}, {b};",
        a = roles[0],
        b = roles[1]
    ))
    .await;
    let sql = "SELECT body FROM docs";
    let alice = e.proxy.connect(&e.db, &roles[0]).await;
    let bob = e.proxy.connect(&e.db, &roles[1]).await;
    for _ in 0..3 {
        assert_eq!(text(&alice, sql).await, "for alice");
        assert_eq!(text(&bob, sql).await, "for bob");
    }
    // The same role switched with SET ROLE is keyed by the role in effect.
    let admin_via_proxy = e.proxy.connect(&e.db, "postgres").await;
    admin_via_proxy.batch_execute(&format!("SET ROLE {}", roles[1])).await.unwrap();
    assert_eq!(text(&admin_via_proxy, sql).await, "for bob");
    admin_via_proxy.batch_execute(&format!("SET ROLE {}", roles[0])).await.unwrap();
    assert_eq!(text(&admin_via_proxy, sql).await, "for alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_time_zone_and_formats_are_in_the_key() {
    let e = env("CREATE SCHEMA s1; CREATE SCHEMA s2;
         CREATE TABLE s1.v (x text); INSERT INTO s1.v VALUES ('in s1');
         CREATE TABLE s2.v (x text); INSERT INTO s2.v VALUES ('in s2');
         CREATE TABLE stamps (at timestamptz); INSERT INTO stamps VALUES ('2024-01-01 12:00:00+00');")
    .await;
    let c1 = e.proxy.connect(&e.db, "postgres").await;
    let c2 = e.proxy.connect(&e.db, "postgres").await;
    c1.batch_execute("SET search_path = s1, public").await.unwrap();
    c2.batch_execute("SET search_path = s2, public").await.unwrap();
    for _ in 0..2 {
        assert_eq!(text(&c1, "SELECT x FROM v").await, "in s1");
        assert_eq!(text(&c2, "SELECT x FROM v").await, "in s2");
    }
    c1.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    c2.batch_execute("SET TimeZone = 'America/New_York'").await.unwrap();
    for _ in 0..2 {
        assert_eq!(text(&c1, "SELECT at FROM stamps").await, "2024-01-01 12:00:00+00");
        assert_eq!(text(&c2, "SELECT at FROM stamps").await, "2024-01-01 07:00:00-05");
    }
    // Text (simple) and binary (tokio-postgres) results of the same SQL.
    let row = c1.query_one("SELECT at FROM stamps", &[]).await.unwrap();
    let at: std::time::SystemTime = row.get(0);
    assert_eq!(at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_704_110_400);
    assert_eq!(text(&c1, "SELECT at FROM stamps").await, "2024-01-01 12:00:00+00");
    // Startup parameters count too.
    let url = format!("{}&options=-c%20TimeZone%3DAsia%2FTokyo", e.proxy.url(&e.db, "postgres"));
    let tokyo = common::proxy::connect(&url).await;
    assert_eq!(text(&tokyo, "SELECT at FROM stamps").await, "2024-01-01 21:00:00+09");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_dependent_and_volatile_results_are_never_cached() {
    let e = env("CREATE TABLE n (x int); INSERT INTO n VALUES (1);
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';")
    .await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    for (sql, shape) in [
        ("SELECT x, now() FROM n", "now()"),
        ("SELECT x, random() FROM n", "random()"),
        ("SELECT x, bump() FROM n", "bump()"),
        ("SELECT x, current_timestamp FROM n", "current_timestamp FROM"),
        ("SELECT x FROM n WHERE now() > '2000-01-01'", "WHERE now() >"),
        ("SELECT 'now'::timestamptz > '2000-01-01', x FROM n", "::timestamptz >"),
    ] {
        let before = executions(&e.admin, shape).await;
        for _ in 0..3 {
            text(&c, sql).await;
        }
        assert_eq!(executions(&e.admin, shape).await - before, 3, "{sql} must reach Postgres every time");
    }
    // A text parameter value meaning "now" is not cached either.
    let mut raw = common::raw::RawConn::connect(e.proxy.addr, "postgres", &e.db, &[]).await;
    let before = executions(&e.admin, "WHERE $1::timestamptz >").await;
    for _ in 0..3 {
        use common::raw::{batch, bind, execute, parse, sync};
        let sql = "SELECT x FROM n WHERE $1::timestamptz > '2000-01-01'";
        let got = raw
            .exchange(&batch(&[parse("", sql, &[]), bind("", "", &[Some("now")], &[]), execute("", 0), sync()]), 1)
            .await;
        assert_eq!(got.iter().filter(|m| m.tag == b'D').count(), 1);
    }
    assert_eq!(executions(&e.admin, "WHERE $1::timestamptz >").await - before, 3);
}
