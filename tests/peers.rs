//! A fleet of instances in front of one Postgres stays coherent: a write through one is not
//! served stale through another beyond the notification window; a lost link, a Postgres
//! restart or a silent (crashed) instance make the others drop what they cannot vouch for;
//! the bypass triggers announce writes made straight to Postgres.

mod common;

use std::time::{Duration, Instant};

use common::{ClusterOptions, PgCluster, Proxy, ProxyProcess, executions, rules_dir, text};
use pgcache::config::Config;

const RULES: &str = "[[rule]]\nname = \"items\"\nmatch = { tables = [\"items\"] }\nttl = \"1h\"\n";
const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text); \
    INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 10) g; \
    CREATE EXTENSION IF NOT EXISTS pg_stat_statements;";
const READ: &str = "SELECT v FROM items WHERE id = 1";

/// Instances in front of `cluster`, each with the rules, tweaked by `tweak`.
async fn fleet(cluster: &PgCluster, n: usize, tweak: impl Fn(&mut Config)) -> (Vec<Proxy>, tempfile::TempDir) {
    let dir = rules_dir(&[("r.toml", RULES)]);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut config = Proxy::config(cluster);
        config.rules = dir.path().to_owned();
        config.rules_explicit = true;
        tweak(&mut config);
        out.push(Proxy::start(config).await);
    }
    (out, dir)
}

/// Two instances (tweaked by `tweak`) in front of a fresh database holding [`SCHEMA`], and a
/// client on each.
struct Pair {
    fleet: Vec<Proxy>,
    a: tokio_postgres::Client,
    b: tokio_postgres::Client,
    admin: tokio_postgres::Client,
    _dir: tempfile::TempDir,
}

async fn pair(tweak: impl Fn(&mut Config)) -> Pair {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let db = cluster.create_db("peers").await;
    let admin = cluster.admin(&db).await;
    admin.batch_execute(SCHEMA).await.unwrap();
    let (fleet, _dir) = fleet(cluster, 2, tweak).await;
    let (a, b) = (fleet[0].connect(&db, &user).await, fleet[1].connect(&db, &user).await);
    Pair { fleet, a, b, admin, _dir }
}

