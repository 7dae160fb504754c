//! The drivers applications use, through pgcache: asyncpg, psycopg 3, node-postgres and pgjdbc
//! each run their suite (`tests/drivers/`): connect, typed parameters, prepared statements
//! (each driver's own naming and statement cache), an error in a transaction and rollback,
//! SQLSTATE and error fields, COPY both ways, LISTEN/NOTIFY, cancel, `SET` persistence, a second
//! connection seeing nothing of the first's settings, role or custom settings (while it is
//! connected and after it left), a large streamed result, pipelining where the driver has it,
//! temporary tables. Each runs with no
//! rules and with a rule that caches every SELECT; with the rule, the suite proves through
//! `pg_stat_statements` that repeats were answered from the cache.
//!
//! Each runs in session pooling and in transaction pooling (a pool of 3 backends for up to
//! ten connections at once), and logging in with SCRAM-SHA-256 as a role with a password.
//!
//! The drivers come from `tests/drivers/install.sh` (which `.ci/run` calls).

mod common;

use std::time::Duration;

use common::{PgCluster, Proxy, rules_dir};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Cached,
    /// Transaction pooling with a pool of 3 per (database, user), no rules.
    Transaction,
    /// Transaction pooling with everything cached.
    TransactionCached,
    /// Clients log in with SCRAM-SHA-256 (pgcache checks the proof against the role's
    /// verifier and logs into Postgres with the keys), everything cached.
    Scram,
}

