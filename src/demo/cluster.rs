//! A throwaway PostgreSQL cluster: `initdb` + `pg_ctl` on a free port in a temporary
//! directory, as the `postgres` user when run as root (Postgres refuses root). Used by
//! `pgcache demo` and by the tests. Optionally a watchdog process stops the cluster and removes
//! its directory when this process exits, however it exits.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Extra set-up.
#[derive(Default, Clone)]
pub struct Options {
    /// Replaces pg_hba.conf.
    pub hba: Option<String>,
    /// Lines appended to postgresql.conf.
    pub conf: Vec<String>,
    /// Files (name, contents) written into the data directory before start, owned by the
    /// server user with mode 0600 (e.g. TLS keys).
    pub files: Vec<(String, Vec<u8>)>,
    /// Stop and remove the cluster when this process exits, even if it is killed.
    pub watchdog: bool,
}

/// Why a cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install PostgreSQL")]
    NoBinaries,
    #[error("{0}")]
    Command(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running throwaway cluster.
pub struct Cluster {
    pub port: u16,
    /// Holds the data directory and the Unix socket.
    pub dir: PathBuf,
    bin: PathBuf,
}

pub fn is_root() -> bool {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

/// The directory holding initdb, pg_ctl and postgres: from PATH, `pg_config --bindir`, or the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Option<PathBuf> {
    let complete = |d: &Path| ["pg_ctl", "initdb", "postgres"].iter().all(|b| d.join(b).exists());
    if let Ok(path) = std::env::var("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|d| complete(d))
    {
        return Some(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if complete(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| complete(p)).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop()
}

pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(cmd: &mut Command) -> Result<(), ClusterError> {
    let out = cmd.output().map_err(|e| ClusterError::Command(format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Command(format!(
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

impl Cluster {
    /// Creates and starts a cluster (trust authentication, superuser `postgres`).
    pub fn start(opts: &Options) -> Result<Cluster, ClusterError> {
        let bin = find_bindir().ok_or(ClusterError::NoBinaries)?;
        let cluster = Cluster::place(bin, opts.watchdog)?;
        let root = is_root();
        let data = cluster.data();
        cluster.pg(
            &cluster.bin.join("initdb"),
            &["-D", &data.to_string_lossy(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"],
        )?;
        let mut conf = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", cluster.dir.display()),
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
        cluster.configure(&conf)?;
        if let Some(hba) = &opts.hba {
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        for (name, contents) in &opts.files {
            let path = data.join(name);
            std::fs::write(&path, contents)?;
            run(Command::new("chmod").arg("600").arg(&path))?;
            if root {
                run(Command::new("chown").arg("postgres:postgres").arg(&path))?;
            }
        }
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Creates and starts a streaming replica of this cluster (`pg_basebackup -R`, hot
    /// standby), on its own port and directory.
    pub fn start_replica(&self, watchdog: bool) -> Result<Cluster, ClusterError> {
        let replica = Cluster::place(self.bin.clone(), watchdog)?;
        let data = replica.data();
        // Next to the real pg_ctl (PATH may hold only links to the server's own tools).
        let pg_ctl = std::fs::canonicalize(self.bin.join("pg_ctl"))?;
        let basebackup = pg_ctl.with_file_name("pg_basebackup");
        replica.pg(
            &basebackup,
            &[
                "-D",
                &data.to_string_lossy(),
                "-h",
                &self.dir.to_string_lossy(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-c",
                "fast",
                "-R",
                "--no-sync",
            ],
        )?;
        replica.configure(&[
            format!("port = {}", replica.port),
            format!("unix_socket_directories = '{}'", replica.dir.display()),
            "hot_standby = on".into(),
        ])?;
        replica.start_server()?;
        Ok(replica)
    }

    /// A free port and an empty directory of the server user's for a new cluster, removed with
    /// it (and by the watchdog, if asked for).
    fn place(bin: PathBuf, watchdog: bool) -> Result<Cluster, ClusterError> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("pgcache-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir))?;
        }
        let cluster = Cluster { port, dir, bin };
        if watchdog {
            cluster.spawn_watchdog()?;
        }
        Ok(cluster)
    }

    /// Appends `lines` to postgresql.conf (later lines win).
    fn configure(&self, lines: &[String]) -> Result<(), ClusterError> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(self.data().join("postgresql.conf"))?;
        writeln!(f, "\n{}", lines.join("\n"))?;
        Ok(())
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg(&self, program: &Path, args: &[&str]) -> Result<(), ClusterError> {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        run(cmd.args(args))
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), ClusterError> {
        let data = self.data();
        let mut full = vec!["-D", data.to_str().unwrap_or_default()];
        full.extend_from_slice(args);
        self.pg(&self.bin.join("pg_ctl"), &full)
    }

    /// Starts the server (again).
    pub fn start_server(&self) -> Result<(), ClusterError> {
        let log = self.dir.join("server.log");
        self.pg_ctl(&["-l", log.to_str().unwrap_or_default(), "-w", "-t", "60", "start"])
    }

    /// Stops the server; sessions get 57P01 (fast shutdown).
    pub fn stop_server(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["-m", "fast", "-w", "stop"])
    }

    /// Stops the server without a clean shutdown.
    pub fn kill_server(&self) -> Result<(), ClusterError> {
        self.pg_ctl(&["-m", "immediate", "-w", "stop"])
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable", self.port)
    }

    /// Runs SQL as the superuser with psql over the Unix socket.
    pub fn psql(&self, db: &str, sql: &str) -> Result<(), ClusterError> {
        let psql = if self.bin.join("psql").exists() { self.bin.join("psql") } else { PathBuf::from("psql") };
        run(Command::new(psql).args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"]).arg(&self.dir).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            db,
            "-c",
            sql,
        ]))
    }

    fn spawn_watchdog(&self) -> Result<(), ClusterError> {
        let data = self.data();
        let ctl = self.bin.join("pg_ctl");
        let stop = if is_root() {
            format!("runuser -u postgres -- {} -D {} -m immediate stop", ctl.display(), data.display())
        } else {
            format!("{} -D {} -m immediate stop", ctl.display(), data.display())
        };
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; [ -f {data}/postmaster.pid ] && {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            data = data.display(),
            dir = self.dir.display()
        );
        // Detached on purpose: it must outlive this process.
        #[allow(clippy::zombie_processes)]
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.kill_server();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
