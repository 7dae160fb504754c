//! Transaction pooling (`pool.mode = "transaction"`): clients outnumber backends and keep
//! working — prepared statements under colliding client names, session settings carried from
//! backend to backend, `SET LOCAL` not leaking, state that cannot move pinning the client
//! until it is released, cancel reaching only the client's own query, the cache answering
//! without taking a backend. Each proof is a mechanism: which backend pid answered, what
//! waited, what Postgres executed.

mod common;

use std::time::Duration;

use common::{PgCluster, Proxy, cache_env, text, try_text};
use pgcache::config::{Config, PoolMode};

/// pgcache in transaction pooling with `backends` connections per pool.
fn config(cluster: &PgCluster, backends: usize) -> Config {
    let mut c = Proxy::config(cluster);
    c.pool.mode = PoolMode::Transaction;
    c.pool.max_size = backends;
    // Long enough for a loaded machine, short enough to prove a wait that cannot end.
    c.pool.acquire_timeout = Duration::from_secs(2);
    c
}

async fn setup(prefix: &str, backends: usize) -> (Proxy, String, String) {
    let cluster = PgCluster::shared();
    let db = cluster.create_db(prefix).await;
    let proxy = Proxy::start(config(cluster, backends)).await;
    (proxy, db, cluster.superuser())
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_share_two_backends_with_their_own_prepared_statements() {
    let (proxy, db, user) = setup("txn_share", 2).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(proxy.connect(&db, &user).await);
    }
    // tokio-postgres names every client's first statement "s0": on shared backends each
    // must still run its own text.
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let st = c.prepare(&format!("SELECT $1::int + {i}, pg_backend_pid()")).await.unwrap();
            let mut pids = std::collections::BTreeSet::new();
            for k in 0..50 {
                let row = c.query_one(&st, &[&k]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), k + i as i32, "client {i} got another client's statement");
                pids.insert(row.get::<_, i32>(1));
                tokio::task::yield_now().await;
            }
            (c, pids)
        }));
    }
    let mut pids = std::collections::BTreeSet::new();
    let mut kept = Vec::new();
    for t in tasks {
        let (c, p) = t.await.unwrap();
        pids.extend(p);
        kept.push(c);
    }
    assert!(pids.len() <= 2, "at most two backends served twenty clients: {pids:?}");
    let servers = proxy.shared.pools.all().iter().map(|p| p.servers().len()).sum::<usize>();
    assert!(servers <= 2, "{servers} backend connections");
    assert!(
        proxy.metric("pgcache_backend_handoffs_total").await >= 100.0,
        "backends were handed from client to client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_follow_the_client_from_backend_to_backend() {
    let (proxy, db, user) = setup("txn_set", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    let default_tz = text(&b, "SHOW TimeZone").await;
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'; SET application_name = 'client-a'").await.unwrap();
    let pid_a = text(&a, "SELECT pg_backend_pid()").await;
    // One backend: b now runs on the same connection a left its settings on.
    assert_eq!(text(&b, "SELECT pg_backend_pid()").await, pid_a, "a single backend is shared");
    assert_eq!(text(&b, "SHOW TimeZone").await, default_tz, "a's SET did not leak to b");
    assert_eq!(text(&b, "SHOW application_name").await, "");
    assert_eq!(text(&a, "SHOW TimeZone").await, "Asia/Tokyo", "a's SET survived b's use of the backend");
    assert_eq!(text(&a, "SHOW application_name").await, "client-a");
    assert!(proxy.metric("pgcache_settings_replays_total").await >= 2.0, "settings were reset and replayed");
    // RESET ALL returns a to the defaults, also on the next backend it gets.
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(text(&b, "SELECT 1").await, "1");
    assert_eq!(text(&a, "SHOW TimeZone").await, default_tz);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_local_ends_with_its_transaction() {
    let (proxy, db, user) = setup("txn_local", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    let default = text(&b, "SHOW statement_timeout").await;
    a.batch_execute("BEGIN; SET LOCAL statement_timeout = '1234ms'").await.unwrap();
    assert_eq!(text(&a, "SHOW statement_timeout").await, "1234ms");
    // b waits for a's transaction (the only backend), then sees nothing of it.
    let b_read = tokio::spawn(async move { (text(&b, "SHOW statement_timeout").await, b) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.batch_execute("COMMIT").await.unwrap();
    let (seen, _b) = b_read.await.unwrap();
    assert_eq!(seen, default, "SET LOCAL leaked to the next client");
    assert_eq!(text(&a, "SHOW statement_timeout").await, default);
}

/// `take` pins the client to its backend: with one backend another client waits and times out
/// (53300); after `release` it gets the backend.
async fn pins_until_released(reason: &str, take: &str, release: &str) {
    let (proxy, db, user) = setup(&format!("txn_pin_{reason}"), 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    a.batch_execute(take).await.unwrap_or_else(|e| panic!("{take}: {e}"));
    let err = try_text(&b, "SELECT 1").await.expect_err("the only backend is pinned to a");
    assert_eq!(sqlstate(&err), "53300", "{reason}: {err}");
    let series = format!("pgcache_pins_total{{reason=\"{reason}\"}}");
    assert_eq!(proxy.metric(&series).await, 1.0, "{series}");
    assert_eq!(text(&a, "SELECT 2").await, "2", "the pinned client keeps its backend");
    a.batch_execute(release).await.unwrap_or_else(|e| panic!("{release}: {e}"));
    assert_eq!(text(&b, "SELECT 3").await, "3", "{reason}: released by {release}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_until_unlisten() {
    pins_until_released("listen", "LISTEN pool_chan", "UNLISTEN *").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holdable_cursor_pins_until_closed() {
    pins_until_released("cursor", "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "CLOSE c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_prepare_pins_until_deallocated() {
    pins_until_released("prepare", "PREPARE p (int) AS SELECT $1 + 1; EXECUTE p(1)", "DEALLOCATE p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_advisory_lock_pins_until_unlocked() {
    pins_until_released("advisory_lock", "SELECT pg_advisory_lock(42)", "SELECT pg_advisory_unlock_all()").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tables_pin_until_discarded() {
    pins_until_released("temp", "CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)", "DISCARD TEMP").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_authorization_pins() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("txn_auth").await;
    cluster.admin(&db).await.batch_execute("DROP ROLE IF EXISTS txn_other; CREATE ROLE txn_other").await.unwrap();
    let proxy = Proxy::start(config(cluster, 1)).await;
    let user = cluster.superuser();
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    a.batch_execute("SET SESSION AUTHORIZATION txn_other").await.unwrap();
    assert_eq!(text(&a, "SELECT session_user").await, "txn_other");
    let err = try_text(&b, "SELECT 1").await.expect_err("pinned");
    assert_eq!(sqlstate(&err), "53300");
    assert_eq!(proxy.metric("pgcache_pins_total{reason=\"settings\"}").await, 1.0);
    a.batch_execute("RESET SESSION AUTHORIZATION").await.unwrap();
    assert_eq!(text(&b, "SELECT current_user").await, user, "released once the authorization is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_between_transactions_holds_no_backend_and_cancel_reaches_only_its_own_query() {
    let (proxy, db, user) = setup("txn_cancel", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    assert_eq!(text(&a, "SELECT 1").await, "1");
    // a is idle (no backend); its cancel must not touch b's query on the shared backend.
    let b_sleep = tokio::spawn(async move { (try_text(&b, "SELECT pg_sleep(0.5), 'slept'").await, b) });
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.cancel_token().cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, b) = b_sleep.await.unwrap();
    assert_eq!(r.expect("b's query was not cancelled by a's request"), ",slept");
    // a's own running query is cancelled.
    let token = a.cancel_token();
    let a_sleep = tokio::spawn(async move { try_text(&a, "SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), a_sleep).await.unwrap().unwrap().expect_err("cancelled");
    assert_eq!(sqlstate(&err), "57014");
    assert_eq!(text(&b, "SELECT 2").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_and_transactions_keep_their_backend_to_the_end() {
    let (proxy, db, user) = setup("txn_pipe", 2).await;
    let a = proxy.connect(&db, &user).await;
    a.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v int)").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let st = a.prepare("SELECT $1::int * 2").await.unwrap();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
        (0..50i32).map(|i| [Box::leak(Box::new(i)) as &(dyn tokio_postgres::types::ToSql + Sync)]).collect();
    let futs: Vec<_> = params.iter().map(|p| a.query_one(&st, p)).collect();
    let rows = futures_util::future::join_all(futs).await;
    for (i, r) in rows.into_iter().enumerate() {
        assert_eq!(r.unwrap().get::<_, i32>(0), 2 * i as i32);
    }
    // A transaction spans several round trips on one backend.
    let others: Vec<_> = futures_util::future::join_all((0..4).map(|_| proxy.connect(&db, &user))).await;
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1, 1)").await.unwrap();
    let pid = text(&a, "SELECT pg_backend_pid()").await;
    for o in &others {
        assert_eq!(text(o, "SELECT count(*) FROM t").await, "0", "the open transaction is invisible");
    }
    assert_eq!(text(&a, "SELECT pg_backend_pid()").await, pid, "the transaction kept its backend");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(text(&others[0], "SELECT count(*) FROM t").await, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_reprepare_and_deallocate_all() {
    let (proxy, db, user) = setup("txn_close", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    let s1 = a.prepare("SELECT 'one'::text").await.unwrap();
    assert_eq!(a.query_one(&s1, &[]).await.unwrap().get::<_, String>(0), "one");
    drop(s1); // tokio-postgres sends Close for it
    let s2 = a.prepare("SELECT 'two'::text").await.unwrap();
    assert_eq!(a.query_one(&s2, &[]).await.unwrap().get::<_, String>(0), "two");
    // DEALLOCATE ALL on the shared backend drops pgcache's statements too: they come back.
    b.batch_execute("DEALLOCATE ALL").await.unwrap();
    assert_eq!(a.query_one(&s2, &[]).await.unwrap().get::<_, String>(0), "two");
    b.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(a.query_one(&s2, &[]).await.unwrap().get::<_, String>(0), "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prepared_statement_bound_evicts_the_least_recently_used() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("txn_lru").await;
    let mut c = config(cluster, 1);
    c.pool.max_prepared_statements = 3;
    let proxy = Proxy::start(c).await;
    let user = cluster.superuser();
    let a = proxy.connect(&db, &user).await;
    let mut statements = Vec::new();
    for i in 0..6 {
        statements.push(a.prepare(&format!("SELECT {i}::int")).await.unwrap());
    }
    for (i, st) in statements.iter().enumerate().chain(statements.iter().enumerate()) {
        assert_eq!(a.query_one(st, &[]).await.unwrap().get::<_, i32>(0), i as i32);
    }
    let prepared = text(&a, "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgcache_%'").await;
    assert!(prepared.parse::<i32>().unwrap() <= 3, "{prepared} statements prepared on the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_take_no_backend() {
    let cluster = PgCluster::shared();
    let env = cache_env(
        cluster,
        "txn_cache",
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 10) g;",
        "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n",
        |c| {
            c.pool.mode = PoolMode::Transaction;
            c.pool.max_size = 1;
            c.pool.acquire_timeout = Duration::from_millis(500);
        },
    )
    .await;
    let user = cluster.superuser();
    let a = env.proxy.connect(&env.db, &user).await;
    let b = env.proxy.connect(&env.db, &user).await;
    let st = b.prepare("SELECT v FROM items WHERE id = $1").await.unwrap();
    assert_eq!(b.query_one(&st, &[&3]).await.unwrap().get::<_, String>(0), "v3");
    assert_eq!(text(&b, "SELECT v FROM items WHERE id = 4").await, "v4");
    // a holds the only backend in a transaction; b's repeats are answered without one.
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let before = common::executions(&env.admin, "FROM items WHERE id").await;
    assert_eq!(b.query_one(&st, &[&3]).await.unwrap().get::<_, String>(0), "v3");
    assert_eq!(text(&b, "SELECT v FROM items WHERE id = 4").await, "v4");
    assert_eq!(common::executions(&env.admin, "FROM items WHERE id").await, before, "hits did not reach Postgres");
    a.batch_execute("UPDATE items SET v = 'new' WHERE id = 3; COMMIT").await.unwrap();
    assert_eq!(b.query_one(&st, &[&3]).await.unwrap().get::<_, String>(0), "new", "invalidated by a's commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_with_many_more_clients_than_backends() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("txn_pgbench").await;
    let init = common::run_tool(
        "pgbench",
        ["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", &cluster.superuser(), &db]
            .map(String::from)
            .to_vec(),
        vec![],
        None,
    )
    .await;
    assert!(init.status.success(), "{}", common::stderr(&init));
    let mut c = config(cluster, 8);
    c.pool.acquire_timeout = Duration::from_secs(10);
    c.client.max_connections = 200;
    let proxy = Proxy::start(c).await;
    let out = common::run_tool(
        "pgbench",
        ["-n", "-M", "prepared", "-c", "64", "-j", "2", "-t", "30", "-h", "127.0.0.1", "-p", &proxy.port().to_string()]
            .into_iter()
            .map(String::from)
            .chain(["-U".into(), cluster.superuser(), db.clone()])
            .collect(),
        vec![],
        None,
    )
    .await;
    let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
    assert!(out.status.success(), "pgbench failed\n{stdout}\n{stderr}");
    assert!(stdout.contains("number of failed transactions: 0"), "{stdout}");
    assert!(stdout.contains("number of transactions actually processed: 1920/1920"), "{stdout}");
    let backends: usize = proxy.shared.pools.all().iter().map(|p| p.servers().len()).sum();
    assert!(backends <= 8, "{backends} backends for 64 clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_do_block_pins_until_reset_all() {
    let (proxy, db, user) = setup("txn_do", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    // A DO block may set settings under any name: pgcache cannot replay what it cannot see.
    a.batch_execute("DO $$ BEGIN PERFORM set_config('app.hidden', '1', false); END $$").await.unwrap();
    let err = try_text(&b, "SELECT 1").await.expect_err("pinned");
    assert_eq!(sqlstate(&err), "53300");
    assert_eq!(text(&a, "SELECT current_setting('app.hidden')").await, "1", "a keeps its backend and its setting");
    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(text(&b, "SELECT 2").await, "2", "RESET ALL put every setting back");
}

/// A statement pgcache cannot see into pins only if it ran: a typo, or a DO block that
/// fails after setting something (its transaction undoes the `SET`), leaves nothing to
/// replay, so the one backend goes on to the next client. One that succeeds still pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_pgcache_cannot_see_into_does_not_pin() {
    let (proxy, db, user) = setup("txn_failed_do", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    let err = a.batch_execute("SELEC 1").await.expect_err("a typo");
    assert_eq!(sqlstate(&err), "42601");
    assert_eq!(text(&b, "SELECT 1").await, "1", "the typo left the backend free");
    let err = a
        .batch_execute("DO $$ BEGIN PERFORM set_config('app.hidden', '1', false); RAISE 'no'; END $$")
        .await
        .expect_err("the block fails");
    assert_eq!(sqlstate(&err), "P0001");
    assert_eq!(text(&b, "SELECT 2").await, "2", "the failed block left the backend free");
    // (Postgres keeps the placeholder it made, empty, as after any rolled-back SET.)
    let hidden = "SELECT coalesce(current_setting('app.hidden', true), '') = ''";
    assert_eq!(text(&a, hidden).await, "t", "and set nothing");
    a.batch_execute("DO $$ BEGIN PERFORM set_config('app.hidden', '1', false); END $$").await.unwrap();
    let err = try_text(&b, "SELECT 3").await.expect_err("pinned by the block that ran");
    assert_eq!(sqlstate(&err), "53300");
    assert_eq!(proxy.metric("pgcache_pins_total{reason=\"settings\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_pools_one_database_by_transaction() {
    let cluster = PgCluster::shared();
    let pooled = cluster.create_db("txn_override").await;
    let other = cluster.create_db("txn_not_overridden").await;
    let mut c = Proxy::config(cluster);
    c.pool.max_size = 1;
    c.pool.acquire_timeout = Duration::from_millis(500);
    c.pool.overrides =
        vec![pgcache::config::PoolOverride { database: Some(pooled.clone()), user: None, mode: PoolMode::Transaction }];
    let proxy = Proxy::start(c).await;
    let user = cluster.superuser();
    let (a, b) = (proxy.connect(&pooled, &user).await, proxy.connect(&pooled, &user).await);
    assert_eq!(text(&a, "SELECT 1").await, "1");
    assert_eq!(text(&b, "SELECT 2").await, "2", "two clients of the overridden database share one backend");
    let x = proxy.connect(&other, &user).await;
    assert_eq!(text(&x, "SELECT 3").await, "3");
    let connect = tokio_postgres::connect(&proxy.url(&other, &user), tokio_postgres::NoTls).await;
    let err = connect.err().expect("session pooling: the only backend belongs to x");
    assert_eq!(sqlstate(&err), "53300", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_under_prepared_statements_errors_as_postgres_does_and_a_new_prepare_recovers() {
    let (proxy, db, user) = setup("txn_ddl", 1).await;
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    a.batch_execute("CREATE TABLE d (x int); INSERT INTO d VALUES (1)").await.unwrap();
    let st = a.prepare("SELECT * FROM d").await.unwrap();
    assert_eq!(a.query_one(&st, &[]).await.unwrap().len(), 1);
    // Shared with b: the same text is the same server statement.
    let st_b = b.prepare("SELECT * FROM d").await.unwrap();
    assert_eq!(b.query_one(&st_b, &[]).await.unwrap().get::<_, i32>(0), 1);
    // A column added: the plan's result type changed. Postgres refuses the old statement
    // (0A000), and so does pgcache, rather than hand back rows of a shape the client's
    // description does not have.
    b.batch_execute("ALTER TABLE d ADD COLUMN y int DEFAULT 2").await.unwrap();
    let err = a.query_one(&st, &[]).await.expect_err("the result type changed");
    assert_eq!(sqlstate(&err), "0A000", "{err}");
    // Preparing again works, for this client and for others sending the same text.
    let fresh = a.prepare("SELECT * FROM d").await.unwrap();
    let row = a.query_one(&fresh, &[]).await.unwrap();
    assert_eq!((row.get::<_, i32>(0), row.get::<_, i32>(1)), (1, 2));
    let fresh_b = b.prepare("SELECT * FROM d").await.unwrap();
    assert_eq!(b.query_one(&fresh_b, &[]).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_scripts_share_one_backend() {
    let (proxy, db, user) = setup("txn_psql", 1).await;
    let holder = proxy.connect(&db, &user).await;
    assert_eq!(text(&holder, "SELECT 1").await, "1", "a second client, idle between transactions");
    let script = "CREATE TABLE p (id int PRIMARY KEY, v text);\n\
                  SET application_name = 'from_psql';\n\
                  BEGIN;\nINSERT INTO p VALUES (1, 'one'), (2, 'two');\nCOMMIT;\n\
                  \\d p\n\
                  SELECT current_setting('application_name');\n\
                  PREPARE q (int) AS SELECT v FROM p WHERE id = $1;\nEXECUTE q(2);\nDEALLOCATE q;\n\
                  SELECT count(*) FROM p;\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("script.sql");
    std::fs::write(&path, script).unwrap();
    let out = common::psql(proxy.port(), &db, &user, &["-At", "-f", path.to_str().unwrap()]).await;
    let (stdout, stderr) = (common::stdout(&out), common::stderr(&out));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("id|integer"), "\\d ran its catalog queries: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"from_psql") && lines.contains(&"two") && lines.last() == Some(&"2"), "{stdout}");
    assert_eq!(text(&holder, "SHOW application_name").await, "", "psql's SET stayed with psql");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_role_follows_its_client_and_never_leaks_to_the_next() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("txn_role").await;
    cluster
        .admin(&db)
        .await
        .batch_execute("DROP ROLE IF EXISTS txn_tenant; CREATE ROLE txn_tenant; GRANT txn_tenant TO CURRENT_USER")
        .await
        .unwrap();
    let proxy = Proxy::start(config(cluster, 1)).await;
    let user = cluster.superuser();
    let a = proxy.connect(&db, &user).await;
    let b = proxy.connect(&db, &user).await;
    a.batch_execute("SET ROLE txn_tenant").await.unwrap();
    let pid = text(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(text(&b, "SELECT current_user || ' ' || pg_backend_pid()").await, format!("{user} {pid}"));
    assert_eq!(text(&a, "SELECT current_user").await, "txn_tenant", "replayed on the shared backend");
    assert_eq!(text(&b, "SELECT current_user").await, user, "reset for the next client");
    a.batch_execute("RESET ROLE").await.unwrap();
    assert_eq!(text(&a, "SELECT current_user").await, user);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_at_once_gives_back_what_the_backend_has_prepared() {
    use common::raw::{self, RawConn};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = PgCluster::shared();
    let db = cluster.create_db("txn_leave").await;
    let mut c = config(cluster, 1);
    c.auth.method = pgcache::config::AuthMethod::Trust;
    let proxy = Proxy::start(c).await;
    let user = cluster.superuser();
    // All three clients start alike, so they are given the same backend.
    let run_41 = raw::batch(&[
        raw::parse("s1", "SELECT 41", &[]),
        raw::bind("", "s1", &[], &[]),
        raw::execute("", 0),
        raw::sync(),
    ]);
    let mut a = RawConn::connect(proxy.addr, &user, &db, &[]).await;
    let answer = a.exchange(&run_41, 1).await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");
    // A client whose Terminate arrives with its startup packet: its session ends before it
    // could hand the backend back between transactions.
    let mut quick = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", user.as_str()), ("database", db.as_str())],
        &mut out,
    )
    .unwrap();
    postgres_protocol::message::frontend::terminate(&mut out);
    quick.write_all(&out).await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), quick.read_to_end(&mut sink)).await.unwrap().unwrap();
    // The backend still has the statement prepared, and pgcache still knows it.
    let mut c = RawConn::connect(proxy.addr, &user, &db, &[]).await;
    let answer = c.exchange(&run_41, 1).await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "refused as already existing? {answer:?}");
    let servers: usize = proxy.shared.pools.all().iter().map(|p| p.servers().len()).sum();
    assert_eq!(servers, 1, "one backend served all three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_between_transactions_follow_the_rule_this_client_matches_first() {
    let cluster = PgCluster::shared();
    let env = cache_env(
        cluster,
        "txn_rules",
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one');
         CREATE TABLE other (id int); INSERT INTO other VALUES (7);
         DROP ROLE IF EXISTS txn_fresh_reader; CREATE ROLE txn_fresh_reader LOGIN;
         DROP ROLE IF EXISTS txn_filler; CREATE ROLE txn_filler LOGIN;
         GRANT SELECT ON items, other TO txn_fresh_reader, txn_filler;",
        "[[rule]]\nname = \"fresh-reader\"\nmatch = { tables = [\"items\"], user = \"txn_fresh_reader\" }\naction = \"bypass\"\n\n\
         [[rule]]\nname = \"items\"\nmatch = { tables = [\"items\", \"other\"] }\nttl = \"1h\"\nshare_across_roles = true\n",
        |c| {
            c.pool.mode = PoolMode::Transaction;
            c.pool.max_size = 2;
        },
    )
    .await;
    let filler = env.proxy.connect(&env.db, "txn_filler").await;
    let bypassed = env.proxy.connect(&env.db, "txn_fresh_reader").await;
    let sql = "SELECT v FROM items WHERE id = 1";
    assert_eq!(text(&filler, sql).await, "one");
    let e0 = common::executions(&env.admin, "FROM items WHERE id").await;
    assert_eq!(text(&filler, sql).await, "one");
    assert_eq!(common::executions(&env.admin, "FROM items WHERE id").await, e0, "the filler's repeat is a hit");
    // The bypassed user's settings become known through a statement it may cache, so its
    // requests are looked up between transactions too.
    assert_eq!(text(&bypassed, "SELECT id FROM other").await, "7");
    let other_before = common::executions(&env.admin, "FROM other").await;
    assert_eq!(text(&bypassed, "SELECT id FROM other").await, "7");
    assert_eq!(common::executions(&env.admin, "FROM other").await, other_before, "looked up between transactions");
    let before = common::executions(&env.admin, "FROM items WHERE id").await;
    assert_eq!(text(&bypassed, sql).await, "one");
    assert_eq!(text(&bypassed, sql).await, "one");
    assert_eq!(
        common::executions(&env.admin, "FROM items WHERE id").await,
        before + 2,
        "a bypass rule for this user sends every read to Postgres, even with a shared entry cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_waiting_between_transactions_at_once() {
    let (proxy, db, user) = setup("txn_shutdown", 1).await;
    let a = proxy.connect(&db, &user).await;
    assert_eq!(text(&a, "SELECT 1").await, "1");
    let drained = tokio::time::timeout(Duration::from_secs(5), proxy.shutdown()).await;
    assert!(drained.is_ok(), "an idle client between transactions held up the drain");
    let err = try_text(&a, "SELECT 2").await.expect_err("the session was closed");
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reaches_a_client_whose_pipelined_hits_never_stop() {
    // Answered from the cache between transactions, such a client nearly always has its next
    // request readable: the session must still be told of shutdown, not answer forever. (The
    // session reads its client before the shutdown token; it asks the token first every 32
    // frames, and a session woken from rest by shutdown is told at once. Here the session
    // outpaces the client, so this passes without those two; it guards the drain.)
    let cluster = PgCluster::shared();
    let env = cache_env(
        cluster,
        "txn_hits_shutdown",
        "CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one');",
        "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n",
        |c| {
            c.pool.mode = PoolMode::Transaction;
            c.pool.max_size = 1;
            // (With peers on, a closing instance stops hearing them and stops answering from
            // the cache: requests would take a backend, whose relay tells of shutdown.)
            c.peers.enabled = false;
        },
    )
    .await;
    let c = env.proxy.connect(&env.db, &cluster.superuser()).await;
    let st = c.prepare("SELECT v FROM items WHERE id = $1").await.unwrap();
    assert_eq!(c.query_one(&st, &[&1]).await.unwrap().get::<_, String>(0), "one");
    let (hits, hitting) = (std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)), tokio::sync::Notify::new());
    let hitting = std::sync::Arc::new(hitting);
    let hammer = {
        let (hits, hitting) = (hits.clone(), hitting.clone());
        tokio::spawn(async move {
            // Eight requests in flight all the time (each answered one replaced at once), until
            // the session ends.
            use futures_util::StreamExt;
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            for _ in 0..8 {
                in_flight.push(c.query_one(&st, &[&1]));
            }
            while let Some(answer) = in_flight.next().await {
                if let Err(e) = answer {
                    return e;
                }
                in_flight.push(c.query_one(&st, &[&1]));
                if hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 800 {
                    hitting.notify_one();
                }
            }
            unreachable!("eight requests are always in flight")
        })
    };
    hitting.notified().await;
    // Well under the drain timeout (30 s): a session that never looked would hold it that long.
    let drained = tokio::time::timeout(Duration::from_secs(10), env.proxy.shutdown()).await;
    assert!(drained.is_ok(), "a client with hits always in flight held up the drain");
    let err = hammer.await.unwrap();
    assert!(err.is_closed() || sqlstate(&err) == "57P01", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_between_transactions_is_shown_without_a_backend() {
    let (proxy, db, user) = setup("txn_show_idle", 2).await;
    let c = proxy.connect(&db, &user).await;
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    // The client has its answer; its session gives the backend back and rests (SHOW CLIENTS
    // and SHOW POOLS read this): it must not keep showing a backend another client may use.
    let shown = || proxy.shared.clients.list().iter().map(|i| i.backend_pid.unwrap_or(0)).collect::<Vec<_>>();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shown() != [0] && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(shown(), [0], "the backend {pid} is still shown as the client's");
    // In a transaction it is shown with its backend.
    c.batch_execute("BEGIN").await.unwrap();
    let in_tx: i32 = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    assert_eq!(shown(), [in_tx]);
    c.batch_execute("COMMIT").await.unwrap();
}
