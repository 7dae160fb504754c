//! Read replicas: a real primary and a real streaming replica (`pg_basebackup -R`), started
//! here. Where a statement ran is read from each server's own `pg_stat_statements`; a replica
//! made to lag has its replay paused (`pg_wal_replay_pause()`), so what it shows is fixed and
//! no assertion depends on timing. (`pg_stat_statements` merges statements that differ only
//! in constants or column aliases, so each count here is of a statement of its own shape.)

mod common;

use std::time::Duration;

use common::pg::PgCluster;
use common::proxy::Proxy;
use common::{eventually, executions, rules_dir, text};
use pgcache::config::{PoolMode, ReadYourWrites, ReplicaNode};
use pgcache::replica::State;

struct Env {
    /// The configuration the proxy was started with (for another instance beside it).
    config: pgcache::config::Config,
    _primary: PgCluster,
    replica: PgCluster,
    proxy: Proxy,
    db: String,
    /// Superuser clients of each server, on `db`.
    on_primary: tokio_postgres::Client,
    on_replica: tokio_postgres::Client,
    _rules: Option<tempfile::TempDir>,
}

const SCHEMA: &str = "CREATE EXTENSION pg_stat_statements; \
     CREATE TABLE kv (id int PRIMARY KEY, v int NOT NULL); \
     INSERT INTO kv SELECT g, 0 FROM generate_series(1, 100) g; \
     CREATE UNLOGGED TABLE scratch (id int); \
     CREATE SEQUENCE seq";

const CACHE_KV: &str = "[[rule]]\nname = \"kv\"\nmatch = { tables = [\"kv\"] }\nttl = \"60s\"\n";

async fn setup(rules: Option<&str>, tweak: impl FnOnce(&mut pgcache::config::Config)) -> Env {
    let primary = PgCluster::start(Default::default());
    let db = primary.create_db("replicas").await;
    primary.admin(&db).await.batch_execute(SCHEMA).await.unwrap();
    let replica = primary.start_replica();
    let mut config = Proxy::config(&primary);
    config.pool.mode = PoolMode::Transaction;
    config.replicas.nodes =
        vec![ReplicaNode { upstream: replica.url("postgres", "postgres").parse().unwrap(), weight: 1 }];
    config.replicas.check_interval = Duration::from_millis(20);
    config.replicas.check_timeout = Duration::from_secs(5);
    config.replicas.max_lag_bytes = 1 << 30;
    let dir = rules.map(|r| rules_dir(&[("rules.toml", r)]));
    if let Some(d) = &dir {
        config.rules = d.path().to_owned();
        config.rules_explicit = true;
    }
    tweak(&mut config);
    let proxy = Proxy::start(config.clone()).await;
    let shared = proxy.shared.clone();
    assert!(
        eventually(Duration::from_secs(30), || shared.replicas.nodes[0].state() == State::Up).await,
        "the replica is checked and up"
    );
    let on_primary = primary.admin(&db).await;
    let on_replica = replica.admin(&db).await;
    // The schema has been replayed (it was there before the base backup).
    assert_eq!(text(&on_replica, "SELECT count(*) FROM kv").await, "100");
    Env { config, _primary: primary, replica, proxy, db, on_primary, on_replica, _rules: dir }
}

impl Env {
    async fn client(&self) -> tokio_postgres::Client {
        self.proxy.connect(&self.db, "postgres").await
    }

    /// Where statements containing `fragment` ran: (primary, replica).
    async fn ran(&self, fragment: &str) -> (i64, i64) {
        (executions(&self.on_primary, fragment).await, executions(&self.on_replica, fragment).await)
    }

    async fn pause_replay(&self) {
        self.on_replica.batch_execute("SELECT pg_wal_replay_pause()").await.unwrap();
    }

