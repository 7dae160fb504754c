//! Operating pgcache: exact metric deltas after a scripted workload, health and readiness,
//! every admin console command through psql and tokio-postgres, admin access control, the
//! advisor, and the runtime's size.

mod common;

use std::time::Duration;

use common::{
    CacheEnv, ClusterOptions, PgCluster, ProxyProcess, cache_env, executions, psql, rules_dir, stderr, stdout, text,
};
use tokio_postgres::Client;

const RULES: &str = r#"
[[rule]]
name = "items"
match = { tables = ["items"] }
ttl = "1h"

[[rule]]
name = "all-selects"
match = { pattern = "(?i)from\\s+numbers" }
ttl = "1h"
"#;

type Env = CacheEnv;

const SCHEMA: &str = "
    CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 10) g;
    CREATE TABLE numbers (x int); INSERT INTO numbers SELECT generate_series(1, 5);
    CREATE TABLE uncached (k int PRIMARY KEY, v text); INSERT INTO uncached SELECT g, 'u' || g FROM generate_series(1, 5) g;";

async fn env_on(cluster: &PgCluster) -> Env {
    let admins = vec![cluster.superuser()];
    cache_env(cluster, "ops", SCHEMA, RULES, |c| c.console.users = admins).await
}

async fn env() -> Env {
    env_on(PgCluster::shared()).await
}

trait Clients {
    async fn app(&self) -> Client;
    async fn console(&self) -> Client;
}

impl Clients for Env {
    async fn app(&self) -> Client {
        self.proxy.connect(&self.db, &PgCluster::shared_or_superuser()).await
    }

    async fn console(&self) -> Client {
        self.proxy.connect("pgcache", &PgCluster::shared_or_superuser()).await
    }
}

/// Rows of a console command as vectors of text.
async fn rows(c: &Client, sql: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for m in c.simple_query(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")) {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).unwrap_or("").to_owned()).collect());
        }
    }
    out
}

