//! Failure behaviour: the upstream down, restarted or killed; clients sending garbage or
//! vanishing mid-result; pool exhaustion; many concurrent clients; graceful shutdown. Each
//! failure gets a clear Postgres error, and everything else keeps working.

mod common;

use std::time::{Duration, Instant};

use common::raw::{self, RawConn};
use common::{ClusterOptions, PgCluster, Proxy, ProxyProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_a_prompt_error_and_recovers() {
    let cluster = PgCluster::start(ClusterOptions::default());
    let proxy = Proxy::with_defaults(&cluster).await;
    cluster.stop_server();
    let started = Instant::now();
    let err = try_connect(&proxy.url("postgres", "postgres")).await.expect_err("refused while down");
    assert_eq!(code(&err), Some("08001"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "error took {:?}", started.elapsed());
    cluster.start_server();
    let c = try_connect(&proxy.url("postgres", "postgres")).await.expect("works again");
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_restart_between_queries_ends_a_pinned_session_cleanly() {
    let cluster = PgCluster::start(ClusterOptions::default());
    let proxy = Proxy::with_defaults(&cluster).await;
    let c = proxy.connect("postgres", "postgres").await;
    // LISTEN ties the session to its backend: it cannot survive losing it.
    c.batch_execute("LISTEN channel").await.unwrap();
    cluster.stop_server();
    cluster.start_server();
    let err = c.simple_query("SELECT 1").await.unwrap_err();
    // Postgres's own FATAL 57P01 reached the client, or the closed connection did.
    assert!(code(&err) == Some("57P01") || err.is_closed(), "{err:?}");
    // The pooled connection died with the old server; a new session gets a fresh one.
    let c = proxy.connect("postgres", "postgres").await;
    assert_eq!(c.query_one("SELECT 41 + 1", &[]).await.unwrap().get::<_, i32>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_query_reports_an_error() {
    let cluster = PgCluster::start(ClusterOptions::default());
    let proxy = Proxy::with_defaults(&cluster).await;
    let c = proxy.connect("postgres", "postgres").await;
    let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(20)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_server();
    let err = tokio::time::timeout(Duration::from_secs(5), q).await.expect("query ends").unwrap().unwrap_err();
    assert!(err.code().is_some() || err.is_closed(), "{err:?}");
    cluster.start_server();
    let c = proxy.connect("postgres", "postgres").await;
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_client_is_refused_and_others_carry_on() {
    let cluster = PgCluster::shared();
    let mut config = Proxy::config(cluster);
    config.client.max_message_bytes = 1 << 20;
    let proxy = Proxy::start(config).await;
    let user = cluster.superuser();
    let bystander = proxy.connect("postgres", &user).await;

    // Not a startup packet at all.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let reply = read_all(&mut s).await;
    assert_eq!(reply.first(), Some(&b'E'), "an ErrorResponse");
    assert!(String::from_utf8_lossy(&reply).contains("08P01"), "{:?}", String::from_utf8_lossy(&reply));

    // After start-up: a frame whose length is impossible, then one far over the limit.
    for bad in [raw_frame(b'Q', 2), raw_frame(b'Q', 2 << 20)] {
        let mut c = RawConn::connect(proxy.addr, &user, "postgres", &[]).await;
        c.send(&bad).await;
        let m = c.recv().await;
        assert_eq!(m.tag, b'E');
        let text = String::from_utf8_lossy(&m.body).into_owned();
        assert!(text.contains("FATAL") && text.contains("08P01"), "{text}");
        assert!(c.try_recv().await.is_none(), "connection closed after the FATAL");
    }

    // A truncated Bind body is the backend's to judge: Postgres answers with its own error.
    let mut c = RawConn::connect(proxy.addr, &user, "postgres", &[]).await;
    let got = c.exchange(&raw::batch(&[raw::frame(b'B', b"\0\0\x00\x05"), raw::sync()]), 1).await;
    assert_eq!(got[0].tag, b'E');
    assert_eq!(got.last().unwrap().tag, b'Z');

    assert_eq!(bystander.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0), 7);
}

fn raw_frame(tag: u8, len: i32) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&len.to_be_bytes());
    v
}

async fn read_all(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_result_frees_its_backend() {
    let cluster = PgCluster::start(ClusterOptions::default());
    let mut config = Proxy::config(&cluster);
    config.pool.max_size = 1;
    let proxy = Proxy::start(config).await;
    let mut c = RawConn::connect(proxy.addr, "postgres", "postgres", &[("application_name", "vanisher")]).await;
    c.send(&raw::query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)")).await;
    let first = c.recv().await;
    assert_eq!(first.tag, b'T');
    c.recv().await;
    drop(c);
    // The only backend was busy streaming; it must be cancelled and closed, not pooled, and
    // the pool's single slot must become free again.
    let admin = cluster.admin("postgres").await;
    let gone = async {
        loop {
            let n: i64 = admin
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'vanisher'", &[])
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the abandoned backend went away");
    let next = proxy.connect("postgres", "postgres").await;
    assert_eq!(next.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_returns_53300_after_the_acquire_timeout() {
    let cluster = PgCluster::shared();
    let mut config = Proxy::config(cluster);
    config.pool.max_size = 2;
    config.pool.acquire_timeout = Duration::from_millis(500);
    let proxy = Proxy::start(config).await;
    let user = cluster.superuser();
    let a = proxy.connect("postgres", &user).await;
    let b = proxy.connect("postgres", &user).await;
    let started = Instant::now();
    let err = try_connect(&proxy.url("postgres", &user)).await.expect_err("no slot");
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(450), "waited only {waited:?}");
    drop((a, b));
    let ok =
        common::eventually(Duration::from_secs(5), || proxy.shared.pools.all().iter().all(|p| p.stats().active == 0))
            .await;
    assert!(ok);
    proxy.connect("postgres", &user).await.simple_query("SELECT 1").await.unwrap();
}

/// The client backends Postgres has (this query's own included).
async fn client_backends(cluster: &PgCluster) -> i64 {
    let admin = cluster.admin("postgres").await;
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'";
    admin.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_clients() {
    common::raise_fd_limit();
    let cluster = PgCluster::start(ClusterOptions::default());
    let mut config = Proxy::config(&cluster);
    config.pool.max_size = 40;
    config.pool.acquire_timeout = Duration::from_secs(60);
    let proxy = Proxy::start(config).await;
    let url = proxy.url("postgres", "postgres");
    let mut tasks = Vec::new();
    for i in 0..500i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = try_connect(&url).await?;
            let mut sum = 0;
            for j in 0..5i32 {
                sum += c.query_one("SELECT $1::int4 + $2::int4", &[&i, &j]).await?.get::<_, i32>(0);
            }
            Ok::<i32, tokio_postgres::Error>(sum)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let i = i as i32;
        assert_eq!(t.await.unwrap().unwrap_or_else(|e| panic!("client {i}: {e:?}")), 5 * i + 10);
    }
    let n = client_backends(&cluster).await;
    assert!(n <= 41, "{n} backends for a pool of 40 (plus this admin)");
}

/// A crowd of clients logging in before any of them is known (cleartext: Postgres judges
/// each password on a connection opened for it) opens no more connections than the pool may
/// hold: with Postgres allowing 20 connections and a pool of 5, 200 first log-ins at once all
/// get in, and Postgres never refuses one for want of connections (53300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_first_log_ins_stays_within_the_pool() {
    common::raise_fd_limit();
    let cluster = PgCluster::start(ClusterOptions { conf: vec!["max_connections = 20".into()], ..Default::default() });
    let mut config = Proxy::config(&cluster);
    assert_eq!(config.auth.method, pgcache::config::AuthMethod::Cleartext);
    config.pool.max_size = 5;
    config.pool.acquire_timeout = Duration::from_secs(60);
    let proxy = Proxy::start(config).await;
    let url = proxy.url("postgres", "postgres");
    let tasks: Vec<_> = (0..200i32)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = try_connect(&url).await?;
                c.query_one("SELECT $1::int4 + 1", &[&i]).await.map(|r| r.get::<_, i32>(0))
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let i = i as i32;
        assert_eq!(t.await.unwrap().unwrap_or_else(|e| panic!("client {i}: {e:?}")), i + 1);
    }
    let n = client_backends(&cluster).await;
    // The pool's five, pgcache's catalog connection and this admin.
    assert!(n <= 7, "{n} backends for a pool of 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_statements_and_exits_zero() {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let mut proxy = ProxyProcess::start(&cluster.url("postgres", &user), &[]).await;
    let url = format!("postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable", proxy.port);
    let idle = try_connect(&url).await.unwrap();
    let busy = try_connect(&url).await.unwrap();
    let running = tokio::spawn(async move {
        let r = busy.query_one("SELECT pg_sleep(1.5)::text || 'done'", &[]).await.map(|r| r.get::<_, String>(0));
        (r, busy)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal("TERM");
    let (r, busy) = running.await.unwrap();
    assert_eq!(r.unwrap(), "done", "the running statement finished");
    let after = busy.simple_query("SELECT 1").await.unwrap_err();
    assert!(after.code() == Some(&SqlState::ADMIN_SHUTDOWN) || after.is_closed(), "{after:?}");
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(), "{err:?}");
    assert!(try_connect(&url).await.is_err(), "no longer accepting");
    let status = tokio::task::spawn_blocking(move || proxy.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_while_postgres_skips_to_sync_frees_its_backend() {
    let cluster = PgCluster::shared();
    let dir =
        common::rules_dir(&[("all.toml", "[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"60s\"\n")]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    config.pool.max_size = 3;
    config.pool.acquire_timeout = Duration::from_secs(2);
    let proxy = Proxy::start(config).await;
    let user = cluster.superuser();
    // More clients than backends: each must give its backend back when it leaves.
    for _ in 0..6 {
        let mut c = RawConn::connect(proxy.addr, &user, "postgres", &[]).await;
        // Describe of a portal that does not exist, without Sync: Postgres reports the error
        // and skips everything until a Sync, including the Query that follows.
        c.send(&raw::batch(&[raw::describe(b'P', "nope"), raw::query("SELECT 1")])).await;
        let e = c.recv().await;
        assert_eq!(e.tag, b'E', "{e:?}");
        drop(c);
    }
    let freed = common::eventually(Duration::from_secs(5), || {
        proxy.shared.pools.all().iter().all(|p| p.stats().active == 0) && proxy.shared.clients.list().is_empty()
    })
    .await;
    assert!(freed, "every session and backend went away with its client");
    let c = proxy.connect("postgres", &user).await;
    assert_eq!(c.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0), 3);
}
