//! Real clients through pgcache: psql (simple protocol, \d, \copy), pgbench in every query
//! mode, tokio-postgres COPY, LISTEN/NOTIFY, cancel, and a large result streamed with bounded
//! memory.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{PgCluster, Proxy, ProxyProcess, psql, stderr, stdout};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_commands_describe_and_copy() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("psql").await;
    let proxy = Proxy::with_defaults(cluster).await;
    let user = cluster.superuser();
    let out =
        psql(proxy.port(), &db, &user, &["-c", "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let d = psql(proxy.port(), &db, &user, &["-c", "\\d items"]).await;
    assert!(stdout(&d).contains("Table \"public.items\"") && stdout(&d).contains("items_pkey"), "{}", stdout(&d));

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    std::fs::write(&input, (1..=500).map(|i| format!("{i},name {i}\n")).collect::<String>()).unwrap();
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        format!(
            "\\copy items FROM '{}' WITH (FORMAT csv)\nSELECT count(*) FROM items;\n\\copy (SELECT * FROM items ORDER BY id) TO '{}' WITH (FORMAT csv)\n",
            input.display(),
            output.display()
        ),
    )
    .unwrap();
    let run = psql(proxy.port(), &db, &user, &["-At", "-f", script.to_str().unwrap()]).await;
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(stdout(&run).trim(), "500");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), std::fs::read_to_string(&input).unwrap());

    let err = psql(proxy.port(), &db, &user, &["-c", "SELECT * FROM nope"]).await;
    assert!(!err.status.success());
    assert!(stderr(&err).contains("relation \"nope\" does not exist"), "{}", stderr(&err));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_every_query_mode() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("bench").await;
    let proxy = Proxy::with_defaults(cluster).await;
    let user = cluster.superuser();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["-h", "127.0.0.1", "-p"].iter().map(|s| s.to_string()).collect();
        a.extend([proxy.port().to_string(), "-U".into(), user.clone()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(db.clone());
        a
    };
    let init = common::run_tool("pgbench", base(&["-i", "-s", "1", "-q"]), vec![], None).await;
    assert!(init.status.success(), "{}", stderr(&init));
    for mode in ["simple", "extended", "prepared"] {
        let run =
            common::run_tool("pgbench", base(&["-M", mode, "-c", "8", "-j", "2", "-t", "50"]), vec![], None).await;
        let out = stdout(&run);
        assert!(run.status.success(), "mode {mode}: {}\n{out}", stderr(&run));
        assert!(out.contains("number of transactions actually processed: 400/400"), "mode {mode}: {out}");
        assert!(out.contains("number of failed transactions: 0"), "mode {mode}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_100k_rows() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("copy").await;
    let proxy = Proxy::with_defaults(cluster).await;
    let c = proxy.connect(&db, &cluster.superuser()).await;
    c.batch_execute("CREATE TABLE big (id int, payload text)").await.unwrap();
    let sink = c.copy_in("COPY big FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..100_000 {
        chunk.push_str(&format!("{i}\tpayload-{i}\n"));
        if chunk.len() > 64 * 1024 {
            sink.send(Bytes::from(std::mem::take(&mut chunk))).await.unwrap();
        }
    }
    sink.send(Bytes::from(chunk)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 100_000);
    let row = c.query_one("SELECT count(*), sum(id) FROM big", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (100_000, 4_999_950_000));

    let stream = c.copy_out("COPY big TO STDOUT").await.unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let text: String = chunks.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    assert_eq!(text.lines().count(), 100_000);
    assert!(text.contains("99999\tpayload-99999\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_between_two_clients() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("notify").await;
    let proxy = Proxy::with_defaults(cluster).await;
    let (listener, mut conn) =
        tokio_postgres::connect(&proxy.url(&db, &cluster.superuser()), tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener.batch_execute("LISTEN orders").await.unwrap();
    let talker = proxy.connect(&db, &cluster.superuser()).await;
    talker.batch_execute("NOTIFY orders, 'order 1'; SELECT pg_notify('orders', 'order 2')").await.unwrap();
    // The listener is idle: the notifications must arrive without it sending anything.
    for expected in ["order 1", "order 2"] {
        let (channel, payload) =
            tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("notification").unwrap();
        assert_eq!((channel.as_str(), payload.as_str()), ("orders", expected));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_reaches_the_backend() {
    let cluster = PgCluster::shared();
    let proxy = Proxy::with_defaults(cluster).await;
    let c = proxy.connect("postgres", &cluster.superuser()).await;
    let token = c.cancel_token();
    let started = Instant::now();
    let query = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), query).await.expect("query ended").unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "cancelled after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_result_streams_with_bounded_memory() {
    let cluster = PgCluster::shared();
    let proxy = ProxyProcess::start(&cluster.url("postgres", &cluster.superuser()), &[]).await;
    let c = common::proxy::connect(&format!(
        "postgres://{}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.superuser(),
        proxy.port
    ))
    .await;
    c.simple_query("SELECT 1").await.unwrap();
    let before = proxy.rss();
    // 200,000 rows of 1 kB: about 200 MB through the proxy.
    let rows = c
        .query_raw("SELECT repeat('x', 1000) FROM generate_series(1, 200000)", std::iter::empty::<i32>())
        .await
        .unwrap();
    futures_util::pin_mut!(rows);
    let (mut n, mut bytes, mut peak) = (0u64, 0u64, before);
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        bytes += row.get::<_, &str>(0).len() as u64;
        n += 1;
        if n % 5000 == 0 {
            peak = peak.max(proxy.rss());
        }
    }
    assert_eq!((n, bytes), (200_000, 200_000_000));
    let growth = peak.saturating_sub(before);
    eprintln!("pgcache RSS: {} kB before, peak growth {} kB", before >> 10, growth >> 10);
    assert!(growth < 8 << 20, "pgcache RSS grew by {} MB streaming 200 MB", growth >> 20);
}

/// The Unix socket (`unix_socket_dir`): psql and tokio-postgres connect with `host=<dir>`,
/// share the cache with TCP clients, and show as `[local]`; a socket file left by a process
/// that is gone is replaced, and the file goes at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connect_through_the_unix_socket() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("unix").await;
    let user = cluster.superuser();
    cluster
        .admin(&db)
        .await
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY, v text); INSERT INTO u VALUES (1, 'one')")
        .await
        .unwrap();
    let rules =
        common::rules_dir(&[("u.toml", "[[rule]]\nname = \"u\"\nmatch = { tables = [\"u\"] }\nttl = \"60s\"\n")]);
    let sockets = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = sockets.path().join(format!(".s.PGSQL.{port}"));
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a socket file nobody listens on");

    let mut config = Proxy::config(cluster);
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.unix_socket_dir = Some(sockets.path().to_owned());
    config.rules = rules.path().to_owned();
    config.rules_explicit = true;
    let proxy = Proxy::start(config).await;

    let dir = sockets.path().to_str().unwrap();
    let args = |sql: &str| {
        ["-X", "-At", "-h", dir, "-p", &port.to_string(), "-U", &user, "-d", &db, "-c", sql].map(str::to_owned).to_vec()
    };
    let read = "SELECT v FROM u WHERE id = 1";
    for _ in 0..2 {
        let out = common::run_tool("psql", args(read), vec![], None).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out).trim(), "one");
    }
    let (client, conn) = tokio_postgres::connect(&format!("host={dir} port={port} user={user} dbname={db}"), NoTls)
        .await
        .expect("tokio-postgres through the Unix socket");
    tokio::spawn(conn);
    let hits = proxy.shared.stats.totals().hits;
    let row = client.query_one("SELECT v FROM u WHERE id = $1", &[&1i32]).await.unwrap();
    let again = client.query_one("SELECT v FROM u WHERE id = $1", &[&1i32]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), again.get::<_, String>(0)), ("one".into(), "one".into()));
    assert!(proxy.shared.stats.totals().hits > hits, "the second read was a hit");
    let tcp = proxy.connect(&db, &user).await;
    tcp.execute("UPDATE u SET v = 'uno' WHERE id = 1", &[]).await.unwrap();
    let after = client.query_one("SELECT v FROM u WHERE id = $1", &[&1i32]).await.unwrap();
    assert_eq!(after.get::<_, String>(0), "uno", "a write through TCP invalidates what the socket's clients read");

    let console = proxy.shared.config().console.database.clone();
    let out = common::run_tool(
        "psql",
        args("SHOW CLIENTS").into_iter().map(|a| if a == db { console.clone() } else { a }).collect(),
        vec![],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("[local]"), "{}", stdout(&out));

    drop((client, tcp));
    proxy.shutdown().await;
    assert!(!path.exists(), "the socket file is removed at shutdown");
}
