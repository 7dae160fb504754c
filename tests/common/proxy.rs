//! pgcache started in-process on port 0, in front of a test cluster.

use std::net::SocketAddr;
use std::sync::Arc;

use pgcache::config::Config;
use pgcache::context::Context;
use pgcache::server;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::PgCluster;

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin HTTP address (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
    pub shared: Arc<Context>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Default settings in front of `cluster` (upstream user: the superuser), with no rules
    /// (whatever the working directory holds).
    pub fn config(cluster: &PgCluster) -> Config {
        let mut c = Config::for_upstream(&cluster.url("postgres", &cluster.superuser())).unwrap();
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.rules = "/nonexistent/pgcache-test-rules".into();
        c.rules_explicit = false;
        // The test clusters trust their superuser: clients log in as to Postgres, with no
        // password to give (tests/auth.rs and tests/scram.rs test each method).
        c.auth.method = pgcache::config::AuthMethod::Cleartext;
        // An instance that does not hear its own heartbeat within `dead_after` drops its cache
        // and listens again, failing closed. With the whole suite running on two cores a
        // heartbeat can take over the default second, and a test that proves a hit would see
        // that resync instead: the tests allow five (peers.rs tests the default's behaviour
        // with its own setting).
        c.peers.dead_after = std::time::Duration::from_secs(5);
        c
    }

    pub async fn start(config: Config) -> Proxy {
        init_logging();
        let listener = server::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let shared = Context::new(config, shutdown.clone()).unwrap();
        tokio::spawn(pgcache::admin::http::serve(admin_listener, shared.clone()));
        let handle = tokio::spawn(server::run(listener, shared.clone()));
        Proxy { addr, admin, shared, shutdown, handle: Some(handle) }
    }

    pub async fn with_defaults(cluster: &PgCluster) -> Proxy {
        Proxy::start(Proxy::config(cluster)).await
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn url(&self, db: &str, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable", self.port())
    }

    /// A tokio-postgres client through the proxy.
    pub async fn connect(&self, db: &str, user: &str) -> tokio_postgres::Client {
        connect(&self.url(db, user)).await
    }

    /// Begins a graceful shutdown (as SIGTERM) and waits for the server to finish.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap();
        }
    }

    /// GET `path` on the admin HTTP server: (status, body).
    pub async fn http(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).await
    }

    /// The value of one metric series in a /metrics scrape (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_at(self.admin, series).await
    }

    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.shared.force_close.cancel();
    }
}

/// Connects tokio-postgres with a background connection task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Logs to the test's captured output; `PGCACHE_LOG=debug` for more.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("PGCACHE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// `GET path` on an admin address: the status and the body.
pub async fn http_get(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The value of one metric series in a /metrics scrape of `admin` (0 if absent).
pub async fn metric_at(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}
