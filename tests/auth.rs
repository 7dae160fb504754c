//! Authentication and TLS: clients log in with the credentials they would give Postgres
//! (cleartext, md5 and SCRAM upstreams), wrong passwords get Postgres's own 28P01, trust
//! upstreams need no password, and TLS works on both sides with a test CA.

mod common;

use std::time::Duration;

use common::{ClusterOptions, PgCluster, Proxy, psql, stderr, stdout, test_pki};
use pgcache::config::AuthMethod;

const HBA: &str = "
local all all trust
host all postgres 127.0.0.1/32 trust
host all clear_user 127.0.0.1/32 password
host all md5_user 127.0.0.1/32 md5
host all scram_user 127.0.0.1/32 scram-sha-256
";

const ROLES: &str = "
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5 secret';
SET password_encryption = 'scram-sha-256';
CREATE ROLE scram_user LOGIN PASSWORD 'sc@ram:pw/%';
CREATE ROLE clear_user LOGIN PASSWORD 'plain';
";

async fn auth_cluster() -> PgCluster {
    let cluster = PgCluster::start(ClusterOptions { hba: Some(HBA.into()), ..Default::default() });
    cluster.admin("postgres").await.batch_execute(ROLES).await.unwrap();
    cluster
}

fn url(proxy: &Proxy, user: &str, password: &str) -> String {
    let pw: String = url_encode(password);
    format!("postgres://{user}:{pw}@127.0.0.1:{}/postgres?sslmode=disable", proxy.port())
}

fn url_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

async fn try_connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