    /// Resumes replay and waits until the replica shows everything the primary has written.
    async fn catch_up(&self) {
        self.on_replica.batch_execute("SELECT pg_wal_replay_resume()").await.unwrap();
        let target = text(&self.on_primary, "SELECT pg_current_wal_insert_lsn()").await;
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn");
        for _ in 0..300 {
            if text(&self.on_replica, &sql).await == "t" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the replica did not catch up");
    }
}

#[tokio::test]
async fn reads_run_on_the_replica_and_everything_else_on_the_primary() {
    let env = setup(None, |_| {}).await;
    let c = env.client().await;
    // Simple protocol.
    for i in 1..=20 {
        text(&c, &format!("SELECT v FROM kv WHERE id = {i}")).await;
    }
    // Extended protocol: an unnamed statement each time, and a named one bound many times.
    for i in 1..=10 {
        let row = c.query_one("SELECT v, id FROM kv WHERE id = $1", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 0);
    }
    let st = c.prepare("SELECT v, v + id FROM kv WHERE id = $1").await.unwrap();
    for i in 1..=10 {
        assert_eq!(c.query_one(&st, &[&i]).await.unwrap().get::<_, i32>(0), 0);
    }
    assert_eq!(env.ran("SELECT v FROM kv").await, (0, 20), "every plain read ran on the replica");
    assert_eq!(env.ran("SELECT v, id FROM kv").await, (0, 10));
    assert_eq!(env.ran("SELECT v, v + id FROM kv").await, (0, 10));

    // Writes, and reads a standby cannot or must not run, stay on the primary. (Another
    // session: after its write this one reads from the primary until the replica has it.)
    let w = env.client().await;
    w.batch_execute("INSERT INTO kv VALUES (1000, 1)").await.unwrap();
    text(&c, "SELECT id FROM kv WHERE id = 1 FOR UPDATE").await;
    text(&c, "SELECT count(*) FROM scratch").await;
    text(&c, "SELECT nextval('seq')").await;
    text(&c, "SELECT count(*) FROM pg_stat_activity").await;
    c.batch_execute("BEGIN; SELECT v + id FROM kv WHERE id = 2; COMMIT").await.unwrap();
    text(&c, "SELECT txid_current()").await;
    text(&c, "SELECT pg_backend_pid()").await;
    for (fragment, what) in [
        ("INSERT INTO kv VALUES", "a write"),
        ("FOR UPDATE", "FOR UPDATE"),
        ("FROM scratch", "an unlogged table"),
        ("nextval", "a volatile function"),
        ("FROM pg_stat_activity", "a statistics view"),
        ("SELECT v + id FROM kv", "a read inside a transaction block"),
        ("txid_current", "a function a standby refuses"),
        ("pg_backend_pid", "a function a standby answers for itself"),
    ] {
        assert_eq!(env.ran(fragment).await, (1, 0), "{what} runs on the primary");
    }

    // The console shows the replica and the reads it took.
    let console = common::proxy::connect(&env.proxy.url("pgcache", "postgres")).await;
    let rows = console.simple_query("SHOW REPLICAS").await.unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("one row per replica");
    assert_eq!(row.get("replica"), Some(format!("127.0.0.1:{}", env.replica.port).as_str()));
    assert_eq!(row.get("state"), Some("up"));
    assert!(row.get("reads").unwrap().parse::<u64>().unwrap() >= 40);
    let label = format!("{{replica=\"127.0.0.1:{}\"}}", env.replica.port);
    assert!(env.proxy.metric(&format!("pgcache_replica_reads_total{label}")).await >= 40.0);
    assert_eq!(env.proxy.metric(&format!("pgcache_replica_up{label}")).await, 1.0);
}

/// Writes `rounds` values through `writer` and reads each back through `reader` at once, with
/// the replica's replay paused: how many reads missed the write they followed.
async fn stale_reads(env: &Env, writer: &tokio_postgres::Client, reader: &tokio_postgres::Client) -> usize {
    env.pause_replay().await;
    let mut stale = 0;
    for k in 1..=20 {
        let id = k % 5 + 1;
        writer.batch_execute(&format!("UPDATE kv SET v = {k} WHERE id = {id}")).await.unwrap();
        let v = text(reader, &format!("SELECT v * 1 FROM kv WHERE id = {id}")).await;
        if v != k.to_string() {
            stale += 1;
        }
    }
    stale
}

#[tokio::test]
async fn a_session_reads_its_own_writes_on_a_lagging_replica() {
    let env = setup(None, |_| {}).await;
    let c = env.client().await;
    assert_eq!(stale_reads(&env, &c, &c).await, 0);
    assert_eq!(env.ran("SELECT v * $1 FROM kv").await, (20, 0), "each read after a write went to the primary");
    // Once the replica has replayed the session's writes its reads go there again.
    env.catch_up().await;
    let shared = env.proxy.shared.clone();
    let (primary, _) = env.ran("SELECT v - id FROM kv").await;
    assert_eq!(primary, 0);
    let mut on_replica = false;
    for _ in 0..200 {
        text(&c, "SELECT v - id FROM kv WHERE id = 1").await;
        if env.ran("SELECT v - id FROM kv").await.1 > 0 {
            on_replica = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(on_replica, "reads return to the replica: {:?}", shared.replicas.nodes[0].state());
}

#[tokio::test]
async fn negative_control_without_read_your_writes_a_session_misses_its_writes() {
    let env = setup(None, |c| c.replicas.read_your_writes = ReadYourWrites::Off).await;
    let c = env.client().await;
    assert_eq!(stale_reads(&env, &c, &c).await, 20, "every read went to the paused replica");
    assert_eq!(env.ran("SELECT v * $1 FROM kv").await, (0, 20));
}

#[tokio::test]
async fn causal_reads_see_other_sessions_writes_and_session_reads_need_not() {
    let env = setup(None, |c| c.replicas.read_your_writes = ReadYourWrites::Causal).await;
    let (writer, reader) = (env.client().await, env.client().await);
    assert_eq!(stale_reads(&env, &writer, &reader).await, 0);
    drop(env);

    // In session mode another session's write is not waited for (the negative control).
    let env = setup(None, |_| {}).await;
    let (writer, reader) = (env.client().await, env.client().await);
    assert_eq!(stale_reads(&env, &writer, &reader).await, 20);
}

/// `causal` across instances: a table created and filled through one instance while the
/// replica is paused, then the very first session of another instance in that database reads
/// it. The second instance has heard nothing of the first's writes until its peers' link
/// listens, so its read must not go to the replica (which lacks the table: an error).
#[tokio::test]
async fn causal_reads_on_an_instance_that_has_not_heard_yet_stay_on_the_primary() {
    let env = setup(None, |c| c.replicas.read_your_writes = ReadYourWrites::Causal).await;
    let other = Proxy::start(env.config.clone()).await;
    let shared = other.shared.clone();
    assert!(
        eventually(Duration::from_secs(30), || shared.replicas.nodes[0].state() == State::Up).await,
        "the replica is checked and up for the second instance"
    );
    env.pause_replay().await;
    env.client()
        .await
        .batch_execute("CREATE TABLE fresh (id int PRIMARY KEY); INSERT INTO fresh VALUES (7)")
        .await
        .unwrap();
    let reader = other.connect(&env.db, "postgres").await;
    assert_eq!(text(&reader, "SELECT id FROM fresh").await, "7", "read on the primary, not the paused replica");
    assert_eq!(env.ran("SELECT id FROM fresh").await, (1, 0));
    env.catch_up().await;
}

/// A cached read, a write that invalidates it while the replica is paused, a read of the
/// same key from a session that reads replicas without waiting (`off`), then the replica
/// caught up: what the last read returns.
async fn cached_after_catch_up(check_fills: bool) -> (String, String) {
    let env = setup(Some(CACHE_KV), |c| {
        // One instance: nothing but this test's write invalidates.
        c.peers.enabled = false;
        c.replicas.read_your_writes = ReadYourWrites::Off;
        c.replicas.check_fills = check_fills;
    })
    .await;
    let (writer, reader) = (env.client().await, env.client().await);
    let read = "SELECT v FROM kv WHERE id = 7";
    assert_eq!(text(&reader, read).await, "0");
    assert_eq!(text(&reader, read).await, "0");
    assert_eq!(env.ran("SELECT v FROM kv").await, (0, 1), "filled from the replica (nothing invalidated), then a hit");
    env.pause_replay().await;
    writer.batch_execute("UPDATE kv SET v = 5 WHERE id = 7").await.unwrap();
    let during = text(&reader, read).await;
    // Another key's entry does not depend on that write: the paused replica can fill it.
    let other = "SELECT v FROM kv WHERE id = 8";
    assert_eq!(text(&reader, other).await, "0");
    assert_eq!(text(&reader, other).await, "0");
    let (_, on_replica) = env.ran("SELECT v FROM kv").await;
    assert_eq!(on_replica, if check_fills { 2 } else { 3 }, "key 8 filled from the replica, then a hit");
    env.catch_up().await;
    let after = text(&reader, read).await;
    (during, after)
}

#[tokio::test]
async fn a_replica_behind_an_invalidation_never_fills_the_cache() {
    let (during, after) = cached_after_catch_up(true).await;
    assert_eq!(during, "5", "the fill went to the primary: no replica could store it");
    assert_eq!(after, "5");
}

#[tokio::test]
async fn negative_control_fills_from_a_replica_behind_poison_the_cache() {
    let (during, after) = cached_after_catch_up(false).await;
    assert_eq!(during, "0", "the paused replica answered");
    assert_eq!(after, "0", "and its pre-write rows were stored: stale after the replica caught up");
}

#[tokio::test]
async fn a_replica_that_stops_and_returns_costs_clients_nothing() {
    let env = setup(None, |_| {}).await;
    let c = env.client().await;
    for i in 1..=10 {
        text(&c, &format!("SELECT v FROM kv WHERE id = {i}")).await;
    }
    assert_eq!(env.ran("SELECT v FROM kv").await, (0, 10));
    env.replica.stop_server();
    // No client error: whether or not the monitor has noticed yet, the reads go to the primary.
    for i in 1..=30 {
        let v = common::try_text(&c, &format!("SELECT id + v FROM kv WHERE id = {i}")).await;
        assert_eq!(v.expect("no client error while the replica is down"), i.to_string());
    }
    assert_eq!(executions(&env.on_primary, "SELECT id + v FROM kv").await, 30);
    let shared = env.proxy.shared.clone();
    assert!(eventually(Duration::from_secs(10), || shared.replicas.nodes[0].state() == State::Down).await);
    env.replica.start_server();
    assert!(eventually(Duration::from_secs(30), || shared.replicas.nodes[0].state() == State::Up).await);
    let on_replica = env.replica.admin(&env.db).await;
    for i in 1..=10 {
        text(&c, &format!("SELECT id - v FROM kv WHERE id = {i}")).await;
    }
    assert_eq!(executions(&on_replica, "SELECT id - v FROM kv").await, 10, "the replica rejoined");
}

/// The randomized read-after-write checker through one pgcache with a replica: eight clients
/// read and write four version counters (both protocols) while the replica's replay is
/// paused and resumed at random (`toggle`) or kept paused; a read that starts after a write
/// was acknowledged to any client must see it. Returns (violations, reads, reads sent to the
/// replica).
async fn checker(
    mode: ReadYourWrites,
    check_fills: bool,
    rules: Option<&str>,
    toggle: bool,
    pooling: PoolMode,
) -> (u64, u64, f64) {
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    let env = setup(rules, |c| {
        c.replicas.read_your_writes = mode;
        c.replicas.check_fills = check_fills;
        c.pool.max_size = 12;
        c.pool.mode = pooling;
    })
    .await;
    env.on_primary
        .batch_execute(
            "CREATE TABLE counters (id int PRIMARY KEY, version int NOT NULL); \
             INSERT INTO counters SELECT g, 0 FROM generate_series(0, 3) g",
        )
        .await
        .unwrap();
    // A read first, as on an instance already running: it starts the peers' link for the
    // database, before which `causal` sends no read to a replica (what the other instances
    // wrote is not known until it listens).
    text(&env.client().await, "SELECT 1").await;
    env.catch_up().await;
    type Acked = Arc<Vec<parking_lot::Mutex<Vec<(i64, Instant)>>>>;
    let acked: Acked = Arc::new((0..4).map(|_| parking_lot::Mutex::new(Vec::new())).collect());
    let (violations, reads) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let done = Arc::new(AtomicBool::new(false));
    env.pause_replay().await;
    let toggler = {
        let (replica, done) = (env.replica.admin(&env.db).await, done.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            let mut paused = true;
            while toggle && !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(5..60))).await;
                let f = if paused { "pg_wal_replay_resume" } else { "pg_wal_replay_pause" };
                replica.batch_execute(&format!("SELECT {f}()")).await.unwrap();
                paused = !paused;
            }
        })
    };
    let mut tasks = Vec::new();
    for seed in 0..8u64 {
        let c = env.client().await;
        let (acked, violations, reads) = (acked.clone(), violations.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let read = c.prepare("SELECT version FROM counters WHERE id = $1").await.unwrap();
            for _ in 0..150 {
                let key = rng.random_range(0..4usize);
                if rng.random_bool(0.25) {
                    let sql = "UPDATE counters SET version = version + 1 WHERE id = $1 RETURNING version";
                    let row = c.query_one(sql, &[&(key as i32)]).await.unwrap();
                    acked[key].lock().push((row.get::<_, i32>(0) as i64, Instant::now()));
                } else {
                    let started = Instant::now();
                    let floor =
                        acked[key].lock().iter().filter(|(_, t)| *t <= started).map(|(v, _)| *v).max().unwrap_or(0);
                    let seen: i64 = if rng.random_bool(0.5) {
                        c.query_one(&read, &[&(key as i32)]).await.unwrap().get::<_, i32>(0) as i64
                    } else {
                        text(&c, &format!("SELECT version FROM counters WHERE id = {key}")).await.parse().unwrap()
                    };
                    reads.fetch_add(1, Ordering::Relaxed);
                    if seen < floor {
                        violations.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    toggler.await.unwrap();
    let label = format!("{{replica=\"127.0.0.1:{}\"}}", env.replica.port);
    let on_replica = env.proxy.metric(&format!("pgcache_replica_reads_total{label}")).await;
    (violations.load(Ordering::Relaxed), reads.load(Ordering::Relaxed), on_replica)
}

const CACHE_COUNTERS: &str = "[[rule]]\nname = \"counters\"\nmatch = { tables = [\"counters\"] }\nttl = \"1h\"\n";

#[tokio::test]
async fn the_randomized_checker_finds_nothing_stale_through_a_lagging_replica() {
    for (rules, pooling) in
        [(None, PoolMode::Transaction), (Some(CACHE_COUNTERS), PoolMode::Transaction), (None, PoolMode::Session)]
    {
        let (violations, reads, on_replica) = checker(ReadYourWrites::Causal, true, rules, true, pooling).await;
        assert_eq!(violations, 0, "rules {rules:?}, {pooling:?}: {violations} of {reads} reads were stale");
        assert!(on_replica > 0.0, "rules {rules:?}, {pooling:?}: some reads ran on the replica");
    }
}

#[tokio::test]
async fn negative_control_the_checker_finds_stale_reads_without_the_checks() {
    // Without read-your-writes, reads that are not cached go to the paused replica.
    let (violations, reads, _) = checker(ReadYourWrites::Off, true, None, false, PoolMode::Transaction).await;
    assert!(violations > 0, "0 of {reads} reads stale with the replica paused");
    // Cached reads still go where a fill may be stored: the fill check alone keeps them fresh,
    let (violations, reads, _) =
        checker(ReadYourWrites::Off, true, Some(CACHE_COUNTERS), false, PoolMode::Transaction).await;
    assert_eq!(violations, 0, "{violations} of {reads} cached reads stale");
    // and without it they are stale.
    let (violations, reads, _) =
        checker(ReadYourWrites::Off, false, Some(CACHE_COUNTERS), false, PoolMode::Transaction).await;
    assert!(violations > 0, "0 of {reads} cached reads stale without the fill check");
}

#[tokio::test]
async fn what_a_standby_would_refuse_or_miss_goes_to_the_primary() {
    let env = setup(None, |_| {}).await;
    env.on_primary
        .batch_execute(
            "CREATE FUNCTION bump(k int) RETURNS int LANGUAGE sql AS \
             'UPDATE kv SET v = v + 1 WHERE id = k RETURNING v'; \
             CREATE ROLE strict LOGIN; GRANT SELECT ON kv TO strict; \
             ALTER ROLE strict SET default_transaction_isolation = 'serializable'",
        )
        .await
        .unwrap();
    env.catch_up().await;
    env.pause_replay().await;

    // A session whose transactions default to SERIALIZABLE (a standby refuses those).
    let c = env.client().await;
    c.batch_execute("SET default_transaction_isolation = serializable").await.unwrap();
    for i in 1..=5 {
        let v = common::try_text(&c, &format!("SELECT v FROM kv WHERE id = {i} AND v >= 0")).await;
        assert_eq!(v.expect("no 0A000 from the standby"), "0");
    }
    assert_eq!(env.ran("AND v >= $2").await, (5, 0));
    // A role whose transactions default to SERIALIZABLE by ALTER ROLE: the session never says so.
    let strict = env.proxy.connect(&env.db, "strict").await;
    for i in 1..=5 {
        let v = common::try_text(&strict, &format!("SELECT v FROM kv WHERE id = {i} AND v <= 0")).await;
        assert_eq!(v.expect("no 0A000 from the standby for the role's default"), "0");
    }
    assert_eq!(env.ran("AND v <= $2").await, (5, 0));

    // A write through a function, with no rules loaded (its effects are not looked up): the
    // session's next read still sees it.
    let c = env.client().await;
    assert_eq!(text(&c, "SELECT bump(3)").await, "1");
    assert_eq!(text(&c, "SELECT v FROM kv WHERE id = 3").await, "1");

    // A table created through pgcache is read by any session at once, though the replica
    // has not replayed its creation.
    let (ddl, other) = (env.client().await, env.client().await);
    ddl.batch_execute("CREATE TABLE fresh (id int); INSERT INTO fresh VALUES (1)").await.unwrap();
    let n = common::try_text(&other, "SELECT count(*) FROM fresh").await;
    assert_eq!(n.expect("not 42P01 from the replica"), "1");
}

#[tokio::test]
async fn a_write_pipelined_behind_a_read_never_reaches_the_replica() {
    use common::raw::{self, RawConn};
    let env = setup(None, |_| {}).await;
    let mut conn = RawConn::connect(env.proxy.addr, "postgres", &env.db, &[]).await;
    // Simple protocol: a read and a write in one packet.
    let mut packet = raw::query("SELECT v FROM kv WHERE id = 10");
    packet.extend_from_slice(&raw::query("INSERT INTO kv VALUES (2000, 1)"));
    let msgs = conn.exchange(&packet, 2).await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    // Extended protocol: two batches in one packet (another session: this one's reads now
    // wait for the replica to show its write).
    let mut conn = RawConn::connect(env.proxy.addr, "postgres", &env.db, &[]).await;
    let mut packet = raw::parse("", "SELECT id, v FROM kv WHERE id = $1", &[]);
    packet.extend_from_slice(&raw::bind("", "", &[Some("11")], &[]));
    packet.extend_from_slice(&raw::execute("", 0));
    packet.extend_from_slice(&raw::sync());
    packet.extend_from_slice(&raw::parse("", "INSERT INTO kv VALUES ($1, 2)", &[]));
    packet.extend_from_slice(&raw::bind("", "", &[Some("2001")], &[]));
    packet.extend_from_slice(&raw::execute("", 0));
    packet.extend_from_slice(&raw::sync());
    let msgs = conn.exchange(&packet, 2).await;
    assert!(msgs.iter().all(|m| m.tag != b'E'), "{msgs:?}");
    assert_eq!(env.ran("SELECT v FROM kv").await, (0, 1), "the read ran on the replica");
    assert_eq!(env.ran("SELECT id, v FROM kv").await, (0, 1));
    assert_eq!(env.ran("INSERT INTO kv VALUES").await, (2, 0), "both writes on the primary");
}

#[tokio::test]
async fn in_session_pooling_reads_go_to_the_replica_and_the_session_keeps_its_backend() {
    let env = setup(None, |c| c.pool.mode = PoolMode::Session).await;
    let c = env.client().await;
    // Its settings go with it to the replica.
    // (What the client sends while pgcache reads the settings back after the SET runs where
    // the SET did: the SHOW.)
    c.batch_execute("SET statement_timeout = '7s'").await.unwrap();
    assert_eq!(text(&c, "SHOW statement_timeout").await, "7s");
    assert_eq!(text(&c, "SELECT current_setting('statement_timeout')").await, "7s");
    assert_eq!(env.ran("SELECT current_setting($1)").await, (0, 1));
    // Named statements prepared on the primary run on the replica, and back.
    let write = c.prepare("INSERT INTO kv VALUES ($1, pg_backend_pid())").await.unwrap();
    let read = c.prepare("SELECT v, id * 2 FROM kv WHERE id = $1").await.unwrap();
    for i in 1..=10 {
        assert_eq!(c.query_one(&read, &[&i]).await.unwrap().get::<_, i32>(0), 0);
        text(&c, &format!("SELECT v + 3 FROM kv WHERE id = {i}")).await;
    }
    assert_eq!(env.ran("SELECT v, id * $2 FROM kv").await, (0, 10), "named statement: on the replica");
    assert_eq!(env.ran("SELECT v + $1 FROM kv").await, (0, 10), "simple protocol: on the replica");
    // Its writes run on one backend, its own: the session keeps it between transactions,
    // while its reads go to the replica (once it shows the first write).
    c.execute(&write, &[&5000]).await.unwrap();
    env.catch_up().await;
    let mut on_replica = false;
    for _ in 0..200 {
        c.query_one(&read, &[&1]).await.unwrap();
        if env.ran("SELECT v, id * $2 FROM kv").await.1 > 10 {
            on_replica = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(on_replica, "reads return to the replica after the write");
    c.execute(&write, &[&5001]).await.unwrap();
    let pids = text(&env.on_primary, "SELECT count(DISTINCT v) FROM kv WHERE id >= 5000").await;
    assert_eq!(pids, "1", "both writes on the session's own backend");
    // Its own writes are read back (from the primary until the replica shows them).
    assert_eq!(stale_reads(&env, &c, &c).await, 0);
    env.catch_up().await;
    // While it holds what only its backend has, it reads there.
    c.batch_execute("CREATE TEMP TABLE mine (id int); INSERT INTO mine VALUES (1)").await.unwrap();
    env.catch_up().await;
    for i in 1..=3 {
        text(&c, &format!("SELECT v - 4 FROM kv WHERE id = {i}")).await;
    }
    assert_eq!(text(&c, "SELECT count(*) FROM mine").await, "1");
    assert_eq!(env.ran("SELECT v - $1 FROM kv").await, (3, 0), "a temporary table keeps reads on the primary");
    drop(c);

    // The session's backend is its own: a pool of one is full while it is connected.
    let env = setup(None, |c| {
        c.pool.mode = PoolMode::Session;
        c.pool.max_size = 1;
        c.pool.acquire_timeout = Duration::from_millis(300);
    })
    .await;
    let c = env.client().await;
    text(&c, "SELECT v FROM kv WHERE id = 1").await;
    assert_eq!(env.ran("SELECT v FROM kv").await, (0, 1));
    let second = tokio_postgres::connect(&env.proxy.url(&env.db, "postgres"), tokio_postgres::NoTls).await;
    assert!(second.is_err(), "no second session on a pool of one");
    drop(c);
}

#[tokio::test]
async fn the_primary_takes_its_weight_of_the_reads() {
    let env = setup(None, |c| c.replicas.primary_weight = 1).await;
    let c = env.client().await;
    for i in 1..=20 {
        text(&c, &format!("SELECT v * 2 FROM kv WHERE id = {i}")).await;
    }
    assert_eq!(env.ran("SELECT v * $1 FROM kv").await, (10, 10), "one replica of weight 1, the primary of weight 1");
    assert_eq!(env.proxy.metric("pgcache_replica_fallbacks_total{reason=\"primary_share\"}").await, 10.0);
}

#[tokio::test]
async fn a_rule_or_a_hint_keeps_reads_on_the_primary() {
    let rules = "[[rule]]\nname = \"kv\"\nmatch = { tables = [\"kv\"] }\nttl = \"60s\"\nroute = \"primary\"\n\
                 [[rule]]\nname = \"ledger\"\nmatch = { tables = [\"ledger\"] }\naction = \"bypass\"\nroute = \"primary\"\n";
    let env = setup(Some(rules), |c| c.peers.enabled = false).await;
    env.on_primary.batch_execute("CREATE TABLE ledger (id int); CREATE TABLE other (id int)").await.unwrap();
    env.catch_up().await;
    let c = env.client().await;
    // A cache rule that routes to the primary: its fill runs there, then hits run nowhere.
    for _ in 0..3 {
        assert_eq!(text(&c, "SELECT v FROM kv WHERE id = 4").await, "0");
    }
    assert_eq!(env.ran("SELECT v FROM kv").await, (1, 0));
    // A bypass rule that routes to the primary.
    for _ in 0..3 {
        text(&c, "SELECT count(*) FROM ledger").await;
    }
    assert_eq!(env.ran("FROM ledger").await, (3, 0));
    // Reading a routed table along with another (a join, a view over it) is enough.
    env.on_primary.batch_execute("CREATE VIEW ledger_view AS SELECT id FROM ledger").await.unwrap();
    env.catch_up().await;
    text(&c, "SELECT count(id) FROM other JOIN ledger USING (id)").await;
    text(&c, "SELECT count(*) FROM ledger_view").await;
    assert_eq!(env.ran("JOIN ledger").await, (1, 0));
    assert_eq!(env.ran("FROM ledger_view").await, (1, 0));
    // A table no rule routes goes to the replica, unless the statement says otherwise.
    text(&c, "SELECT count(*) FROM other").await;
    text(&c, "/* pgcache:primary */ SELECT count(*) FROM other").await;
    let hinted = c.prepare("SELECT count(*) FROM other WHERE id > $1 -- pgcache:primary").await.unwrap();
    c.query_one(&hinted, &[&0]).await.unwrap();
    assert_eq!(env.ran("SELECT count(*) FROM other").await, (2, 1), "the two hinted reads on the primary");
}

#[tokio::test]
async fn a_replica_lacking_wal_longer_than_max_lag_time_gets_no_reads_until_it_catches_up() {
    let env = setup(None, |c| c.replicas.max_lag_time = Some(Duration::from_millis(200))).await;
    let shared = env.proxy.shared.clone();
    env.pause_replay().await;
    env.on_primary.batch_execute("UPDATE kv SET v = 1 WHERE id = 1").await.unwrap();
    assert!(
        eventually(Duration::from_secs(30), || shared.replicas.nodes[0].state() == State::Lagging).await,
        "taken out while it lacks the write"
    );
    assert!(shared.replicas.nodes[0].lag_time() > Duration::from_millis(200));
    let c = env.client().await;
    text(&c, "SELECT v + 5 FROM kv WHERE id = 1").await;
    assert_eq!(env.ran("SELECT v + $1 FROM kv").await, (1, 0), "the read went to the primary");
    env.catch_up().await;
    assert!(eventually(Duration::from_secs(30), || shared.replicas.nodes[0].state() == State::Up).await);
    let label = format!("{{replica=\"127.0.0.1:{}\"}}", env.replica.port);
    assert!(env.proxy.metric(&format!("pgcache_replica_lag_seconds{label}")).await < 0.2);
}

#[tokio::test]
async fn in_session_pooling_a_backend_closed_while_its_session_was_away_is_replaced() {
    let env = setup(None, |c| c.pool.mode = PoolMode::Session).await;
    let c = env.client().await;
    c.batch_execute("INSERT INTO kv VALUES (7000, pg_backend_pid())").await.unwrap();
    let pid = text(&env.on_primary, "SELECT v FROM kv WHERE id = 7000").await;
    env.on_primary.batch_execute(&format!("SELECT pg_terminate_backend({pid})")).await.unwrap();
    let gone = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}");
    for _ in 0..500 {
        if text(&env.on_primary, &gone).await == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The session's next request takes another backend rather than failing on the closed one.
    c.batch_execute("INSERT INTO kv VALUES (7001, pg_backend_pid())").await.expect("no client error");
    let pids = text(&env.on_primary, "SELECT count(DISTINCT v) FROM kv WHERE id >= 7000").await;
    assert_eq!(pids, "2");
}
