//! Clients log in with SCRAM-SHA-256 as to Postgres, and pgcache holds no password: it checks
//! the client's proof against the role's verifier read from Postgres, and logs into Postgres
//! (whose pg_hba.conf says scram-sha-256) with the keys the proof gave up. Wrong passwords,
//! unknown roles, roles without a verifier get Postgres's own 28P01; channel binding works over
//! TLS; a password changed in Postgres takes over; the pool reuses backends logged in so.

mod common;

use std::time::Duration;

use common::{ClusterOptions, PgCluster, Proxy, stderr, stdout, test_pki};
use pgcache::config::{AuthMethod, VerifierSource};

const HBA: &str = "
local all all trust
host all postgres 127.0.0.1/32 trust
host all noright 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
";

const ROLES: &str = "
SET password_encryption = 'scram-sha-256';
CREATE ROLE app LOGIN PASSWORD 'app secret';
CREATE ROLE changing LOGIN PASSWORD 'before';
CREATE ROLE nopw LOGIN;
CREATE ROLE noright LOGIN;
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5 secret';
";

async fn scram_cluster() -> PgCluster {
    let cluster = PgCluster::start(ClusterOptions { hba: Some(HBA.into()), ..Default::default() });
    cluster.admin("postgres").await.batch_execute(ROLES).await.unwrap();
    cluster
}

/// pgcache with SCRAM, the verifiers read by the upstream URL's superuser.
fn config(cluster: &PgCluster) -> pgcache::config::Config {
    let mut c = Proxy::config(cluster);
    c.auth.method = AuthMethod::ScramSha256;
    c.auth.failure_delay = Duration::from_millis(10);
    c
}

fn conninfo(proxy: &Proxy, user: &str, password: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password='{password}' dbname=postgres sslmode=disable {extra}",
        proxy.port()
    )
}

/// Runs `psql` with a conninfo string; returns (success, stdout, stderr).
async fn psql(conninfo: String, sql: &str) -> (bool, String, String) {
    let out =
        common::run_tool("psql", vec![conninfo, "-X".into(), "-At".into(), "-c".into(), sql.into()], vec![], None)
            .await;
    (out.status.success(), stdout(&out).trim().to_owned(), stderr(&out))
}

/// Runs a psycopg 3 (libpq 16+) snippet; returns (success, output).
async fn psycopg(conninfo: String, sql: &str) -> (bool, String) {
    let script = "import psycopg, sys\ntry:\n    c = psycopg.connect(sys.argv[1])\n    print(c.execute(sys.argv[2]).fetchone()[0])\nexcept psycopg.Error as e:\n    print('ERROR', e.sqlstate, e)\n    sys.exit(1)\n".to_owned();
    let out = common::run_tool("python3", vec!["-c".into(), script, conninfo, sql.into()], vec![], None).await;
    (out.status.success(), format!("{}{}", stdout(&out), stderr(&out)))
}