async fn backends_of(cluster: &PgCluster, user: &str) -> i64 {
    let admin = cluster.admin("postgres").await;
    admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", &[&user]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_password_logs_in_for_every_upstream_method() {
    let cluster = auth_cluster().await;
    let proxy = Proxy::with_defaults(&cluster).await;
    for (user, password) in [("clear_user", "plain"), ("md5_user", "md5 secret"), ("scram_user", "sc@ram:pw/%")] {
        for round in 0..2 {
            // The second round is checked against the remembered password and reuses the pool.
            let c =
                try_connect(&url(&proxy, user, password)).await.unwrap_or_else(|e| panic!("{user} round {round}: {e}"));
            let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
            assert_eq!(who, user);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_with_28p01_and_leaks_nothing() {
    let cluster = auth_cluster().await;
    let proxy = Proxy::with_defaults(&cluster).await;
    // Before any successful login, and after one (when a pooled connection is idle).
    for phase in ["cold", "warm"] {
        for user in ["clear_user", "md5_user", "scram_user"] {
            let err = try_connect(&url(&proxy, user, "wrong"))
                .await
                .err()
                .unwrap_or_else(|| panic!("{phase} {user}: admitted"));
            assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD), "{phase} {user}: {err}");
        }
        let ok = try_connect(&url(&proxy, "scram_user", "sc@ram:pw/%")).await.unwrap();
        drop(ok);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = backends_of(&cluster, "md5_user").await;
    for _ in 0..10 {
        assert!(try_connect(&url(&proxy, "md5_user", "nope")).await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backends_of(&cluster, "md5_user").await, before, "failed logins left backend connections behind");
}

/// A log-in Postgres has not yet accepted changes nothing of its pool: wrong passwords for a
/// user whose pool (of one backend) holds an idle backend leave that backend to the next
/// client who logs in — set aside while each wrong password is tried, so that the pool never
/// has two connections open, and taken back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_leaves_the_pools_idle_backend_alone() {
    let cluster = auth_cluster().await;
    let mut config = Proxy::config(&cluster);
    config.pool.max_size = 1;
    let proxy = Proxy::start(config).await;
    let pid = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get::<_, i32>(0)
    };
    let first = pid(try_connect(&url(&proxy, "clear_user", "plain")).await.unwrap()).await;
    // The session is over and its backend idle in the pool once it has been reset.
    let key = pgcache::backend::PoolKey { database: "postgres".into(), user: "clear_user".into() };
    let pool = proxy.shared.pools.get(&key);
    for _ in 0..500 {
        if pool.stats().idle == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.stats().idle, 1);
    for _ in 0..3 {
        let err = try_connect(&url(&proxy, "clear_user", "wrong")).await.expect_err("refused");
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD), "{err}");
    }
    let next = pid(try_connect(&url(&proxy, "clear_user", "plain")).await.unwrap()).await;
    assert_eq!(next, first, "the idle backend was given to the next client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_upstream_needs_no_password() {
    let cluster = auth_cluster().await;
    let proxy = Proxy::with_defaults(&cluster).await;
    // -w: never prompt; psql fails if a password is asked for.
    let out = psql(proxy.port(), "postgres", "postgres", &["-w", "-At", "-c", "SELECT current_user"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "postgres");
    // A password-protected user is asked for one: without it, psql -w fails.
    let out = psql(proxy.port(), "postgres", "md5_user", &["-w", "-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("password"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_password_is_picked_up() {
    let cluster = auth_cluster().await;
    let mut config = Proxy::config(&cluster);
    config.auth.verify_interval = Duration::ZERO;
    let proxy = Proxy::start(config).await;
    try_connect(&url(&proxy, "md5_user", "md5 secret")).await.unwrap();
    cluster
        .admin("postgres")
        .await
        .batch_execute("SET password_encryption = 'md5'; ALTER ROLE md5_user PASSWORD 'rotated'")
        .await
        .unwrap();
    let old = try_connect(&url(&proxy, "md5_user", "md5 secret")).await.expect_err("old password refused");
    assert_eq!(old.code(), Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD));
    try_connect(&url(&proxy, "md5_user", "rotated")).await.expect("new password accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_mode_uses_the_upstream_password() {
    let cluster = auth_cluster().await;
    let mut config = Proxy::config(&cluster);
    config.upstream = format!("postgres://md5_user:md5%20secret@127.0.0.1:{}/postgres?sslmode=disable", cluster.port)
        .parse()
        .unwrap();
    config.auth.method = AuthMethod::Trust;
    let proxy = Proxy::start(config).await;
    let c =
        try_connect(&format!("postgres://md5_user@127.0.0.1:{}/postgres?sslmode=disable", proxy.port())).await.unwrap();
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, "md5_user");
}

async fn tls_cluster(names: &[&str]) -> (PgCluster, tempfile::TempDir) {
    let (ca, cert, key) = test_pki(names);
    let cluster = PgCluster::start(ClusterOptions {
        hba: Some(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n".into(),
        ),
        conf: vec!["ssl = on".into(), "ssl_cert_file = 'server.crt'".into(), "ssl_key_file = 'server.key'".into()],
        files: vec![("server.crt".into(), cert.into_bytes()), ("server.key".into(), key.into_bytes())],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    (cluster, dir)
}

/// The server's message for a database error, else the error's text.
fn message(e: tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |d| format!("{} {}", d.code().code(), d.message()))
}

async fn ssl_in_use(proxy: &Proxy) -> Result<bool, String> {
    let c = try_connect(&proxy.url("postgres", "postgres")).await.map_err(message)?;
    let row = c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.map_err(message)?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verify_full_with_a_private_ca() {
    let (cluster, dir) = tls_cluster(&["localhost", "127.0.0.1"]).await;
    let ca = dir.path().join("ca.pem");
    let mut config = Proxy::config(&cluster);
    config.upstream = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        ca.display()
    )
    .parse()
    .unwrap();
    let proxy = Proxy::start(config).await;
    assert_eq!(ssl_in_use(&proxy).await, Ok(true));

    // The server refuses plain connections, so sslmode=disable cannot work.
    let mut config = Proxy::config(&cluster);
    config.upstream =
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", cluster.port).parse().unwrap();
    let plain = Proxy::start(config).await;
    assert!(ssl_in_use(&plain).await.unwrap_err().contains("pg_hba.conf"));

    // A CA that did not sign the server's certificate is refused, with a clear error.
    let (other_ca, _, _) = test_pki(&["localhost"]);
    let other = dir.path().join("other.pem");
    std::fs::write(&other, other_ca).unwrap();
    let mut config = Proxy::config(&cluster);
    config.upstream = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        other.display()
    )
    .parse()
    .unwrap();
    let wrong = Proxy::start(config).await;
    let err = ssl_in_use(&wrong).await.unwrap_err();
    assert!(err.contains("TLS") || err.contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_ignores_the_name_verify_full_does_not() {
    let (cluster, dir) = tls_cluster(&["db.example.internal"]).await;
    let ca = dir.path().join("ca.pem");
    for (mode, works) in [("require", true), ("verify-ca", true), ("verify-full", false)] {
        let mut config = Proxy::config(&cluster);
        config.upstream = format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            cluster.port,
            ca.display()
        )
        .parse()
        .unwrap();
        let proxy = Proxy::start(config).await;
        assert_eq!(ssl_in_use(&proxy).await.is_ok(), works, "sslmode={mode}");
    }
}

/// pgcache's configuration with TLS for clients: a test certificate for localhost, written
/// (with its CA, `ca.pem`) into the directory returned.
fn tls_for_clients(cluster: &PgCluster) -> (pgcache::config::Config, tempfile::TempDir) {
    let (ca, cert, key) = test_pki(&["localhost", "127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let mut config = Proxy::config(cluster);
    config.client.tls_cert = Some(dir.path().join("cert.pem"));
    config.client.tls_key = Some(dir.path().join("key.pem"));
    (config, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_can_use_tls_and_it_can_be_required() {
    let cluster = PgCluster::shared();
    let (mut config, dir) = tls_for_clients(cluster);
    config.client.tls_required = true;
    let proxy = Proxy::start(config).await;
    let conninfo = |mode: &str| {
        format!(
            "host=localhost port={} user={} dbname=postgres sslmode={mode} sslrootcert={}",
            proxy.port(),
            cluster.superuser(),
            dir.path().join("ca.pem").display()
        )
    };
    let args = |mode: &str| vec![conninfo(mode), "-X".into(), "-At".into(), "-c".into(), "SELECT 'over tls'".into()];
    let out = common::run_tool("psql", args("verify-full"), vec![], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "over tls");
    let out = common::run_tool("psql", args("disable"), vec![], None).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_in_transaction_pooling_carries_on_between_transactions() {
    // Between transactions a session waits at rest, for the socket to be readable; over TLS
    // decrypted bytes may already be waiting, so it waits by reading instead. Either way each
    // statement (a transaction of its own, the backend given back after it) is answered.
    let cluster = PgCluster::shared();
    let (mut config, dir) = tls_for_clients(cluster);
    config.pool.mode = pgcache::config::PoolMode::Transaction;
    config.pool.max_size = 1;
    let proxy = Proxy::start(config).await;
    let conninfo = format!(
        "host=localhost port={} user={} dbname=postgres sslmode=verify-full sslrootcert={}",
        proxy.port(),
        cluster.superuser(),
        dir.path().join("ca.pem").display()
    );
    let mut args = vec![conninfo, "-X".into(), "-At".into()];
    for i in 1..=5 {
        args.extend(["-c".into(), format!("SELECT {i}, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")]);
    }
    let out = common::run_tool("psql", args, vec![], None).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // pgcache's backend connection is not TLS here; the client's is (verify-full).
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), ["1|f", "2|f", "3|f", "4|f", "5|f"]);
}
