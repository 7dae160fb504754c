//! The command line: every flag, each with the environment variable it can also come from,
//! and the subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The command line. Every flag can also come from the named environment variable.
#[derive(Debug, Parser, Default)]
#[command(name = "pgcache", version, about = "A caching sidecar proxy for PostgreSQL")]
pub struct Cli {
    /// Address clients connect to [default: 127.0.0.1:6432]
    #[arg(long, global = true, env = "PGCACHE_LISTEN")]
    pub listen: Option<String>,
    /// Also listen on a Unix socket in this directory (`.s.PGSQL.<listen port>`, as Postgres
    /// names it: clients connect with `host=<dir>`)
    #[arg(long, global = true, env = "PGCACHE_UNIX_SOCKET_DIR")]
    pub unix_socket_dir: Option<PathBuf>,
    /// Upstream Postgres URL (libpq URI or key=value form)
    /// [default: postgres://postgres@127.0.0.1:5432/postgres]
    #[arg(long, global = true, env = "PGCACHE_UPSTREAM", hide_env_values = true)]
    pub upstream: Option<String>,
    /// TOML config file
    #[arg(long, global = true, env = "PGCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of rule files [default: ./rules]
    #[arg(long, global = true, env = "PGCACHE_RULES")]
    pub rules: Option<PathBuf>,
    /// Admin HTTP address (/metrics, /healthz, /readyz) [default: 127.0.0.1:9930]
    #[arg(long, global = true, env = "PGCACHE_ADMIN")]
    pub admin: Option<String>,
    /// Client authentication: scram-sha-256, cleartext or trust [default: scram-sha-256]
    #[arg(long, global = true, env = "PGCACHE_AUTH")]
    pub auth: Option<String>,
    /// The fleet's secret that signs invalidation messages (better given in the environment)
    #[arg(long, global = true, env = "PGCACHE_PEERS_SECRET", hide_env_values = true)]
    pub peers_secret: Option<String>,
    /// A shared second-level cache: redis://host:port[/db] or rediss://...
    #[arg(long, global = true, env = "PGCACHE_L2", hide_env_values = true)]
    pub l2: Option<String>,
    /// A streaming replica of the upstream to spread reads over (repeatable; host, port and
    /// TLS are taken from it, user and database are the client's)
    #[arg(long = "replica", global = true, env = "PGCACHE_REPLICAS", value_delimiter = ',', hide_env_values = true)]
    pub replicas: Vec<String>,
    /// A bearer token /metrics requires (better given in the environment)
    #[arg(long, global = true, env = "PGCACHE_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Maximum backend connections per (database, user) [default: 20]
    #[arg(long, global = true, env = "PGCACHE_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// When a client gives its backend back: session or transaction [default: session]
    #[arg(long, global = true, env = "PGCACHE_POOL_MODE")]
    pub pool_mode: Option<String>,
    /// Threads that run the sessions [default: one per CPU the process may use]
    #[arg(long, global = true, env = "PGCACHE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log format: text or json [default: text]
    #[arg(long, global = true, env = "PGCACHE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Invalidation shared with other pgcache instances: on or off [default: on]
    #[arg(long, global = true, env = "PGCACHE_PEERS")]
    pub peers: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Exit 0 if pgcache's /healthz (on --admin) answers 200 (for container health checks).
    Healthcheck,
    /// Start a throwaway PostgreSQL with a sample schema and pgcache in front of it, with the
    /// example rules; print what to try; clean up on Ctrl-C.
    Demo,
    /// Validate the rule files in DIR, print the rules in the order they apply, and exit
    /// non-zero if any is invalid.
    CheckRules {
        /// Rule directory
        dir: PathBuf,
    },
    /// Statement-level triggers that announce writes bypassing pgcache (cron jobs, psql) to
    /// every instance: install them on the tables the rules cache, remove them, or print the
    /// install SQL for review.
    Triggers {
        /// install, uninstall or sql
        #[arg(value_parser = ["install", "uninstall", "sql"])]
        action: String,
        /// Database(s) to act on [default: the upstream URL's]
        #[arg(long)]
        database: Vec<String>,
    },
}