/// Reads through `c` until the answer is `want` or `limit` passes; how long it took.
async fn until(c: &tokio_postgres::Client, want: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if text(c, READ).await == want {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_reaches_every_other() {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let db = cluster.create_db("peers").await;
    let admin = cluster.admin(&db).await;
    admin.batch_execute(SCHEMA).await.unwrap();
    let (fleet, _dir) = fleet(cluster, 3, |_| {}).await;
    let mut clients = Vec::new();
    for p in &fleet {
        let c = p.connect(&db, &user).await;
        assert_eq!(text(&c, READ).await, "v1");
        clients.push(c);
    }
    let before = executions(&admin, "FROM items WHERE id =").await;
    for c in &clients {
        assert_eq!(text(c, READ).await, "v1");
    }
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, before, "every instance holds the entry");
    for round in 0..5 {
        let writer = round % 3;
        let new = format!("written through {writer}, round {round}");
        clients[writer].batch_execute(&format!("UPDATE items SET v = '{new}' WHERE id = 1")).await.unwrap();
        for (i, c) in clients.iter().enumerate() {
            let took = until(c, &new, Duration::from_secs(2)).await;
            assert!(took.is_some(), "instance {i} still served the old row 2 s after the write through {writer}");
        }
    }
    // Each instance heard the others and published its own writes.
    for p in &fleet {
        assert!(p.metric("pgcache_peer_notifications_received_total").await >= 1.0);
        let peers = p.shared.peers.status();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].seen.instances.len(), 2, "{:?}", peers[0].seen.instances);
    }
    assert!(fleet[0].metric("pgcache_peer_notifications_sent_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_pinned_to_a_key_invalidates_only_that_key_on_the_others() {
    let Pair { fleet, a, b, admin, _dir } = pair(|_| {}).await;
    let other = "SELECT v FROM items WHERE id = 2";
    for read in [READ, other] {
        text(&b, read).await;
    }
    a.batch_execute("UPDATE items SET v = 'keyed' WHERE id = 1").await.unwrap();
    assert!(until(&b, "keyed", Duration::from_secs(2)).await.is_some(), "B still served key 1's old row");
    let before = executions(&admin, "FROM items WHERE id =").await;
    assert_eq!(text(&b, other).await, "v2");
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, before, "B still answers key 2 from its cache");
    assert!(fleet[1].metric("pgcache_peer_notifications_received_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_peers_another_instance_stays_stale() {
    // The control: with peer invalidation off, the same test sees the stale row (so the test
    // above can fail).
    let Pair { fleet: _fleet, a, b, _dir, .. } = pair(|c| c.peers.enabled = false).await;
    text(&b, READ).await;
    a.batch_execute("UPDATE items SET v = 'new' WHERE id = 1").await.unwrap();
    assert_eq!(until(&b, "new", Duration::from_millis(500)).await, None, "TTL-only: B keeps the old row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_link_fails_closed_and_resyncs() {
    let Pair { fleet, a, b, admin, _dir } = pair(|_| {}).await;
    text(&b, READ).await;
    // Cut B's link; while it is down A writes, and B cannot hear it.
    let b_link = format!("pgcache peers {}", fleet[1].shared.peers.instance());
    admin
        .execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", &[&b_link])
        .await
        .unwrap();
    a.batch_execute("UPDATE items SET v = 'written while B was deaf' WHERE id = 1").await.unwrap();
    // B never answers with the old row: it does not use its cache until it listens again,
    // and then drops what it held.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(text(&b, READ).await, "written while B was deaf");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peers = &fleet[1].shared.peers.status()[0];
    assert_eq!(peers.state, pgcache::peers::LinkState::Listening, "B listens again");
    assert!(peers.seen.resyncs >= 1, "B dropped its entries when it listened again");
    assert!(fleet[1].metric("pgcache_peer_resyncs_total").await >= 1.0);
    // And B caches again.
    text(&b, READ).await;
    let n = executions(&admin, "FROM items WHERE id =").await;
    text(&b, READ).await;
    assert_eq!(executions(&admin, "FROM items WHERE id =").await, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_leaves_nothing_stale() {
    let cluster = PgCluster::start(ClusterOptions::default());
    let admin = cluster.admin("postgres").await;
    admin
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'v1');")
        .await
        .unwrap();
    let (fleet, _dir) = fleet(&cluster, 2, |c| c.pool.acquire_timeout = Duration::from_secs(2)).await;
    let b = fleet[1].connect("postgres", "postgres").await;
    assert_eq!(text(&b, READ).await, "v1");
    cluster.stop_server();
    cluster.start_server();
    // Written straight to Postgres before B's link is back: no instance saw it.
    let direct = cluster.admin("postgres").await;
    direct.batch_execute("UPDATE items SET v = 'after the restart' WHERE id = 1").await.unwrap();
    let b = fleet[1].connect("postgres", "postgres").await;
    for _ in 0..50 {
        assert_eq!(text(&b, READ).await, "after the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(common::eventually(Duration::from_secs(5), || fleet[1].shared.peers.not_listening().is_empty()).await);
    assert_eq!(fleet[1].http("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_instance_makes_the_others_drop_the_database() {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let db = cluster.create_db("peers").await;
    let admin = cluster.admin(&db).await;
    admin.batch_execute(SCHEMA).await.unwrap();
    // The default: an instance silent for a second may have died.
    let (fleet, dir) = fleet(cluster, 1, |c| c.peers.dead_after = Duration::from_secs(1)).await;
    let b = fleet[0].connect(&db, &user).await;
    assert_eq!(text(&b, READ).await, "v1");
    // Another instance, in its own process, joins the database's channel.
    let upstream = cluster.url(&db, &user);
    let crashing = ProxyProcess::start(&upstream, &["--rules", dir.path().to_str().unwrap()]).await;
    let c =
        common::proxy::connect(&format!("postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable", crashing.port)).await;
    text(&c, READ).await;
    let heard = common::eventually(Duration::from_secs(5), || {
        fleet[0].shared.peers.status().first().is_some_and(|p| p.seen.instances.len() == 1)
    })
    .await;
    assert!(heard, "B hears the other instance's heartbeats");
    // A write the other instance might have made and died before publishing: simulated by a
    // write nobody announces, then the other instance dying without a goodbye.
    admin.batch_execute("UPDATE items SET v = 'unannounced' WHERE id = 1").await.unwrap();
    assert_eq!(text(&b, READ).await, "v1", "nobody announced it yet");
    crashing.signal("KILL");
    let took = until(&b, "unannounced", Duration::from_secs(5)).await;
    assert!(took.is_some(), "B dropped the database's entries once the other instance fell silent");
}

fn pgcache_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pgcache")).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_triggers_announce_writes_made_straight_to_postgres() {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let db = cluster.create_db("peers").await;
    let admin = cluster.admin(&db).await;
    admin
        .batch_execute(&format!(
            "{SCHEMA} CREATE TABLE other (x int);
             CREATE TABLE parted (id int, v text) PARTITION BY RANGE (id);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
             CREATE VIEW item_view AS SELECT * FROM items;"
        ))
        .await
        .unwrap();
    let rules = "[[rule]]\nname = \"items\"\nmatch = { tables = [\"item_view\", \"parted\"] }\nttl = \"1h\"\n";
    let dir = rules_dir(&[("r.toml", rules)]);
    let upstream = cluster.url(&db, &user);
    let base = ["--upstream", &upstream, "--rules", dir.path().to_str().unwrap()];
    let printed = pgcache_cli(&[&["triggers", "sql"][..], &base].concat());
    let sql = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(printed.status.success(), "{sql}{}", String::from_utf8_lossy(&printed.stderr));
    for table in ["\"public\".\"items\"", "\"public\".\"parted\"", "\"public\".\"parted_1\""] {
        assert!(sql.contains(&format!("ON {table}")), "{table} in {sql}");
    }
    assert!(!sql.contains("\"other\""), "only the tables the rules cache: {sql}");
    for _ in 0..2 {
        let out = pgcache_cli(&[&["triggers", "install"][..], &base].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let n: i64 =
        admin.query_one("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgcache%'", &[]).await.unwrap().get(0);
    assert_eq!(n, 6, "two triggers on each of three tables, once however often installed");

    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    let proxy = Proxy::start(config).await;
    let c = proxy.connect(&db, &user).await;
    let read = "SELECT v FROM item_view WHERE id = 1";
    assert_eq!(text(&c, read).await, "v1");
    // Writes pgcache never sees, from psql straight to Postgres.
    let started = Instant::now();
    let out = common::psql(cluster.port, &db, &user, &["-c", "UPDATE items SET v = 'from psql' WHERE id = 1"]).await;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let mut took = None;
    while started.elapsed() < Duration::from_secs(2) {
        if text(&c, read).await == "from psql" {
            took = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(took.is_some(), "a write straight to Postgres reached the cache through the trigger");
    assert!(proxy.metric("pgcache_peer_notifications_received_total").await >= 1.0);
    // TRUNCATE and a partition written directly.
    text(&c, "SELECT count(*) FROM parted").await;
    admin.batch_execute("INSERT INTO parted_1 VALUES (1, 'p')").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while text(&c, "SELECT count(*) FROM parted").await != "1" {
        assert!(Instant::now() < deadline, "a write to a partition reached the cache");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    admin.batch_execute("TRUNCATE parted").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while text(&c, "SELECT count(*) FROM parted").await != "0" {
        assert!(Instant::now() < deadline, "TRUNCATE reached the cache");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A write through pgcache to a table with the triggers is not an unknown write.
    let unknown = proxy.metric("pgcache_unknown_writes_total").await;
    c.batch_execute("UPDATE items SET v = 'via pgcache' WHERE id = 2").await.unwrap();
    assert_eq!(proxy.metric("pgcache_unknown_writes_total").await, unknown);

    let out = pgcache_cli(&[&["triggers", "uninstall"][..], &base].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgcache%') + \
             (SELECT count(*) FROM pg_namespace WHERE nspname = 'pgcache') + \
             (SELECT count(*) FROM pg_proc WHERE proname = 'notify_write')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "uninstall leaves no trace");
}

/// The payloads of the notifications on `channel`, as a listening connection hears them.
async fn listen(url: &str, channel: &str) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use futures_util::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n.payload().to_owned());
            }
        }
    });
    client.batch_execute(&format!("LISTEN {channel}")).await.unwrap();
    (client, rx)
}

/// With the fleet's secret, a notification anyone can send is not heard: a role with no
/// privileges cannot flush the fleet. What the instances and the bypass triggers seal is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_messages_sealed_with_the_fleet_secret_are_heard() {
    const SECRET: &str = "a fleet secret for the test";
    let p =
        pair(|c| c.peers.secret = Some(pgcache::config::PeersSecret::Given(pgcache::config::Password::new(SECRET))))
            .await;
    let db: String = p.admin.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    assert_eq!(text(&p.a, READ).await, "v1");
    let before = executions(&p.admin, "FROM items WHERE id").await;
    assert_eq!(text(&p.a, READ).await, "v1");
    assert_eq!(executions(&p.admin, "FROM items WHERE id").await, before, "cached");
    // A role with no privileges forges "everything in this database changed".
    p.admin.batch_execute("DROP ROLE IF EXISTS peers_nobody; CREATE ROLE peers_nobody LOGIN").await.unwrap();
    let cluster = PgCluster::shared();
    let forged = format!(
        "SELECT pg_notify('pgcache_invalidation', '{{\"v\":1,\"i\":\"x\",\"d\":\"{db}\",\"t\":0,\"a\":true}}')"
    );
    let out = common::psql(cluster.port, &db, "peers_nobody", &["-c", &forged]).await;
    assert!(out.status.success(), "{}", common::stderr(&out));
    let rejected = "pgcache_peer_messages_rejected_total";
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.fleet[0].metric(rejected).await < 1.0 {
        assert!(Instant::now() < deadline, "the forged message was seen and dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(text(&p.a, READ).await, "v1");
    assert_eq!(executions(&p.admin, "FROM items WHERE id").await, before, "still served from the cache");
    // A write through the other instance is sealed, so it is heard ...
    let cluster_url = cluster.url(&db, &cluster.superuser());
    let (_listening, mut heard) = listen(&cluster_url, "pgcache_invalidation").await;
    p.b.batch_execute("UPDATE items SET v = 'through b' WHERE id = 1").await.unwrap();
    assert!(until(&p.a, "through b", Duration::from_secs(2)).await.is_some(), "a sealed message is heard");
    // ... once: captured and sent again by a role that may NOTIFY, it is dropped.
    let captured = loop {
        let payload = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await.unwrap().unwrap();
        if !payload.contains("\"h\":true") {
            break payload;
        }
    };
    assert_eq!(text(&p.a, READ).await, "through b");
    let before = executions(&p.admin, "FROM items WHERE id").await;
    let rejected_before = p.fleet[0].metric(rejected).await;
    let (nobody, connection) =
        tokio_postgres::connect(&cluster.url(&db, "peers_nobody"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    nobody.execute("SELECT pg_notify('pgcache_invalidation', $1)", &[&captured]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.fleet[0].metric(rejected).await <= rejected_before {
        assert!(Instant::now() < deadline, "the replayed message was seen and dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(text(&p.a, READ).await, "through b");
    assert_eq!(executions(&p.admin, "FROM items WHERE id").await, before, "a replay invalidates nothing");
    // The bypass triggers seal with the same secret.
    let user = cluster.superuser();
    let upstream = cluster.url(&db, &user);
    let dir = rules_dir(&[("r.toml", RULES)]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["triggers", "install", "--upstream", &upstream, "--rules", dir.path().to_str().unwrap()])
        .env("PGCACHE_PEERS_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_readable: bool = p
        .admin
        .query_one("SELECT has_table_privilege('peers_nobody', 'pgcache.peer_key', 'SELECT')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!key_readable, "only the triggers' owner can read their key");
    let out = common::psql(cluster.port, &db, &user, &["-c", "UPDATE items SET v = 'from psql' WHERE id = 1"]).await;
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert!(until(&p.a, "from psql", Duration::from_secs(2)).await.is_some(), "the triggers' sealed message is heard");
}
