//! The test cluster: a throwaway cluster from `pgcache::demo::cluster` (with a watchdog, so
//! it is removed however the test process ends), shared by every test in a test binary or
//! private to one test; or an existing server named by `PGCACHE_TEST_DATABASE_URL`.

use std::path::PathBuf;
use std::sync::OnceLock;

use pgcache::demo::cluster::{Cluster, Options};

pub type ClusterOptions = Options;

pub struct PgCluster {
    pub host: String,
    pub port: u16,
    /// Unix socket directory (trusted superuser access for set-up).
    pub socket_dir: Option<PathBuf>,
    cluster: Option<Cluster>,
    external_url: Option<String>,
}

impl PgCluster {
    /// The cluster shared by every test in this test binary.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("PGCACHE_TEST_DATABASE_URL") {
            Ok(url) if !url.is_empty() => PgCluster::external(url),
            _ => PgCluster::start(ClusterOptions::default()),
        })
    }

    fn external(url: String) -> PgCluster {
        let up: pgcache::config::Upstream = url.parse().expect("PGCACHE_TEST_DATABASE_URL must be a postgres:// URL");
        let host = match &up.host {
            pgcache::config::Host::Tcp(h) => h.clone(),
            pgcache::config::Host::Unix(_) => panic!("PGCACHE_TEST_DATABASE_URL must use TCP"),
        };
        PgCluster { host, port: up.port, socket_dir: None, cluster: None, external_url: Some(url) }
    }

    /// Starts a private cluster (for tests that stop it, or change its authentication).
    pub fn start(opts: ClusterOptions) -> PgCluster {
        PgCluster::own_cluster(Cluster::start(&ClusterOptions { watchdog: true, ..opts }))
    }

    fn own_cluster(cluster: Result<Cluster, pgcache::demo::cluster::ClusterError>) -> PgCluster {
        let cluster = cluster.unwrap_or_else(|e| panic!("{e}"));
        PgCluster {
            host: "127.0.0.1".into(),
            port: cluster.port,
            socket_dir: Some(cluster.dir.clone()),
            cluster: Some(cluster),
            external_url: None,
        }
    }

    fn own(&self) -> &Cluster {
        self.cluster.as_ref().expect("a private cluster (not PGCACHE_TEST_DATABASE_URL)")
    }

    pub fn start_server(&self) {
        self.own().start_server().unwrap();
    }

    pub fn stop_server(&self) {
        self.own().stop_server().unwrap();
    }

    pub fn kill_server(&self) {
        self.own().kill_server().unwrap();
    }

    /// A URL for `user` on `db` over TCP (with the external server's password for its
    /// superuser).
    pub fn url(&self, db: &str, user: &str) -> String {
        let pw = match &self.external_url {
            Some(u) => {
                let up: pgcache::config::Upstream = u.parse().unwrap();
                match up.password {
                    Some(p) if up.user == user => format!(":{}", p.expose()),
                    _ => String::new(),
                }
            }
            None => String::new(),
        };
        format!("postgres://{user}{pw}@{}:{}/{db}?sslmode=disable", self.host, self.port)
    }

    /// The shared cluster's superuser (tests that use the shared cluster).
    pub fn shared_or_superuser() -> String {
        PgCluster::shared().superuser()
    }

    /// The superuser's name.
    pub fn superuser(&self) -> String {
        match &self.external_url {
            Some(u) => u.parse::<pgcache::config::Upstream>().unwrap().user,
            None => "postgres".into(),
        }
    }

    /// A superuser client (over the Unix socket for private clusters, so it works whatever
    /// pg_hba.conf says about TCP).
    pub async fn admin(&self, db: &str) -> tokio_postgres::Client {
        let conninfo = match &self.socket_dir {
            Some(dir) => format!("host={} port={} user=postgres dbname={db}", dir.display(), self.port),
            None => self.url(db, &self.superuser()),
        };
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("admin connect: {e}"));
        tokio::spawn(conn);
        client
    }

    /// Creates a fresh database and returns its name.
    pub async fn create_db(&self, prefix: &str) -> String {
        let name = super::unique_db(prefix);
        self.admin("postgres").await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        name
    }
}

impl PgCluster {
    /// Starts a streaming replica of this (private) cluster.
    pub fn start_replica(&self) -> PgCluster {
        PgCluster::own_cluster(self.own().start_replica(true))
    }
}