fn lookup<'a>(rows: &'a [Vec<String>], key: &str) -> &'a [String] {
    rows.iter().find(|r| r[0] == key).unwrap_or_else(|| panic!("no row {key} in {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_exact_deltas_after_a_scripted_workload() {
    let e = env().await;
    let c = e.app().await;
    let m = |s: &'static str| e.proxy.metric(s);
    let before_hits = m("pgcache_cache_hits_total{rule=\"items\"}").await;
    text(&c, "SELECT v FROM items WHERE id = 1").await; // miss
    for _ in 0..3 {
        text(&c, "SELECT v FROM items WHERE id = 1").await; // hits
    }
    c.batch_execute("UPDATE items SET v = 'changed' WHERE id = 1").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM items WHERE id = 1").await, "changed"); // miss after invalidation
    assert_eq!(m("pgcache_cache_hits_total{rule=\"items\"}").await - before_hits, 3.0);
    assert_eq!(m("pgcache_cache_misses_total{rule=\"items\"}").await, 2.0);
    assert_eq!(m("pgcache_invalidations_total{table=\"items\"}").await, 1.0);
    assert_eq!(m("pgcache_query_duration_seconds_count{outcome=\"hit\"}").await, 3.0);
    assert_eq!(m("pgcache_query_duration_seconds_count{outcome=\"miss\"}").await, 2.0);
    assert!(m("pgcache_cache_served_bytes_total{rule=\"items\"}").await > 0.0);
    assert_eq!(m("pgcache_client_connections").await, 1.0);
    assert_eq!(m("pgcache_cache_entries").await, 1.0);
    assert_eq!(m("pgcache_rules_loaded").await, 2.0);
    assert_eq!(m("pgcache_backend_connections{state=\"active\"}").await, 1.0);
    let (status, body) = e.proxy.http("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("pgcache_query_duration_seconds_bucket{outcome=\"hit\",le=\"0.00005\"}"), "real histograms");
    assert!(body.contains("# HELP pgcache_cache_hits_total"));
    drop(c);
    let mut gone = false;
    for _ in 0..100 {
        if m("pgcache_client_connections").await == 0.0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the client gauge returns to zero when the client leaves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_backend_and_healthz_the_process() {
    let cluster = PgCluster::start(ClusterOptions::default());
    let e = env_on(&cluster).await;
    assert_eq!(e.proxy.http("/healthz").await.0, 200);
    assert_eq!(e.proxy.http("/readyz").await, (200, "ready\n".to_owned()));
    cluster.stop_server();
    let (status, body) = e.proxy.http("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(e.proxy.http("/healthz").await.0, 200);
    cluster.start_server();
    assert_eq!(e.proxy.http("/readyz").await.0, 200);
    assert_eq!(e.proxy.http("/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_console_command_answers_through_psql_and_tokio_postgres() {
    let e = env().await;
    let app = e.app().await;
    text(&app, "SELECT v FROM items WHERE id = 2").await;
    text(&app, "SELECT v FROM items WHERE id = 2").await;
    let console = e.console().await;
    let commands = [
        ("SHOW STATS", "hits"),
        ("SHOW POOLS", &e.db as &str),
        ("SHOW CLIENTS", &e.db),
        ("SHOW SERVERS", "active"),
        ("SHOW CACHE", "items"),
        ("SHOW RULES", "all-selects"),
        ("SHOW CONFIG", "pool.max_size"),
        ("SHOW QUERIES", "SELECT v FROM items WHERE id = $1"),
        ("SHOW ADVICE", "#"),
        ("EXPLAIN CACHE SELECT v FROM items WHERE id = 2", "items"),
        ("INVALIDATE TABLE items", "entries_removed"),
        ("INVALIDATE RULE items", "entries_removed"),
        ("INVALIDATE ALL", "entries_removed"),
        ("RELOAD", "rules"),
        ("PAUSE", "paused"),
        ("RESUME", "paused"),
    ];
    for (cmd, expect) in commands {
        let via_driver = rows(&console, cmd).await;
        assert!(via_driver.iter().flatten().any(|v| v.contains(expect)), "{cmd}: {via_driver:?}");
        let out = psql(e.proxy.port(), "pgcache", &PgCluster::shared_or_superuser(), &["-c", cmd]).await;
        assert!(out.status.success(), "psql {cmd}: {}", stderr(&out));
        assert!(stdout(&out).contains(expect), "psql {cmd}: {}", stdout(&out));
    }
    let explained = rows(&console, &format!("EXPLAIN CACHE ON {} SELECT v FROM items WHERE id = 2", e.db)).await;
    assert!(
        lookup(&explained, "invalidated")[1].starts_with("by key: writes to public.items pinned to other values of id")
    );
    let rules = rows(&console, "SHOW RULES").await;
    assert_eq!(lookup(&rules, "items")[7], "tables=items");
    assert_eq!(lookup(&rules, "items")[10], "open", "admission standing");
    assert_eq!(lookup(&rules, "all-selects")[7], r#"pattern="(?i)from\\s+numbers""#);
    let stats = rows(&console, "SHOW STATS").await;
    assert_eq!(lookup(&stats, "hits")[1], "1");
    assert_eq!(lookup(&stats, "misses")[1], "1");
    // Several commands in one string; an unknown one gets an error listing the commands.
    let pools = rows(&console, "SHOW POOLS").await.len();
    assert_eq!(rows(&console, "SHOW POOLS; SHOW STATS").await.len(), pools + stats.len());
    let err = console.simple_query("FLUSH EVERYTHING").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42601");
    assert!(db.hint().unwrap_or("").contains("QUERIES"), "{db:?}");
}

/// The console in the extended protocol, as tokio-postgres sends it (Parse and Describe of a
/// statement, then Bind and Execute): the same answers as in the simple protocol; a command
/// that changes something runs when executed, not when described; errors are Postgres's and
/// leave the session usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_speaks_the_extended_protocol() {
    let e = env().await;
    let console = e.console().await;
    let simple = rows(&console, "SHOW RULES").await;
    let extended = console.query("SHOW RULES", &[]).await.unwrap();
    assert_eq!(extended.len(), simple.len());
    let statement = console.prepare("show rules").await.unwrap();
    assert_eq!(statement.columns().len(), simple[0].len());
    assert_eq!(statement.columns()[0].name(), "name");
    let again = console.query(&statement, &[]).await.unwrap();
    let first: Vec<Option<String>> = (0..again[1].len()).map(|i| again[1].get(i)).collect();
    assert_eq!(first, simple[1].iter().map(|v| Some(v.clone())).collect::<Vec<_>>());
    // Described (Parse, Describe, Sync) but not executed: not paused.
    let pause = console.prepare("PAUSE").await.unwrap();
    assert_eq!(pause.columns().iter().map(|c| c.name()).collect::<Vec<_>>(), ["item", "value"]);
    let paused = |rows: Vec<tokio_postgres::Row>| {
        rows.iter().find(|r| r.get::<_, &str>(0) == "paused").map(|r| r.get::<_, String>(1)).unwrap()
    };
    assert_eq!(paused(console.query("SHOW STATS", &[]).await.unwrap()), "no");
    console.execute(&pause, &[]).await.unwrap();
    assert_eq!(paused(console.query("SHOW STATS", &[]).await.unwrap()), "yes");
    let resumed = console.query("RESUME", &[]).await.unwrap();
    assert_eq!(resumed[0].get::<_, &str>(1), "no");
    assert_eq!(paused(console.query("SHOW STATS", &[]).await.unwrap()), "no");
    // What drivers send as they connect is accepted (and changes nothing: no session
    // settings); any other setting is refused rather than seeming to take.
    console.batch_execute("SET application_name = 'ops'").await.unwrap();
    assert_eq!(console.execute("SET extra_float_digits = 3", &[]).await.unwrap(), 0);
    let err = console.batch_execute("SET ROLE nobody").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("0A000"), "{err}");
    // Errors: an unknown command, two commands in one statement.
    let err = console.query("SHOW NOTHING", &[]).await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42601"), "{err}");
    let err = console.prepare("SHOW STATS; SHOW POOLS").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("42601"), "{err}");
    assert!(!console.query("SHOW STATS", &[]).await.unwrap().is_empty());
}

/// Every console command's columns are known without running it: what a Describe of its
/// statement says is what running it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_commands_are_described_as_they_answer() {
    let e = env().await;
    let console = e.console().await;
    let commands = [
        "SHOW STATS",
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW SERVERS",
        "SHOW CACHE",
        "SHOW RULES",
        "SHOW CONFIG",
        "SHOW QUERIES",
        "SHOW ADVICE",
        "SHOW PEERS",
        "SHOW L2",
        "SHOW REPLICAS",
        "EXPLAIN CACHE SELECT v FROM items WHERE id = 1",
        "INVALIDATE RULE items",
        "RELOAD",
        "PAUSE",
        "RESUME",
        "INVALIDATE TABLE items",
        "INVALIDATE ALL",
        "SET application_name = 'ops'",
        // Last: the block refuses what changes something.
        "BEGIN",
        "SAVEPOINT s",
        "RELEASE s",
        "COMMIT",
    ];
    for command in commands {
        let described: Vec<String> =
            console.prepare(command).await.unwrap().columns().iter().map(|c| c.name().to_owned()).collect();
        let mut answered = Vec::new();
        for m in console.simple_query(command).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::RowDescription(columns) = m {
                answered = columns.iter().map(|c| c.name().to_owned()).collect();
            }
        }
        assert_eq!(described, answered, "{command}");
    }
}

/// Drivers open transaction blocks unless told not to: the console keeps them as Postgres
/// would (the status in ReadyForQuery, a block failed by an error until its end) and refuses
/// inside one the commands that change something, which no ROLLBACK could undo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_keeps_transaction_blocks_as_drivers_open_them() {
    use common::raw::{RawConn, batch, bind, describe, execute, parse, query, sync};
    let e = env().await;
    let mut console = e.console().await;
    let tx = console.transaction().await.unwrap();
    assert!(!tx.query("SHOW CONFIG", &[]).await.unwrap().is_empty());
    let err = tx.batch_execute("PAUSE").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("25001"), "{err}");
    let err = tx.query("SHOW STATS", &[]).await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("25P02"), "{err}");
    tx.rollback().await.unwrap();
    let stats = rows(&console, "SHOW STATS").await;
    assert_eq!(lookup(&stats, "paused")[1], "no", "PAUSE did not run");
    // A savepoint takes a failed block back to work.
    let tx = console.transaction().await.unwrap();
    tx.batch_execute("SAVEPOINT before").await.unwrap();
    tx.batch_execute("SHOW NOTHING").await.unwrap_err();
    let err = tx.query("SHOW STATS", &[]).await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("25P02"), "{err}");
    tx.batch_execute("ROLLBACK TO SAVEPOINT before").await.unwrap();
    assert!(!tx.query("SHOW STATS", &[]).await.unwrap().is_empty());
    let err = tx.batch_execute("RELEASE SAVEPOINT never").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("3B001"), "{err}");
    tx.rollback().await.unwrap();
    let err = console.batch_execute("SAVEPOINT outside").await.unwrap_err();
    assert_eq!(err.as_db_error().map(|d| d.code().code()), Some("25P01"), "{err}");
    // The status each ReadyForQuery reports, and the tags.
    let mut c = RawConn::connect(e.proxy.addr, &PgCluster::shared_or_superuser(), "pgcache", &[]).await;
    let status = |got: &[common::raw::Msg]| got.last().map(|m| m.body[0] as char);
    let tag = |got: &[common::raw::Msg]| {
        got.iter()
            .rev()
            .find(|m| m.tag == b'C')
            .map(|m| String::from_utf8_lossy(&m.body).trim_end_matches('\0').to_owned())
    };
    let got = c.exchange(&query("BEGIN"), 1).await;
    assert_eq!((status(&got), tag(&got).as_deref()), (Some('T'), Some("BEGIN")), "{got:?}");
    let got = c.exchange(&query("SHOW STATS"), 1).await;
    assert_eq!(status(&got), Some('T'), "{got:?}");
    let got = c.exchange(&query("SHOW NOTHING"), 1).await;
    assert_eq!(status(&got), Some('E'), "{got:?}");
    let got = c.exchange(&query("COMMIT"), 1).await;
    assert_eq!((status(&got), tag(&got).as_deref()), (Some('I'), Some("ROLLBACK")), "a failed block rolls back");
    // An end outside a block warns, as Postgres does.
    let got = c.exchange(&query("COMMIT"), 1).await;
    assert!(got.iter().any(|m| m.tag == b'N' && String::from_utf8_lossy(&m.body).contains("25P01")), "{got:?}");
    assert_eq!(status(&got), Some('I'));
    // Outside a block an error keeps nothing.
    let got = c.exchange(&query("SHOW NOTHING"), 1).await;
    assert_eq!(status(&got), Some('I'), "{got:?}");
    // The same in the extended protocol, whose Sync reports the status.
    let run = |sql: &str| batch(&[parse("", sql, &[]), bind("", "", &[], &[]), execute("", 0), sync()]);
    let got = c.exchange(&run("START TRANSACTION READ ONLY"), 1).await;
    assert_eq!((status(&got), tag(&got).as_deref()), (Some('T'), Some("START TRANSACTION")), "{got:?}");
    let got = c.exchange(&batch(&[parse("shown", "SHOW STATS", &[]), parse("done", "ROLLBACK", &[]), sync()]), 1).await;
    assert_eq!(status(&got), Some('T'), "{got:?}");
    let got = c.exchange(&run("SHOW NOTHING"), 1).await;
    assert_eq!(status(&got), Some('E'), "{got:?}");
    // A failed block refuses the Parse itself, as Postgres does.
    let got = c.exchange(&batch(&[parse("", "SHOW STATS", &[]), sync()]), 1).await;
    assert!(String::from_utf8_lossy(&got[0].body).contains("25P02"), "{got:?}");
    assert_eq!(status(&got), Some('E'), "{got:?}");
    // A refused Parse into the unnamed statement dropped the old one (START TRANSACTION), as
    // in Postgres.
    let got = c.exchange(&batch(&[describe(b'S', ""), sync()]), 1).await;
    assert!(got[0].tag == b'E' && String::from_utf8_lossy(&got[0].body).contains("26000"), "{got:?}");
    // A Describe of rows (a statement prepared before the failure) is refused, and the rest of
    // the batch skipped; the block stays failed.
    let got = c.exchange(&batch(&[describe(b'S', "shown"), describe(b'S', "done"), sync()]), 1).await;
    assert_eq!(got.iter().map(|m| m.tag).collect::<Vec<_>>(), b"EZ", "{got:?}");
    assert!(String::from_utf8_lossy(&got[0].body).contains("25P02"), "{got:?}");
    assert_eq!(status(&got), Some('E'), "{got:?}");
    // One of the block's end is answered.
    let got = c.exchange(&batch(&[describe(b'S', "done"), sync()]), 1).await;
    assert_eq!(got.iter().map(|m| m.tag).collect::<Vec<_>>(), b"tnZ", "{got:?}");
    let got = c.exchange(&run("ROLLBACK"), 1).await;
    assert_eq!((status(&got), tag(&got).as_deref()), (Some('I'), Some("ROLLBACK")), "{got:?}");
    let got = c.exchange(&run("SHOW NOTHING"), 1).await;
    assert_eq!(status(&got), Some('I'), "{got:?}");
}