/// Where the suites live.
fn suites() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// `postgres://user[:pw]@host:port/db?...` as a JDBC URL.
fn jdbc(url: &str) -> String {
    let rest = url.strip_prefix("postgres://").expect("a postgres:// URL");
    let (auth, rest) = rest.split_once('@').expect("user@host");
    let (host, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (user, password) = auth.split_once(':').map_or((auth, None), |(u, p)| (u, Some(p)));
    let mut out = format!("jdbc:postgresql://{host}?user={user}");
    if let Some(p) = password {
        out += &format!("&password={p}");
    }
    if !query.is_empty() {
        out += &format!("&{query}");
    }
    out
}

async fn run(driver: &str, mode: Mode) {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let db = cluster.create_db(&format!("drv_{driver}")).await;
    cluster
        .admin(&db)
        .await
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
             DO $$ BEGIN CREATE ROLE drv_other;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             SET password_encryption = 'scram-sha-256';
             DO $$ BEGIN CREATE ROLE drv_scram SUPERUSER LOGIN PASSWORD 'drv scram pw';
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
        )
        .await
        .unwrap();
    let dir = rules_dir(&[("all.toml", "[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"10m\"\n")]);
    let mut config = Proxy::config(cluster);
    if matches!(mode, Mode::Cached | Mode::TransactionCached | Mode::Scram) {
        config.rules = dir.path().to_owned();
        config.rules_explicit = true;
    }
    if mode == Mode::Scram {
        config.auth.method = pgcache::config::AuthMethod::ScramSha256;
    }
    if matches!(mode, Mode::Transaction | Mode::TransactionCached) {
        // Fewer backends than the suite's connections (up to ten at once).
        config.pool.mode = pgcache::config::PoolMode::Transaction;
        config.pool.max_size = 3;
    }
    let proxy = Proxy::start(config).await;
    let url = match mode {
        Mode::Scram => format!("postgres://drv_scram:drv%20scram%20pw@127.0.0.1:{}/{db}?sslmode=disable", proxy.port()),
        _ => proxy.url(&db, &user),
    };
    let direct = cluster.url(&db, &user);
    let (program, args, url, direct) = match driver {
        "asyncpg" | "psycopg" => {
            ("python3", vec![suites().join(format!("{driver}_suite.py")).display().to_string()], url, direct)
        }
        "node" => ("node", vec![suites().join("node/suite.js").display().to_string()], url, direct),
        "jdbc" => (
            "java",
            vec![
                "-cp".into(),
                "/usr/share/java/postgresql.jar".into(),
                suites().join("JdbcSuite.java").display().to_string(),
            ],
            jdbc(&url),
            jdbc(&direct),
        ),
        other => panic!("unknown driver {other}"),
    };
    let env = vec![
        ("PGCACHE_URL".to_owned(), url),
        ("PGCACHE_DIRECT_URL".to_owned(), direct),
        (
            "PGCACHE_MODE".to_owned(),
            if matches!(mode, Mode::Cached | Mode::TransactionCached | Mode::Scram) { "cached" } else { "plain" }
                .to_owned(),
        ),
        ("NODE_PATH".to_owned(), suites().join("node/node_modules").display().to_string()),
    ];
    let out = tokio::time::timeout(Duration::from_secs(240), common::run_tool(program, args, env, None))
        .await
        .unwrap_or_else(|_| panic!("{driver} ({mode:?}) did not finish within 4 minutes"));
    let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
    assert!(
        out.status.success(),
        "{driver} ({mode:?}) failed; install the drivers with tests/drivers/install.sh if they are missing\n\
         --- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("ok temporary table is never served stale"), "{driver} ran to its end:\n{stdout}");
    assert!(
        stdout.contains("ok isolation: a second connection sees its own session after the first left"),
        "{driver}: the isolation step ran:\n{stdout}"
    );
    if matches!(mode, Mode::Transaction | Mode::TransactionCached) {
        let handoffs = proxy.metric("pgcache_backend_handoffs_total").await;
        assert!(handoffs > 0.0, "{driver}: backends were handed from client to client");
    }
    if mode == Mode::Scram {
        let failures = proxy.metric("pgcache_login_failures_total").await;
        assert_eq!(failures, 0.0, "{driver}: every SCRAM log-in succeeded");
        assert!(proxy.shared.pools.all().iter().any(|p| p.key.user == "drv_scram"), "{driver} logged in as drv_scram");
    }
    if matches!(mode, Mode::Cached | Mode::TransactionCached | Mode::Scram) {
        let t = proxy.shared.stats.totals();
        assert!(t.hits > 0 && t.misses > 0, "{driver}: the cache was used ({} hits, {} misses)", t.hits, t.misses);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_without_rules() {
    run("asyncpg", Mode::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_with_everything_cached() {
    run("asyncpg", Mode::Cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_without_rules() {
    run("psycopg", Mode::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_with_everything_cached() {
    run("psycopg", Mode::Cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_without_rules() {
    run("node", Mode::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_with_everything_cached() {
    run("node", Mode::Cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_without_rules() {
    run("jdbc", Mode::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_with_everything_cached() {
    run("jdbc", Mode::Cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_in_transaction_pooling() {
    run("asyncpg", Mode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_in_transaction_pooling_with_everything_cached() {
    run("asyncpg", Mode::TransactionCached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_in_transaction_pooling() {
    run("psycopg", Mode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_in_transaction_pooling_with_everything_cached() {
    run("psycopg", Mode::TransactionCached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_in_transaction_pooling() {
    run("node", Mode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_in_transaction_pooling_with_everything_cached() {
    run("node", Mode::TransactionCached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_in_transaction_pooling() {
    run("jdbc", Mode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_in_transaction_pooling_with_everything_cached() {
    run("jdbc", Mode::TransactionCached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_logs_in_with_scram() {
    run("asyncpg", Mode::Scram).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_logs_in_with_scram() {
    run("psycopg", Mode::Scram).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_logs_in_with_scram() {
    run("node", Mode::Scram).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_logs_in_with_scram() {
    run("jdbc", Mode::Scram).await;
}

/// The admin console from drivers that speak the extended protocol only (asyncpg, pgjdbc, with
/// its named statements) or once they prepare (psycopg with `prepare=True`, as it does by itself
/// after five runs), in autocommit and in the transaction blocks they open by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_answers_drivers_in_the_extended_protocol() {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let mut config = Proxy::config(cluster);
    config.console.users = vec![user.clone()];
    let proxy = Proxy::start(config).await;
    let url = proxy.url("pgcache", &user);
    let scripts = [
        (
            "asyncpg",
            "import asyncio, asyncpg, os
async def main():
    c = await asyncpg.connect(os.environ['CONSOLE_URL'])
    rows = await c.fetch('SHOW STATS')
    assert any(r['stat'] == 'statements' for r in rows), [dict(r) for r in rows]
    st = await c.prepare('SHOW RULES')
    assert st.get_attributes()[0].name == 'name', st.get_attributes()
    assert (await c.fetchrow('RESUME'))['value'] == 'no'
    async with c.transaction():
        assert any(r['item'] == 'listen' for r in await c.fetch('SHOW CONFIG'))
    await c.close()
    print('ok asyncpg')
asyncio.run(main())",
        ),
        (
            "psycopg",
            "import os, psycopg
with psycopg.connect(os.environ['CONSOLE_URL'], autocommit=True) as c:
    for _ in range(3):
        rows = c.execute('SHOW STATS', prepare=True).fetchall()
        assert any(r[0] == 'statements' for r in rows), rows
# Its default: a transaction block opened before the first command.
with psycopg.connect(os.environ['CONSOLE_URL']) as c:
    rows = c.execute('SHOW STATS').fetchall()
    assert any(r[0] == 'statements' for r in rows), rows
    try:
        c.execute('RESUME')
        raise AssertionError('RESUME ran inside a transaction block')
    except psycopg.errors.ActiveSqlTransaction:
        pass
    c.rollback()
    # A nested transaction is a savepoint; an error in it is rolled back to it.
    with c.transaction():
        c.execute('SHOW STATS')
        try:
            with c.transaction():
                c.execute('SHOW NOTHING')
            raise AssertionError('SHOW NOTHING ran')
        except psycopg.errors.SyntaxError:
            pass
        assert c.execute('SHOW CONFIG').fetchall()
    c.autocommit = True
    assert c.execute('RESUME').fetchone()[0] == 'paused'
    print('ok psycopg')",
        ),
    ];
    for (driver, script) in scripts {
        let env = vec![("CONSOLE_URL".to_owned(), url.clone())];
        let out = common::run_tool("python3", vec!["-c".into(), script.into()], env, None).await;
        let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
        assert!(out.status.success() && stdout.contains(&format!("ok {driver}")), "{driver}: {stdout}\n{stderr}");
    }
    // Named statements from the second run on.
    let jdbc_url = jdbc(&format!("{url}&prepareThreshold=2"));
    let java = format!(
        "import java.sql.*;
public class Console {{ public static void main(String[] a) throws Exception {{
  try (Connection c = DriverManager.getConnection(\"{jdbc_url}\");
       PreparedStatement p = c.prepareStatement(\"SHOW STATS\")) {{
    for (int i = 0; i < 6; i++) {{
      boolean seen = false;
      try (ResultSet r = p.executeQuery()) {{ while (r.next()) seen |= r.getString(\"stat\").equals(\"statements\"); }}
      if (!seen) throw new AssertionError(\"no statements row\");
    }}
  }}
  try (Connection c = DriverManager.getConnection(\"{jdbc_url}\")) {{
    c.setAutoCommit(false);
    try (Statement s = c.createStatement(); ResultSet r = s.executeQuery(\"SHOW POOLS\")) {{ while (r.next()) {{ }} }}
    c.commit();
  }}
  System.out.println(\"ok pgjdbc\");
}} }}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("Console.java");
    std::fs::write(&file, java).unwrap();
    let args = vec!["-cp".into(), "/usr/share/java/postgresql.jar".into(), file.display().to_string()];
    let out = common::run_tool("java", args, Vec::new(), None).await;
    let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
    assert!(out.status.success() && stdout.contains("ok pgjdbc"), "pgjdbc: {stdout}\n{stderr}");
}
