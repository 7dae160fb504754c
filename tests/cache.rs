//! The result cache through real clients: hits proven by Postgres not executing the query
//! (pg_stat_statements), in both protocols.

mod common;

use common::{PgCluster, Proxy, cache_env, executions};

const RULES: &str = r#"
[[rule]]
name = "items"
match = { tables = ["items"] }
ttl = "60s"
"#;

async fn setup(rules: &str) -> (&'static PgCluster, Proxy, String, tempfile::TempDir, tokio_postgres::Client) {
    let cluster = PgCluster::shared();
    let schema = "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);
                  INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 100) g;";
    let e = cache_env(cluster, "cache", schema, rules, |_| {}).await;
    (cluster, e.proxy, e.db, e.dir, e.admin)
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

/// After a run of misses a session tries the short way (the whole answer without planning)
/// only now and then; the hits that come meanwhile are served by the planner, still without
/// Postgres, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_after_a_run_of_misses_skip_the_backend_too() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let c = proxy.connect(&db, &cluster.superuser()).await;
    let stmt = c.prepare("SELECT name FROM items WHERE id = $1").await.unwrap();
    assert_eq!(c.query_one(&stmt, &[&7i32]).await.unwrap().get::<_, String>(0), "item 7");
    c.simple_query("SELECT name FROM items WHERE id = 7").await.unwrap();
    for id in 20..60i32 {
        // Misses, each of its own key, in both protocols.
        assert_eq!(c.query_one(&stmt, &[&id]).await.unwrap().get::<_, String>(0), format!("item {id}"));
        c.simple_query(&format!("SELECT name FROM items WHERE id = {id}")).await.unwrap();
    }
    let before = executions(&admin, "FROM items WHERE id =").await;
    for _ in 0..20 {
        assert_eq!(c.query_one(&stmt, &[&7i32]).await.unwrap().get::<_, String>(0), "item 7");
        let rows = c.simple_query("SELECT name FROM items WHERE id = 7").await.unwrap();
        let row = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        });
        assert_eq!(row.as_deref(), Some("item 7"));
    }
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, before, "hits, served from the cache");
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

