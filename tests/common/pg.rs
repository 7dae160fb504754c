//! A throwaway PostgreSQL cluster: `initdb` + `pg_ctl` on a free port in a temp dir, run as the
//! `postgres` user when the tests run as root (Postgres refuses root). A watchdog process stops
//! the cluster and removes its directory when the test process exits, however it exits.
//! `PGCACHE_TEST_DATABASE_URL` points the shared cluster at an existing server instead.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Extra set-up for a private cluster.
#[derive(Default, Clone)]
pub struct ClusterOptions {
    /// Replaces pg_hba.conf.
    pub hba: Option<String>,
    /// Lines appended to postgresql.conf.
    pub conf: Vec<String>,
    /// Files (name, contents) written into the data directory before start (owned by the
    /// server user, mode 0600), e.g. TLS keys.
    pub files: Vec<(String, Vec<u8>)>,
}

pub struct PgCluster {
    pub host: String,
    pub port: u16,
    /// Unix socket directory (trusted superuser access for set-up).
    pub socket_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
    bin: PathBuf,
    external_url: Option<String>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

fn find_bindir() -> PathBuf {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("pg_ctl").exists() && dir.join("initdb").exists() && dir.join("postgres").exists() {
                return dir;
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").exists() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("pg_ctl").exists()).collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install postgresql")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
        PgCluster { host, port: up.port, socket_dir: None, dir: None, bin: PathBuf::new(), external_url: Some(url) }
    }

    /// Starts a private cluster (for tests that stop it, or change its authentication).
    pub fn start(opts: ClusterOptions) -> PgCluster {
        let bin = find_bindir();
        let dir = std::env::temp_dir().join(format!("pgcache-test-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = is_root();
        if root {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir));
        }
        let port = free_port();
        let cluster = PgCluster {
            host: "127.0.0.1".into(),
            port,
            socket_dir: Some(dir.clone()),
            dir: Some(dir.clone()),
            bin,
            external_url: None,
        };
        cluster.spawn_watchdog();
        let data = dir.join("data");
        cluster.pg(
            &cluster.bin.join("initdb"),
            &["-D", &data.to_string_lossy(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"],
        );
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "max_connections = 300".into(),
            "shared_buffers = 64MB".into(),
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "full_page_writes = off".into(),
            "shared_preload_libraries = 'pg_stat_statements'".into(),
            "pg_stat_statements.track = 'all'".into(),
            "log_min_messages = warning".into(),
        ];
        conf.extend(opts.conf.iter().cloned());
        append(&data.join("postgresql.conf"), &conf.join("\n"));
        if let Some(hba) = &opts.hba {
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        for (name, contents) in &opts.files {
            let path = data.join(name);
            std::fs::write(&path, contents).unwrap();
            run(Command::new("chmod").arg("600").arg(&path));
            if root {
                run(Command::new("chown").arg("postgres:postgres").arg(&path));
            }
        }
        cluster.start_server();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.as_ref().expect("a private cluster").join("data")
    }

    fn pg(&self, program: &Path, args: &[&str]) {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args);
        run(&mut cmd);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.data();
        let mut full = vec!["-D", data.to_str().unwrap()];
        full.extend_from_slice(args);
        self.pg(&self.bin.join("pg_ctl"), &full);
    }

    /// Starts the server (again).
    pub fn start_server(&self) {
        let log = self.dir.as_ref().unwrap().join("server.log");
        self.pg_ctl(&["-l", log.to_str().unwrap(), "-w", "-t", "60", "start"]);
    }

    /// Stops the server, letting sessions finish (fast shutdown: they get 57P01).
    pub fn stop_server(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "stop"]);
    }

    /// Kills the server without a clean shutdown.
    pub fn kill_server(&self) {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    // The watchdog must outlive this process; nobody waits for it by design.
    #[allow(clippy::zombie_processes)]
    fn spawn_watchdog(&self) {
        let dir = self.dir.as_ref().unwrap();
        let data = dir.join("data");
        let stop = if is_root() {
            format!(
                "runuser -u postgres -- {} -D {} -m immediate stop",
                self.bin.join("pg_ctl").display(),
                data.display()
            )
        } else {
            format!("{} -D {} -m immediate stop", self.bin.join("pg_ctl").display(), data.display())
        };
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; [ -f {data}/postmaster.pid ] && {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            data = data.display(),
            dir = dir.display()
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("setsid for the cluster watchdog");
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

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            if self.data().join("postmaster.pid").exists() {
                let data = self.data();
                let ctl = self.bin.join("pg_ctl");
                let args = ["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"];
                let _ = if is_root() {
                    Command::new("runuser").args(["-u", "postgres", "--"]).arg(&ctl).args(args).output()
                } else {
                    Command::new(&ctl).args(args).output()
                };
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    writeln!(f, "\n{text}").unwrap();
}