/// The console's portals in raw messages: an Execute's row limit leaves the rest in the portal
/// (PortalSuspended) for the next Execute; a Describe runs nothing; after an error everything up
/// to the Sync is skipped; the Sync closes the portals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_portals_keep_their_rows_between_executes() {
    use common::raw::{RawConn, batch, bind, describe, execute, parse, query, sync};
    let e = env().await;
    let mut c = RawConn::connect(e.proxy.addr, &PgCluster::shared_or_superuser(), "pgcache", &[]).await;
    let config = c.exchange(&query("SHOW CONFIG"), 1).await;
    let total = config.iter().filter(|m| m.tag == b'D').count();
    assert!(total > 4, "{config:?}");
    let got = c
        .exchange(
            &batch(&[
                parse("", "SHOW CONFIG", &[]),
                bind("", "", &[], &[1]),
                describe(b'P', ""),
                execute("", 3),
                execute("", 0),
                sync(),
            ]),
            1,
        )
        .await;
    let tags: String = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, format!("12T{}s{}CZ", "D".repeat(3), "D".repeat(total - 3)), "{got:?}");
    // The last Execute's count, as Postgres gives it: the rows it sent.
    assert_eq!(&got[got.len() - 2].body[..], format!("SELECT {}\0", total - 3).as_bytes());
    // The described formats are the Bind's: binary, whose form of text is the text.
    assert!(got[2].body.ends_with(&[0, 1]), "{:?}", got[2]);
    // An unknown portal: the error, then nothing until the Sync. The Sync closed the portal.
    let got = c.exchange(&batch(&[execute("", 0), parse("x", "SHOW STATS", &[]), sync()]), 1).await;
    let tags: String = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "EZ", "{got:?}");
    assert!(String::from_utf8_lossy(&got[0].body).contains("34000"), "{got:?}");
    // A Describe runs nothing (every command's columns are known): a portal runs its command
    // at its first Execute, so a client connecting after the Describe is in the rows.
    let described = c
        .exchange(
            &batch(&[
                parse("", "SHOW CLIENTS", &[]),
                bind("", "", &[], &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            1,
        )
        .await;
    let before = described.iter().filter(|m| m.tag == b'D').count();
    c.send(&batch(&[bind("p", "", &[], &[]), describe(b'P', "p"), common::raw::flush()])).await;
    assert_eq!(c.recv().await.tag, b'2');
    assert_eq!(c.recv().await.tag, b'T');
    let _another = e.app().await;
    let got = c.exchange(&batch(&[describe(b'P', "p"), execute("p", 0), sync()]), 1).await;
    assert_eq!(got.iter().filter(|m| m.tag == b'D').count(), before + 1, "{got:?}");
    // Result formats for neither every column nor all of them: refused at the Bind.
    let got = c.exchange(&batch(&[parse("", "SHOW STATS", &[]), bind("", "", &[], &[0, 1]), sync()]), 1).await;
    let tags: String = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "1EZ", "{got:?}");
    assert!(String::from_utf8_lossy(&got[1].body).contains("08P01"), "{got:?}");
    // Closing a statement closes the portals bound from it.
    let got = c
        .exchange(
            &batch(&[
                parse("closing", "SHOW STATS", &[]),
                bind("q", "closing", &[], &[]),
                common::raw::close(b'S', "closing"),
                execute("q", 0),
                sync(),
            ]),
            1,
        )
        .await;
    let tags: String = got.iter().map(|m| m.tag as char).collect();
    assert_eq!(tags, "123EZ", "{got:?}");
    assert!(String::from_utf8_lossy(&got[3].body).contains("34000"), "{got:?}");
    // 256 named statements at most; the unnamed one is never refused for it.
    let many: Vec<_> = (0..256).map(|i| parse(&format!("s{i}"), "SHOW STATS", &[])).chain([sync()]).collect();
    let got = c.exchange(&batch(&many), 1).await;
    assert!(got.iter().all(|m| m.tag == b'1' || m.tag == b'Z'), "{:?}", got.last());
    let got = c.exchange(&batch(&[parse("one_more", "SHOW STATS", &[]), sync()]), 1).await;
    assert!(String::from_utf8_lossy(&got[0].body).contains("54000"), "{got:?}");
    let got =
        c.exchange(&batch(&[parse("", "SHOW STATS", &[]), bind("", "", &[], &[]), execute("", 0), sync()]), 1).await;
    assert_eq!(got.last().map(|m| m.tag), Some(b'Z'));
    assert!(got.iter().all(|m| m.tag != b'E'), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_may_use_the_console() {
    let e = env().await;
    let role = format!("notadmin_{}", std::process::id());
    e.admin.batch_execute(&format!("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF; END $$")).await.unwrap();
    let err =
        tokio_postgres::connect(&e.proxy.url("pgcache", &role), tokio_postgres::NoTls).await.err().expect("refused");
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err:?}");
    // The same role can use its application database.
    let app = e.proxy.connect(&e.db, &role).await;
    app.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_and_reload_take_effect_for_the_next_query() {
    let e = env().await;
    let app = e.app().await;
    let console = e.console().await;
    let sql = "SELECT v FROM items WHERE id = 3";
    let shape = "FROM items WHERE id";
    text(&app, sql).await;
    let n = executions(&e.admin, shape).await;
    text(&app, sql).await;
    assert_eq!(executions(&e.admin, shape).await, n, "a hit");
    for cmd in ["INVALIDATE TABLE items", "INVALIDATE TABLE public.items", "INVALIDATE RULE items", "INVALIDATE ALL"] {
        rows(&console, cmd).await;
        let n = executions(&e.admin, shape).await;
        text(&app, sql).await;
        assert_eq!(executions(&e.admin, shape).await, n + 1, "{cmd}: the next read reached Postgres");
        text(&app, sql).await;
        assert_eq!(executions(&e.admin, shape).await, n + 1, "{cmd}: and was cached again");
    }
    std::fs::write(
        e.dir.path().join("rules.toml"),
        "[[rule]]\nname = \"off\"\nmatch = { tables = [\"items\"] }\naction = \"bypass\"\n",
    )
    .unwrap();
    let reloaded = rows(&console, "RELOAD").await;
    assert_eq!(lookup(&reloaded, "rules")[1], "1");
    let n = executions(&e.admin, shape).await;
    text(&app, sql).await;
    text(&app, sql).await;
    assert_eq!(executions(&e.admin, shape).await, n + 2, "bypassed after RELOAD");
    // A broken file: RELOAD fails with the error, and the rules stay.
    std::fs::write(e.dir.path().join("rules.toml"), "[[rule]]\nname = \"x\"\n").unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert!(err.as_db_error().unwrap().message().contains("rules.toml"), "{err:?}");
    assert_eq!(rows(&console, "SHOW RULES").await[0][0], "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_queries_explains_why_a_query_is_not_cached() {
    let e = env().await;
    let app = e.app().await;
    for _ in 0..3 {
        text(&app, "SELECT x, random() FROM numbers").await;
        text(&app, "SELECT x FROM numbers WHERE x > 2").await;
    }
    let console = e.console().await;
    let q = rows(&console, "SHOW QUERIES").await;
    let volatile = q.iter().find(|r| r[0].contains("random()")).unwrap_or_else(|| panic!("{q:?}"));
    assert_eq!(volatile[1], "3", "calls");
    assert_eq!(volatile[10], "calls a volatile function");
    let cached = q.iter().find(|r| r[0] == "SELECT x FROM numbers WHERE x > $1").unwrap_or_else(|| panic!("{q:?}"));
    assert_eq!(
        (cached[5].as_str(), cached[6].as_str(), cached[9].as_str(), cached[10].as_str()),
        ("2", "1", "all-selects", "yes")
    );
    let explained = rows(&console, &format!("EXPLAIN CACHE ON {} SELECT x, random() FROM numbers", e.db)).await;
    assert_eq!(lookup(&explained, "cacheable")[1], "no: calls a volatile function");
    let explained = rows(&console, &format!("EXPLAIN CACHE ON {} SELECT x FROM numbers WHERE x > 2", e.db)).await;
    assert_eq!(lookup(&explained, "cacheable")[1], "yes");
    assert_eq!(lookup(&explained, "entries")[1], "1");
    assert!(lookup(&explained, "rule")[1].starts_with("all-selects"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_advice_drafts_rules_that_load() {
    let e = env().await;
    let app = e.app().await;
    for i in 0..20 {
        text(&app, &format!("SELECT v FROM uncached WHERE k = {}", i % 2 + 1)).await;
    }
    let console = e.console().await;
    let advice: Vec<String> = rows(&console, "SHOW ADVICE").await.into_iter().map(|r| r[0].clone()).collect();
    let toml = advice.join("\n");
    assert!(toml.contains("SELECT v FROM uncached WHERE k = $1"), "{toml}");
    let dir = rules_dir(&[("advice.toml", &toml)]);
    let set = pgcache::rules::load_dir(dir.path(), 1).unwrap_or_else(|err| panic!("{err}\n{toml}"));
    assert!(!set.rules.is_empty());
    // And the drafted rule does cache the query once loaded.
    std::fs::write(e.dir.path().join("advice.toml"), &toml).unwrap();
    rows(&console, "RELOAD").await;
    text(&app, "SELECT v FROM uncached WHERE k = 1").await;
    let n = executions(&e.admin, "FROM uncached WHERE k").await;
    text(&app, "SELECT v FROM uncached WHERE k = 1").await;
    assert_eq!(executions(&e.admin, "FROM uncached WHERE k").await, n);
}

/// A point read on a table whose writes are pinned to other keys: the advisor counts each such
/// write for the share of keys it touched, not against every entry, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_advice_counts_writes_to_other_keys_by_their_share() {
    let e = env().await;
    e.admin.batch_execute("INSERT INTO uncached SELECT g, 'u' || g FROM generate_series(6, 400) g").await.unwrap();
    let app = e.app().await;
    for i in 0..20 {
        text(&app, &format!("SELECT v FROM uncached WHERE k = {}", i % 2 + 1)).await;
    }
    for k in 3..=202 {
        text(&app, &format!("UPDATE uncached SET v = v WHERE k = {k}")).await;
    }
    // The control: counted in full, 200 writes against 20 reads of two keys leave no candidate
    // (at the shortest period the estimate uses; longer ones scale reads and writes alike).
    let naive = pgcache::stats::estimated_hit_ratio(20, 2, 200, Duration::from_secs(1), Duration::from_secs(60), None);
    assert!(naive < 0.3, "{naive}");
    let console = e.console().await;
    let advice: Vec<String> = rows(&console, "SHOW ADVICE").await.into_iter().map(|r| r[0].clone()).collect();
    let toml = advice.join("\n");
    assert!(toml.contains("SELECT v FROM uncached WHERE k = $1"), "{toml}");
    assert!(toml.contains("200 writes seen (invalidated by key"), "{toml}");
    let q = rows(&console, "SHOW QUERIES").await;
    let read = q.iter().find(|r| r[0] == "SELECT v FROM uncached WHERE k = $1").unwrap_or_else(|| panic!("{q:?}"));
    assert_eq!(read[12], "200", "table_writes shows every write");
    assert!(read[15].parse::<f64>().unwrap() >= 0.3, "{read:?}");
}

/// Reads of keys that are never read twice: the advisor counts their distinct keys (it once
/// counted none for a read no rule caches, and so took every such read for one of a single hot
/// key) and does not draft a rule that would only pay for fills; a read of two hot keys in the
/// same run is drafted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_advice_leaves_out_reads_of_keys_never_read_twice() {
    let e = env().await;
    e.admin.batch_execute("INSERT INTO uncached SELECT g, 'u' || g FROM generate_series(6, 1000) g").await.unwrap();
    let app = e.app().await;
    // Extended protocol: the key is in the parameters. 120 reads, each of its own key.
    let spread = app.prepare("SELECT v FROM uncached WHERE k = $1 AND v IS NOT NULL").await.unwrap();
    for i in 0..120 {
        let k: i32 = 7 * i + 10;
        app.query(&spread, &[&k]).await.unwrap();
    }
    // Simple protocol: the key is in the text. 40 reads of two keys.
    for i in 0..40 {
        text(&app, &format!("SELECT v FROM uncached WHERE k = {}", i % 2 + 1)).await;
    }
    let console = e.console().await;
    let q = rows(&console, "SHOW QUERIES").await;
    let row = |sql: &str| q.iter().find(|r| r[0] == sql).unwrap_or_else(|| panic!("{sql}: {q:?}")).clone();
    let spread = row("SELECT v FROM uncached WHERE k = $1 AND v IS NOT NULL");
    assert_eq!(spread[13], "120", "distinct_keys {spread:?}");
    assert_eq!(spread[15], "0.000", "{spread:?}");
    let hot = row("SELECT v FROM uncached WHERE k = $1");
    assert_eq!(hot[13], "2", "{hot:?}");
    assert!(hot[15].parse::<f64>().unwrap() >= 0.3, "{hot:?}");
    let advice: Vec<String> = rows(&console, "SHOW ADVICE").await.into_iter().map(|r| r[0].clone()).collect();
    let toml = advice.join("\n");
    assert!(toml.contains("match = { query = \"SELECT v FROM uncached WHERE k = $1\" }"), "{toml}");
    assert!(!toml.contains("AND v IS NOT NULL"), "{toml}");
}

/// Reads that only lack a rule but that a rule would not cache either (a volatile function: the
/// catalog says so only once a rule matches) are not drafted, and SHOW QUERIES says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_advice_drafts_no_rule_a_read_would_not_be_cached_under() {
    let e = env().await;
    e.admin
        .batch_execute(
            "CREATE SEQUENCE ops_seq; CREATE FUNCTION ops_pick(int) RETURNS int VOLATILE LANGUAGE sql AS 'SELECT $1'",
        )
        .await
        .unwrap();
    let app = e.app().await;
    for _ in 0..30 {
        text(&app, "SELECT ops_pick(1)").await;
        text(&app, "SELECT nextval('ops_seq')").await;
        text(&app, "SELECT v FROM uncached WHERE k = 3").await;
    }
    let console = e.console().await;
    let q = rows(&console, "SHOW QUERIES").await;
    let row = |sql: &str| q.iter().find(|r| r[0] == sql).unwrap_or_else(|| panic!("{sql}: {q:?}")).clone();
    for sql in ["SELECT ops_pick($1)", "SELECT nextval($1)"] {
        let r = row(sql);
        assert!(r[10].contains("volatile"), "cacheable {r:?}");
        assert_eq!(r[15], "", "no estimate for what no rule would cache: {r:?}");
    }
    let advice: Vec<String> = rows(&console, "SHOW ADVICE").await.into_iter().map(|r| r[0].clone()).collect();
    let toml = advice.join("\n");
    assert!(toml.contains("SELECT v FROM uncached WHERE k = $1"), "{toml}");
    assert!(!toml.contains("ops_pick") && !toml.contains("nextval"), "{toml}");
}

/// A read that calls a stable function (`now()`) is cached only by a rule that opts in: the
/// advisor drafts it with `allow_stable_functions = true` (it was once left out, as if nothing
/// could cache it), SHOW QUERIES says what it takes, and the draft caches it once loaded. A
/// read of a table with row security is drafted with `allow_row_security = true` commented out,
/// for the operator to decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_advice_drafts_a_read_of_a_stable_function_with_its_opt_in() {
    let e = env().await;
    e.admin
        .batch_execute(
            "CREATE TABLE ops_private (k int PRIMARY KEY, v text); INSERT INTO ops_private VALUES (1, 'p'); \
             ALTER TABLE ops_private ENABLE ROW LEVEL SECURITY",
        )
        .await
        .unwrap();
    let app = e.app().await;
    let sql = "SELECT v FROM uncached WHERE k = 1 AND now() > '2000-01-01'";
    for _ in 0..30 {
        text(&app, sql).await;
        text(&app, "SELECT v FROM ops_private WHERE k = 1").await;
    }
    let console = e.console().await;
    let q = rows(&console, "SHOW QUERIES").await;
    let read = q.iter().find(|r| r[0].contains("now()")).unwrap_or_else(|| panic!("{q:?}"));
    assert!(read[10].contains("would be cached by a rule that sets allow_stable_functions"), "cacheable {read:?}");
    let private = q.iter().find(|r| r[0].contains("ops_private")).unwrap_or_else(|| panic!("{q:?}"));
    assert!(private[10].contains("would be cached by a rule that sets allow_row_security"), "{private:?}");
    assert!(read[15].parse::<f64>().unwrap() >= 0.3, "{read:?}");
    let advice: Vec<String> = rows(&console, "SHOW ADVICE").await.into_iter().map(|r| r[0].clone()).collect();
    let toml = advice.join("\n");
    // Each draft is its comment and its table, after an empty line.
    let drafted = |needle: &str| toml.split("\n\n").find(|d| d.contains(needle)).unwrap_or_else(|| panic!("{toml}"));
    let stable = drafted("now()");
    assert!(stable.contains("allow_stable_functions = true") && !stable.contains("allow_row_security"), "{toml}");
    assert!(stable.contains("as it calls a stable function"), "{toml}");
    // Row security is drafted for the operator to turn on: what a policy reads is not watched.
    let private = drafted("ops_private");
    assert!(private.contains("\n# allow_row_security = true") && !private.contains("\nallow_row"), "{toml}");
    assert!(!private.contains("allow_stable"), "{toml}");
    std::fs::write(e.dir.path().join("advice.toml"), &toml).unwrap();
    rows(&console, "RELOAD").await;
    text(&app, sql).await;
    let n = executions(&e.admin, "AND now() >").await;
    text(&app, sql).await;
    assert_eq!(executions(&e.admin, "AND now() >").await, n, "the drafted rule caches it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_backend_work_until_resume() {
    let e = env().await;
    let app = e.app().await;
    let console = e.console().await;
    rows(&console, "PAUSE").await;
    let waiting = tokio::spawn(async move { text(&app, "SELECT count(*) FROM uncached").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the query waits while paused");
    assert_eq!(lookup(&rows(&console, "SHOW STATS").await, "paused")[1], "yes");
    rows(&console, "RESUME").await;
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap(), "5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_reports_the_admin_endpoint() {
    let e = env().await;
    let run = |addr: String| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
                .args(["healthcheck", "--admin", &addr])
                .output()
                .unwrap()
        })
    };
    assert!(run(e.proxy.admin.to_string()).await.unwrap().status.success());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    assert!(!run(closed.to_string()).await.unwrap().status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_cache_and_show_queries_agree_with_the_data_path() {
    let schema = "CREATE TABLE products (id int PRIMARY KEY, name text, category_id int, price numeric);
        INSERT INTO products SELECT g, 'p' || g, g % 5, g FROM generate_series(1, 20) g;
        CREATE TABLE secrets (id int, v text); INSERT INTO secrets VALUES (1, 's');
        ALTER TABLE secrets ENABLE ROW LEVEL SECURITY; CREATE POLICY open ON secrets USING (true);";
    let rules = "[[rule]]\nname = \"products\"\nmatch = { tables = [\"public.products\"] }\nttl = \"1h\"\n\n\
                 [[rule]]\nname = \"secrets\"\nmatch = { tables = [\"secrets\"] }\nttl = \"1h\"\n";
    let admins = vec![PgCluster::shared_or_superuser()];
    let e = cache_env(PgCluster::shared(), "ops", schema, rules, |c| c.console.users = admins).await;
    let app = e.app().await;
    let products = "SELECT name, price FROM products WHERE category_id = 3 ORDER BY price LIMIT 5";
    let secret = "SELECT v FROM secrets";
    for _ in 0..2 {
        text(&app, products).await;
        text(&app, secret).await;
    }
    let console = e.console().await;
    let explained = rows(&console, &format!("EXPLAIN CACHE ON {} {products}", e.db)).await;
    assert!(lookup(&explained, "rule")[1].starts_with("products"), "{explained:?}");
    assert_eq!(lookup(&explained, "cacheable")[1], "yes", "{explained:?}");
    assert_eq!(lookup(&explained, "entries")[1], "1", "{explained:?}");
    let explained = rows(&console, &format!("EXPLAIN CACHE ON {} {secret}", e.db)).await;
    assert!(lookup(&explained, "cacheable")[1].contains("row-level security"), "{explained:?}");
    let q = rows(&console, "SHOW QUERIES").await;
    let p = q.iter().find(|r| r[0].starts_with("SELECT name, price FROM products")).unwrap_or_else(|| panic!("{q:?}"));
    assert_eq!((p[5].as_str(), p[6].as_str(), p[9].as_str(), p[10].as_str()), ("1", "1", "products", "yes"));
    let s = q.iter().find(|r| r[0] == secret).unwrap_or_else(|| panic!("{q:?}"));
    assert!(s[10].contains("row-level security"), "{s:?}");
}

/// `--worker-threads 1`: one thread runs every session. Concurrent clients in transaction
/// pooling, two backends between eight of them, get pass-through answers, cache hits
/// (Postgres runs each cached read once) and the invalidation their own writes cause; the
/// process says on /metrics how many threads run its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_serves_concurrent_sessions() {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let schema = "CREATE TABLE items (id int PRIMARY KEY, v text);
                  INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 8) g;";
    let (db, admin) = common::fresh_db(cluster, "one_worker", schema).await;
    let dir = rules_dir(&[("r.toml", "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n")]);
    let upstream = cluster.url(&db, &user);
    let rules = dir.path().to_str().unwrap();
    let args = ["--rules", rules, "--worker-threads", "1", "--pool-mode", "transaction", "--pool-size", "2"];
    let proxy = ProxyProcess::start(&upstream, &args).await;
    assert_eq!(proxy.metric("pgcache_runtime_workers").await, 1.0);
    let url = format!("postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable", proxy.port);
    let clients: Vec<_> = (1..=8)
        .map(|id| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = common::proxy::connect(&url).await;
                let read = format!("SELECT v FROM items WHERE id = {id}");
                for _ in 0..20 {
                    assert_eq!(text(&c, &read).await, format!("v{id}"));
                    assert_eq!(text(&c, "SELECT count(*) FROM pg_class WHERE relname = 'items'").await, "1");
                }
                c.batch_execute(&format!("UPDATE items SET v = 'new{id}' WHERE id = {id}")).await.unwrap();
                assert_eq!(text(&c, &read).await, format!("new{id}"));
            })
        })
        .collect();
    // A session that needed a second thread would hang here: a deadline makes it a failure.
    let all = futures_util::future::join_all(clients);
    for c in tokio::time::timeout(Duration::from_secs(60), all).await.expect("every client finished") {
        c.unwrap();
    }
    assert_eq!(executions(&admin, "FROM items WHERE id").await, 16, "each key read once before its write, once after");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["--upstream", &upstream, "--auth", "cleartext"])
        .env("PGCACHE_WORKER_THREADS", "0")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("worker_threads"), "the key at fault is named");
}