use common::raw::{Msg, RawConn, batch, bind, describe, execute, parse, query, sync};

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_are_byte_identical_to_postgres() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let user = cluster.superuser();
    let direct_addr = format!("{}:{}", cluster.host, cluster.port).parse().unwrap();
    let mut direct = RawConn::connect(direct_addr, &user, &db, &[]).await;
    let mut proxied = RawConn::connect(proxy.addr, &user, &db, &[]).await;
    let q = "SELECT id, name, price FROM items WHERE id < 5 ORDER BY id";
    let scripts: Vec<(&str, bytes::BytesMut, usize)> = vec![
        ("simple", query(q), 1),
        (
            "extended text with describe",
            batch(&[parse("", q, &[]), bind("", "", &[], &[]), describe(b'P', ""), execute("", 0), sync()]),
            1,
        ),
        (
            "extended binary without describe",
            batch(&[parse("", q, &[]), bind("", "", &[], &[1]), execute("", 0), sync()]),
            1,
        ),
        (
            "pipeline mixing hits and misses",
            batch(&[
                parse("", q, &[]),
                bind("", "", &[], &[]),
                describe(b'P', ""),
                execute("", 0),
                parse("", "SELECT 42", &[]),
                bind("", "", &[], &[]),
                execute("", 0),
                parse("", "SELECT id FROM items WHERE id = $1", &[]),
                bind("", "", &[Some("3")], &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
                parse("", q, &[]),
                bind("", "", &[], &[1]),
                execute("", 0),
                sync(),
            ]),
            2,
        ),
    ];
    for round in 0..3 {
        for (what, frames, readies) in &scripts {
            let d = direct.exchange(frames, *readies).await;
            let p = proxied.exchange(frames, *readies).await;
            assert_eq!(d, p, "{what}, round {round}");
        }
    }
    // Direct Postgres ran the query 5 times a round; through pgcache it ran once per distinct
    // key (simple; extended text; extended binary), every later use was a hit.
    let ran = executions(&admin, "WHERE id < $1 ORDER BY id").await;
    assert_eq!(ran, 3 * 5 + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_statements_and_portals_are_recreated_when_needed() {
    let (cluster, proxy, db, _dir, _admin) = setup(RULES).await;
    let user = cluster.superuser();
    let mut c = RawConn::connect(proxy.addr, &user, &db, &[]).await;
    let q = "SELECT name FROM items WHERE id = 9";
    let hit = batch(&[parse("", q, &[]), bind("", "", &[], &[]), describe(b'P', ""), execute("", 0), sync()]);
    c.exchange(&hit, 1).await;
    let got = c.exchange(&hit, 1).await;
    assert_eq!(tags(&got), "12TDCZ");
    // The unnamed statement exists for the client though pgcache never sent it: bind it again
    // without a Parse, with a different format so it is not a hit.
    let got = c.exchange(&batch(&[bind("", "", &[], &[1]), describe(b'P', ""), execute("", 0), sync()]), 1).await;
    assert_eq!(tags(&got), "2TDCZ", "{got:?}");
    // And describe it.
    let got = c
        .exchange(&batch(&[parse("", q, &[]), bind("", "", &[], &[]), execute("", 0), describe(b'S', ""), sync()]), 1)
        .await;
    assert_eq!(tags(&got), "12DCtTZ", "{got:?}");
    // Inside a transaction, a hit's portal can be described afterwards.
    c.exchange(&query("BEGIN"), 1).await;
    let got = c.exchange(&batch(&[parse("", q, &[]), bind("", "", &[], &[]), execute("", 0), sync()]), 1).await;
    assert_eq!(tags(&got), "12DCZ");
    let got = c.exchange(&batch(&[describe(b'P', ""), sync()]), 1).await;
    assert_eq!(tags(&got), "TZ", "{got:?}");
    c.exchange(&query("COMMIT"), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_recreated_statement_reports_its_error() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let mut c = RawConn::connect(proxy.addr, &cluster.superuser(), &db, &[]).await;
    let q = "SELECT name FROM items WHERE id = 11";
    let hit = batch(&[parse("", q, &[]), bind("", "", &[], &[]), execute("", 0), sync()]);
    c.exchange(&hit, 1).await;
    assert_eq!(tags(&c.exchange(&hit, 1).await), "12DCZ", "answered by pgcache; the unnamed statement is virtual");
    // The table goes away; re-creating the unnamed statement on the backend now fails, and
    // the client must hear so (not wait for answers that never come).
    admin.batch_execute("ALTER TABLE items RENAME TO items_gone").await.unwrap();
    let got = c.exchange(&batch(&[bind("", "", &[], &[1]), execute("", 0), sync()]), 1).await;
    assert_eq!(tags(&got), "EZ", "{got:?}");
    assert!(String::from_utf8_lossy(&got[0].body).contains("42P01"), "{got:?}");
    admin.batch_execute("ALTER TABLE items_gone RENAME TO items").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_limited_executes_are_cached_and_answered_as_postgres_would() {
    let (cluster, proxy, db, _dir, admin) = setup(RULES).await;
    let user = cluster.superuser();
    let direct_addr = format!("{}:{}", cluster.host, cluster.port).parse().unwrap();
    let mut direct = RawConn::connect(direct_addr, &user, &db, &[]).await;
    let mut proxied = RawConn::connect(proxy.addr, &user, &db, &[]).await;
    // asyncpg's fetchrow/fetchval execute with a limit of 1; results of 0, 1 and 3 rows meet
    // it differently (CommandComplete, or PortalSuspended once the limit is reached).
    let limited = |sql: &str, limit: i32| {
        batch(&[parse("", sql, &[]), bind("", "", &[], &[]), describe(b'P', ""), execute("", limit), sync()])
    };
    let cases = [
        ("SELECT name FROM items WHERE id = 1000", 1, "12TCZ"),
        ("SELECT name FROM items WHERE id = 5", 1, "12TDsZ"),
        ("SELECT name FROM items WHERE id BETWEEN 1 AND 3 ORDER BY id", 1, "12TDsZ"),
        ("SELECT name FROM items WHERE id BETWEEN 1 AND 3 ORDER BY id", 3, "12TDDDsZ"),
        ("SELECT name FROM items WHERE id BETWEEN 1 AND 3 ORDER BY id", 5, "12TDDDCZ"),
    ];
    for round in 0..3 {
        for (sql, limit, expected) in cases {
            let frames = limited(sql, limit);
            let d = direct.exchange(&frames, 1).await;
            let p = proxied.exchange(&frames, 1).await;
            assert_eq!(d, p, "{sql} with limit {limit}, round {round}");
            assert_eq!(tags(&d), expected);
        }
    }
    // Direct Postgres ran each case every round; through pgcache each statement ran once, and
    // every limit was served from its one entry.
    assert_eq!(executions(&admin, "WHERE id BETWEEN $1 AND $2").await, 3 * 3 + 1);
    assert_eq!(executions(&admin, "FROM items WHERE id = $1").await, 2 * 3 + 2);
    // Inside a transaction the portal could be resumed: that goes to Postgres every time.
    let before = executions(&admin, "FROM items WHERE id = $1").await;
    for conn in [&mut direct, &mut proxied] {
        conn.exchange(&query("BEGIN"), 1).await;
        let got = conn.exchange(&limited("SELECT name FROM items WHERE id = 5", 1), 1).await;
        assert_eq!(tags(&got), "12TDsZ");
        let rest = conn.exchange(&batch(&[execute("", 1), sync()]), 1).await;
        assert_eq!(tags(&rest), "CZ");
        conn.exchange(&query("COMMIT"), 1).await;
    }
    assert_eq!(executions(&admin, "FROM items WHERE id = $1").await - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_on_literals_decides_each_text_of_a_shape_by_its_own() {
    // Texts that differ only in literals share one classification and one memoized decision,
    // except when a rule's pattern reads the text: then each text is decided by its own.
    let rules = "[[rule]]\nname = \"seven\"\nmatch = { pattern = \"id = 7\\\\b\" }\nttl = \"60s\"\n";
    let (cluster, proxy, db, _dir, admin) = setup(rules).await;
    let c = proxy.connect(&db, &cluster.superuser()).await;
    let seven = c.simple_query("SELECT name FROM items WHERE id = 7").await.unwrap();
    let before = executions(&admin, "FROM items WHERE id =").await;
    for _ in 0..10 {
        let again = c.simple_query("SELECT name FROM items WHERE id = 7").await.unwrap();
        assert_eq!(format!("{again:?}"), format!("{seven:?}"));
        c.simple_query("SELECT name FROM items WHERE id = 8").await.unwrap();
    }
    // pg_stat_statements counts both texts under one normalized query: only id = 8 ran.
    assert_eq!(executions(&admin, "FROM items WHERE id =").await - before, 10);
}

/// A table `table` of `rows` keys (`id`, `v` = `id`) under a rule of its own (TTL 60 s), with
/// `cache.admission` = `admission`.
async fn keyed_table_env(table: &str, rows: i32, admission: &str) -> common::CacheEnv {
    let schema = format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v int);
         INSERT INTO {table} SELECT g, g FROM generate_series(1, {rows}) g;"
    );
    let rules = format!("[[rule]]\nname = \"{table}\"\nmatch = {{ tables = [\"{table}\"] }}\nttl = \"60s\"\n");
    let adaptive = admission == "adaptive";
    cache_env(PgCluster::shared(), table, &schema, &rules, move |c| c.cache.adaptive_admission = adaptive).await
}

/// Reads 1100 keys once each through a rule on their table (every one a miss), then one more
/// key three times: how many of those three Postgres ran, and the misses not stored.
async fn after_a_window_of_misses(admission: &str) -> (i64, f64) {
    let e = keyed_table_env("wide", 2000, admission).await;
    let c = e.proxy.connect(&e.db, &PgCluster::shared().superuser()).await;
    let once = c.prepare("SELECT v FROM wide WHERE id = $1").await.unwrap();
    for id in 1..=1100 {
        c.query_one(&once, &[&id]).await.unwrap();
    }
    for _ in 0..3 {
        let row = c.query_one("SELECT v, id FROM wide WHERE id = $1", &[&1500]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1500);
    }
    (
        executions(&e.admin, "SELECT v, id FROM wide").await,
        e.proxy.metric("pgcache_cache_fills_not_admitted_total").await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_whose_entries_are_never_read_again_stores_a_key_only_at_its_second_miss() {
    let (ran, declined) = after_a_window_of_misses("adaptive").await;
    assert_eq!(ran, 2, "the first miss not stored, the second stored, the third a hit");
    assert!(declined >= 1.0);
    // Negative control: every miss stored.
    let (ran, declined) = after_a_window_of_misses("always").await;
    assert_eq!(ran, 1, "stored at the first miss");
    assert_eq!(declined, 0.0);
}