async fn backends_of(cluster: &PgCluster, user: &str) -> i64 {
    let admin = cluster.admin("postgres").await;
    admin.query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", &[&user]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_insist_on_scram_log_in_and_postgres_sees_them() {
    let cluster = scram_cluster().await;
    let proxy = Proxy::start(config(&cluster)).await;
    // libpq (psycopg 3) refusing anything but SCRAM, and refusing cleartext.
    for policy in ["require_auth=scram-sha-256", "require_auth=!password"] {
        let (ok, out) = psycopg(conninfo(&proxy, "app", "app secret", policy), "SELECT current_user").await;
        assert!(ok, "{policy}: {out}");
        assert_eq!(out.trim(), "app");
    }
    let (ok, out, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT session_user").await;
    assert!(ok, "{err}");
    assert_eq!(out, "app");
    // Postgres itself authenticated the backend (pg_hba says scram-sha-256 for app) with the
    // keys the client proved: pgcache was given no password.
    assert!(proxy.shared.config().upstream.password.is_none());
    assert_eq!(backends_of(&cluster, "app").await, 1);
    // A second log-in reuses the backend the first logged in with the keys.
    let (ok, _, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT 2").await;
    assert!(ok, "{err}");
    assert_eq!(backends_of(&cluster, "app").await, 1, "the pool reused its backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_reads_as_postgres_would_word_it() {
    let cluster = scram_cluster().await;
    let proxy = Proxy::start(config(&cluster)).await;
    let pools = || proxy.shared.pools.all().len();
    for (user, password) in [("app", "wrong"), ("nobody", "x"), ("md5_user", "md5 secret"), ("nopw", "anything")] {
        let (ok, _, err) = psql(conninfo(&proxy, user, password, ""), "SELECT 1").await;
        assert!(!ok, "{user} logged in");
        assert!(err.contains(&format!("password authentication failed for user \"{user}\"")), "{user}: {err}");
    }
    assert_eq!(pools(), 0, "no pool for anyone who has not logged in");
    assert_eq!(backends_of(&cluster, "app").await, 0, "no upstream connection either");
    assert_eq!(proxy.metric("pgcache_login_failures_total").await, 4.0);
    let (metrics_ok, body) = proxy.http("/metrics").await;
    assert_eq!(metrics_ok, 200);
    assert!(!body.contains("nobody"), "no metric series names an unknown role");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_in_postgres_takes_over() {
    let cluster = scram_cluster().await;
    let mut c = config(&cluster);
    c.auth.verifier_ttl = Duration::from_millis(100);
    let proxy = Proxy::start(c).await;
    let (ok, _, err) = psql(conninfo(&proxy, "changing", "before", ""), "SELECT 1").await;
    assert!(ok, "{err}");
    cluster.admin("postgres").await.batch_execute("ALTER ROLE changing PASSWORD 'after'").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (ok, _, err) = psql(conninfo(&proxy, "changing", "before", ""), "SELECT 1").await;
    assert!(!ok && err.contains("password authentication failed"), "the old password fails: {err}");
    let (ok, out, err) = psql(conninfo(&proxy, "changing", "after", ""), "SELECT 'new'").await;
    assert!(ok, "the new password works: {err}");
    assert_eq!(out, "new");
}

/// Within `auth.verifier_ttl` pgcache may accept a password Postgres no longer does; Postgres
/// then refuses the keys. That is a failed log-in (28P01, the verifier read again for the next
/// attempt), not an unreachable server: the pool's breaker stays closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_postgres_no_longer_accepts_fail_the_log_in_not_the_pool() {
    let cluster = scram_cluster().await;
    let mut c = config(&cluster);
    c.auth.verifier_ttl = Duration::from_secs(600);
    let proxy = Proxy::start(c).await;
    let (ok, _, err) = psql(conninfo(&proxy, "changing", "before", ""), "SELECT 1").await;
    assert!(ok, "{err}");
    cluster.admin("postgres").await.batch_execute("ALTER ROLE changing PASSWORD 'after'").await.unwrap();
    // Another database: a new pool, which must log into Postgres with the keys.
    let (ok, _, err) = psql(conninfo(&proxy, "changing", "before", "dbname=template1"), "SELECT 1").await;
    assert!(!ok && err.contains("password authentication failed for user \"changing\""), "{err}");
    let (ok, out, err) = psql(conninfo(&proxy, "changing", "after", "dbname=template1"), "SELECT 'new'").await;
    assert!(ok && out == "new", "the new password at once, no breaker: {err}");
}

/// The iteration count is the role's business: keys derived from a costly verifier log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_with_many_iterations_logs_in() {
    let cluster = scram_cluster().await;
    let verifier = pgcache::protocol::scram::Verifier::from_password("slow secret", b"0123456789abcdef", 200_000);
    let sql = format!("CREATE ROLE slow LOGIN PASSWORD '{}'", verifier.encode());
    cluster.admin("postgres").await.batch_execute(&sql).await.unwrap();
    let proxy = Proxy::start(config(&cluster)).await;
    let (ok, out, err) = psql(conninfo(&proxy, "slow", "slow secret", ""), "SELECT current_user").await;
    assert!(ok && out == "slow", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_user_without_rights_logs_nobody_in_and_says_why_in_the_log() {
    let cluster = scram_cluster().await;
    let mut c = config(&cluster);
    c.auth.verifiers = VerifierSource::Query {
        query: pgcache::config::DEFAULT_AUTH_QUERY.into(),
        user: "noright".into(),
        database: "postgres".into(),
    };
    let proxy = Proxy::start(c).await;
    // An outage is not a wrong password: the client is told to come back.
    let (ok, _, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT 1").await;
    assert!(!ok && err.contains("could not read the credentials of the role"), "{err}");
    let e = proxy.shared.verifiers.get("app").await.unwrap_err().to_string();
    assert!(e.contains("permission denied"), "{e}");
}

/// Made-up names flooding the auth query must not lock real users out: a role whose verifier
/// was read keeps logging in with it while the auth query fails, and a wrong password is still
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_role_logs_in_while_the_auth_query_fails() {
    let cluster = scram_cluster().await;
    cluster
        .admin("postgres")
        .await
        .batch_execute("CREATE TABLE creds AS SELECT rolname, rolpassword FROM pg_authid")
        .await
        .unwrap();
    let mut c = config(&cluster);
    c.auth.verifier_ttl = Duration::ZERO;
    c.auth.verifiers = VerifierSource::Query {
        query: "SELECT rolname, rolpassword FROM creds WHERE rolname = $1".into(),
        user: "postgres".into(),
        database: "postgres".into(),
    };
    let proxy = Proxy::start(c).await;
    let (ok, out, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT current_user").await;
    assert!(ok && out == "app", "{err}");
    cluster.admin("postgres").await.batch_execute("DROP TABLE creds").await.unwrap();
    let (ok, out, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT current_user").await;
    assert!(ok && out == "app", "the verifier last read serves: {err}");
    let (ok, _, err) = psql(conninfo(&proxy, "app", "wrong", ""), "SELECT 1").await;
    assert!(!ok && err.contains("password authentication failed for user \"app\""), "{err}");
    let (ok, _, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT 1").await;
    assert!(ok, "still, after a failed attempt: {err}");
    let (ok, _, err) = psql(conninfo(&proxy, "changing", "before", ""), "SELECT 1").await;
    assert!(!ok && err.contains("could not read the credentials of the role"), "never read: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_userlist_of_verifiers_serves_too() {
    let cluster = scram_cluster().await;
    let verifier: String = cluster
        .admin("postgres")
        .await
        .query_one("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'", &[])
        .await
        .unwrap()
        .get(0);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("userlist.txt");
    std::fs::write(&list, format!("\"app\" \"{verifier}\"\n")).unwrap();
    let mut c = config(&cluster);
    c.auth.verifiers = VerifierSource::Userlist(list);
    let proxy = Proxy::start(c).await;
    let (ok, out, err) = psql(conninfo(&proxy, "app", "app secret", ""), "SELECT current_user").await;
    assert!(ok, "{err}");
    assert_eq!(out, "app");
    let (ok, _, _) = psql(conninfo(&proxy, "changing", "before", ""), "SELECT 1").await;
    assert!(!ok, "a role not in the userlist cannot log in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_is_offered_over_tls() {
    let cluster = scram_cluster().await;
    let (ca, cert, key) = test_pki(&["localhost", "127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    for (name, pem) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let mut c = config(&cluster);
    c.client.tls_cert = Some(dir.path().join("cert.pem"));
    c.client.tls_key = Some(dir.path().join("key.pem"));
    let proxy = Proxy::start(c).await;
    let tls =
        format!("sslmode=verify-full sslrootcert={} channel_binding=require", dir.path().join("ca.pem").display());
    let info = conninfo(&proxy, "app", "app secret", &tls)
        .replace("host=127.0.0.1", "host=localhost")
        .replace("sslmode=disable ", "");
    let (ok, out, err) = psql(info.clone(), "SELECT 'bound'").await;
    assert!(ok, "psql with channel_binding=require: {err}");
    assert_eq!(out, "bound");
    let (ok, out) = psycopg(info, "SELECT 'bound'").await;
    assert!(ok, "psycopg with channel_binding=require: {out}");
    // Without TLS there is nothing to bind to: such a client refuses to log in.
    let (ok, _, err) = psql(conninfo(&proxy, "app", "app secret", "channel_binding=require"), "SELECT 1").await;
    assert!(!ok && err.contains("channel binding"), "{err}");
    // A wrong password over TLS fails as anywhere else.
    let wrong = conninfo(&proxy, "app", "wrong", "sslmode=require").replace("sslmode=disable ", "");
    let (ok, _, err) = psql(wrong, "SELECT 1").await;
    assert!(!ok && err.contains("password authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_authenticates_with_scram_too() {
    let cluster = scram_cluster().await;
    let mut c = config(&cluster);
    c.console.users = vec!["app".into()];
    let proxy = Proxy::start(c).await;
    let console = |pw: &str| {
        format!("host=127.0.0.1 port={} user=app password='{pw}' dbname=pgcache sslmode=disable", proxy.port())
    };
    let (ok, out, err) = psql(console("app secret"), "SHOW STATS").await;
    assert!(ok, "{err}");
    assert!(out.contains("hits"), "{out}");
    let (ok, _, err) = psql(console("wrong"), "SHOW STATS").await;
    assert!(!ok && err.contains("password authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_bearer_token() {
    let cluster = PgCluster::shared();
    let mut c = Proxy::config(cluster);
    c.metrics_token = Some(pgcache::config::Password::new("s3cret-token"));
    let proxy = Proxy::start(c).await;
    let (status, _) = proxy.http("/metrics").await;
    assert_eq!(status, 401, "no token");
    let scrape = |token: &str| {
        let admin = proxy.admin;
        let token = token.to_owned();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
            let req = format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.unwrap();
            String::from_utf8_lossy(&raw).into_owned()
        }
    };
    assert!(scrape("wrong").await.starts_with("HTTP/1.1 401"));
    let ok = scrape("s3cret-token").await;
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("pgcache_cache_evictions_total"), "{ok}");
    assert_eq!(proxy.http("/healthz").await.0, 200, "probes stay open");
}
