//! Test harness: a throwaway PostgreSQL cluster ([`pg`]), pgcache started in-process in front
//! of it ([`proxy`]), a raw protocol client for byte-exact transcripts ([`raw`]), and helpers
//! to run `psql` and `pgbench`.
#![allow(dead_code)]

pub mod checker;
pub mod pg;
pub mod proxy;
pub mod raw;
pub mod redis;

use std::process::Output;
use std::time::Duration;

#[allow(unused_imports)]
pub use pg::{ClusterOptions, PgCluster};
pub use proxy::Proxy;

/// Runs a command-line client (psql, pgbench) off the async runtime.
pub async fn run_tool(program: &str, args: Vec<String>, env: Vec<(String, String)>, stdin: Option<String>) -> Output {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut cmd = std::process::Command::new(&program);
        cmd.args(&args).envs(env).env("PGCONNECT_TIMEOUT", "10").env_remove("PGPASSWORD");
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// `psql -X -v ON_ERROR_STOP=1` against `host:port/db` as `user`, extra args appended.
pub async fn psql(port: u16, db: &str, user: &str, args: &[&str]) -> Output {
    let mut a: Vec<String> =
        ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p"].iter().map(|s| s.to_string()).collect();
    a.extend([port.to_string(), "-U".into(), user.into(), "-d".into(), db.into()]);
    a.extend(args.iter().map(|s| s.to_string()));
    run_tool("psql", a, vec![], None).await
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `f` until it returns true or `limit` passes.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut f: F) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A database name unique to one test.
pub fn unique_db(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The pgcache binary running as its own process (for RSS measurements and signal tests).
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub port: u16,
    /// Its admin (HTTP) address.
    pub admin: std::net::SocketAddr,
}

impl ProxyProcess {
    /// Starts `pgcache --listen 127.0.0.1:<free port> --upstream <upstream> <args>` and waits
    /// until it accepts connections.
    pub async fn start(upstream: &str, args: &[&str]) -> ProxyProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pgcache"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                upstream,
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .args(args)
            .args(if args.contains(&"--auth") { &[][..] } else { &["--auth", "cleartext"][..] })
            .env("PGCACHE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the pgcache binary");
        for (what, port) in [("client", port), ("admin", admin)] {
            let up =
                eventually(Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()).await;
            assert!(up, "pgcache's {what} address did not start listening");
        }
        ProxyProcess { child, port, admin: ([127, 0, 0, 1], admin).into() }
    }

    /// The value of one metric series in a /metrics scrape (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        proxy::metric_at(self.admin, series).await
    }

    /// Resident set size in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kb * 1024
    }

    pub fn signal(&self, sig: &str) {
        std::process::Command::new("kill").args(["-s", sig, &self.child.id().to_string()]).status().unwrap();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's open-file limit to its hard limit (for tests with many sockets).
pub fn raise_fd_limit() {
    #[repr(C)]
    struct RLimit {
        cur: u64,
        max: u64,
    }
    unsafe extern "C" {
        fn getrlimit(resource: i32, rlim: *mut RLimit) -> i32;
        fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
    }
    const RLIMIT_NOFILE: i32 = 7;
    let mut l = RLimit { cur: 0, max: 0 };
    // SAFETY: plain libc calls with a valid, properly laid out struct.
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut l) == 0 && l.cur < l.max {
            l.cur = l.max;
            setrlimit(RLIMIT_NOFILE, &l);
        }
    }
}

/// A rule directory holding `files` (name, contents).
pub fn rules_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// How many times Postgres executed, in the admin client's database, statements whose
/// normalized text contains `fragment` (pg_stat_statements must be installed there).
pub async fn executions(admin: &tokio_postgres::Client, fragment: &str) -> i64 {
    admin
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%'",
            &[&fragment],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs `sql` with the simple protocol and returns its rows as text: values joined by `,`,
/// rows by `;`, NULL as `NULL`.
pub async fn try_text(c: &tokio_postgres::Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    let mut out = Vec::new();
    for m in c.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            out.push((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_owned()).collect::<Vec<_>>().join(","));
        }
    }
    Ok(out.join(";"))
}

/// [`try_text`], panicking on error.
pub async fn text(c: &tokio_postgres::Client, sql: &str) -> String {
    try_text(c, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A fresh database with `schema` loaded (and pg_stat_statements), a rule directory holding
/// `rules` as `rules.toml`, and pgcache started in front with those rules.
pub struct CacheEnv {
    pub proxy: Proxy,
    pub db: String,
    /// A superuser client on `db`, straight to Postgres.
    pub admin: tokio_postgres::Client,
    pub dir: tempfile::TempDir,
}

/// A fresh database named after `prefix`, with pg_stat_statements (for [`executions`]) and
/// `schema`; and a superuser client on it, straight to Postgres.
pub async fn fresh_db(cluster: &PgCluster, prefix: &str, schema: &str) -> (String, tokio_postgres::Client) {
    let db = cluster.create_db(prefix).await;
    let admin = cluster.admin(&db).await;
    admin.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.unwrap();
    admin.batch_execute(schema).await.unwrap_or_else(|e| panic!("schema: {e}"));
    (db, admin)
}

pub async fn cache_env(
    cluster: &PgCluster,
    prefix: &str,
    schema: &str,
    rules: &str,
    tweak: impl FnOnce(&mut pgcache::config::Config),
) -> CacheEnv {
    let (db, admin) = fresh_db(cluster, prefix, schema).await;
    let dir = rules_dir(&[("rules.toml", rules)]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    tweak(&mut config);
    CacheEnv { proxy: Proxy::start(config).await, db, admin, dir }
}

/// A CA and a server certificate for `names`, as PEM (ca, cert, key).
pub fn test_pki(names: &[&str]) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "pgcache test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "pgcache test server");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}
