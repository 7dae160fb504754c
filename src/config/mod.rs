//! Configuration: command-line flags, `PGCACHE_*` environment variables and a TOML file, merged
//! in that order of precedence (flag over env over file over default), then validated into one
//! immutable [`Config`] that the server shares with every session.
//!
//! Owns parsing and validation of settings; opens nothing (no sockets, no files besides the
//! config file itself). A leaf: it imports nothing from the rest of the crate.

mod cli;
mod file;
mod reload;
mod replicas;
pub mod upstream;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cli::{Cli, Command};
pub use file::FileConfig;
pub use replicas::{ReadYourWrites, ReplicaNode, ReplicasConfig};
pub use upstream::{Host, Password, SslMode, Upstream};

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (with -PLUS over TLS) against the role's verifier as Postgres stores it;
    /// pgcache then logs into Postgres with the keys the client proved (pass-through).
    ScramSha256,
    /// Clients send their password in cleartext and Postgres judges it (for upstreams that
    /// authenticate with LDAP, PAM or `password`; over TLS or loopback only).
    Cleartext,
    /// No client authentication (loopback listeners only).
    Trust,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Cleartext => "cleartext",
            AuthMethod::Trust => "trust",
        }
    }
}

/// Where pgcache finds the SCRAM verifiers it checks clients against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifierSource {
    /// The auth query, run as `auth.user` in `auth.database`.
    Query { query: String, user: String, database: String },
    /// A file of `"role" "SCRAM-SHA-256$..."` lines (PgBouncer's auth_file format).
    Userlist(PathBuf),
}

/// The default auth query: the role's verifier unless it cannot log in or has expired (a
/// superuser's view; for other auth users point `auth.query` at a SECURITY DEFINER function).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1 \
     AND rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > pg_catalog.now())";

/// How long a client keeps a backend connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// For the whole client session.
    Session,
    /// For one transaction (or lone statement) at a time; session state is carried over.
    Transaction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub method: AuthMethod,
    pub allow_plaintext_over_network: bool,
    /// Cleartext: how long a password Postgres accepted is trusted without asking Postgres.
    pub verify_interval: Duration,
    pub verifiers: VerifierSource,
    /// How long a verifier read from Postgres is used before it is read again (a failed
    /// log-in reads it again at once).
    pub verifier_ttl: Duration,
    /// How long a failed log-in waits before it is answered (as Postgres's `auth_delay`).
    pub failure_delay: Duration,
}

/// `[[pool.override]]`: a pool mode for a database, a user, or both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOverride {
    pub database: Option<String>,
    pub user: Option<String>,
    pub mode: PoolMode,
}

impl PoolConfig {
    /// The pool mode for clients of `database` as `user`.
    pub fn mode_for(&self, database: &str, user: &str) -> PoolMode {
        let applies = |o: &&PoolOverride| {
            o.database.as_deref().is_none_or(|d| d == database) && o.user.as_deref().is_none_or(|u| u == user)
        };
        self.overrides.iter().find(applies).map_or(self.mode, |o| o.mode)
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Other modes for some databases or users, first match first.
    pub overrides: Vec<PoolOverride>,
    pub max_size: usize,
    /// Transaction pooling: statements kept prepared per backend connection.
    pub max_prepared_statements: usize,
    pub min_idle: usize,
    pub acquire_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub connect_timeout: Duration,
    /// Clients that may wait for a backend of one pool at once (0: no limit); beyond, 53300.
    pub max_waiting: usize,
    /// Statements one pool may send to Postgres per second (0: no limit).
    pub max_statements_per_second: u32,
    /// After opening a connection failed, clients are told at once (57P03) instead of trying
    /// again, until this has passed.
    pub retry_delay: Duration,
    /// A backend given to a session is made to show that session's state (reset, its
    /// settings applied). Not a setting: only the tests turn it off, to show that their
    /// isolation oracle sees the leaks this prevents.
    #[doc(hidden)]
    pub isolate_sessions: bool,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub max_connections: usize,
    pub max_message_bytes: usize,
    pub max_output_bytes: usize,
    pub startup_timeout: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
}

/// What to do with writes whose targets cannot be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownWrites {
    InvalidateAll,
    Ignore,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_bytes: u64,
    pub max_entry_bytes: u64,
    pub single_flight_wait: Duration,
    pub unknown_writes: UnknownWrites,
    pub catalog_ttl: Duration,
    pub invalidate_on_writes: bool,
    pub invalidate_by_key: bool,
    /// Warm start without an L2: the hottest statements (shape, parameters and the session
    /// state they ran in; not rows) are written here on shutdown and re-run at start.
    pub warm_file: Option<std::path::PathBuf>,
    pub warm_statements: usize,
    /// Statements re-run per second at start.
    pub warm_rate: u32,
    /// `cache.admission = "adaptive"`: see [`crate::cache::admission`].
    pub adaptive_admission: bool,
}

#[derive(Debug, Clone)]
pub struct PeersConfig {
    /// What signs the messages on the channel (`None`: nothing; they cannot be authenticated).
    pub secret: Option<PeersSecret>,
    pub enabled: bool,
    pub channel: String,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub coalesce: Duration,
}

/// `--l2` / `[l2]`: the shared second-level cache on Redis or Valkey.
#[derive(Debug, Clone)]
pub struct L2Config {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS).
    pub url: Password,
    /// Longest an L2 call may take before it counts as failed (the L2 is then skipped).
    pub timeout: Duration,
    /// Every key pgcache writes starts with this.
    pub prefix: String,
    /// Larger results are not stored in the L2.
    pub max_value_bytes: u64,
    /// Larger results are stored compressed (LZ4); 0: never.
    pub compress_above: u64,
    /// Consecutive failures that open the breaker ...
    pub failures: u32,
    /// ... for this long.
    pub cooldown: Duration,
    /// Entries are found only under the current versions of what they read. Not a setting:
    /// only the tests turn it off, to show their checker sees the stale reads this prevents.
    #[doc(hidden)]
    pub check_versions: bool,
}

impl L2Config {
    /// The server, without credentials.
    pub fn describe(&self) -> String {
        let url = self.url.expose();
        match (url.split_once("://"), url.rsplit_once('@')) {
            (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
            _ => url.to_owned(),
        }
    }
}

/// Where the fleet's secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeersSecret {
    /// `peers.secret` / `PGCACHE_PEERS_SECRET`.
    Given(Password),
    /// The upstream URL's password, which the instances of a fleet share.
    FromUpstream(Password),
}

impl PeersSecret {
    /// The key material.
    pub fn bytes(&self) -> &[u8] {
        match self {
            PeersSecret::Given(p) | PeersSecret::FromUpstream(p) => p.expose().as_bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    pub database: String,
    pub users: Vec<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// A directory to listen in on a Unix socket too (`.s.PGSQL.<listen port>`).
    pub unix_socket_dir: Option<PathBuf>,
    pub upstream: Upstream,
    pub rules: PathBuf,
    /// Whether the rule directory was named explicitly (a missing default directory only
    /// means "no rules").
    pub rules_explicit: bool,
    pub admin: SocketAddr,
    pub log_format: LogFormat,
    pub auth: AuthConfig,
    pub pool: PoolConfig,
    pub client: ClientConfig,
    pub drain_timeout: Duration,
    pub cache: CacheConfig,
    pub console: ConsoleConfig,
    pub peers: PeersConfig,
    pub max_table_labels: usize,
    /// The bearer token `/metrics` requires, if any.
    pub metrics_token: Option<Password>,
    /// The shared L2, if any.
    pub l2: Option<L2Config>,
    /// Streaming replicas (none: every statement goes to the upstream).
    pub replicas: ReplicasConfig,
    pub slow_statement: Duration,
    /// Threads that run the sessions; `None`: one per CPU the process may use (its cgroup's
    /// CPU quota counted).
    pub worker_threads: Option<usize>,
}

/// More threads than this running sessions is a mistake (a typo), not a tuning.
pub const MAX_WORKER_THREADS: usize = 1024;

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid value for {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
pub const DEFAULT_UPSTREAM: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9930";

impl Config {
    /// Merges flags/env (`cli`) over the file named by `cli.config`, if any, over defaults.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    /// A configuration with every default, pointed at `upstream` (used by tests and tools).
    pub fn for_upstream(upstream: &str) -> Result<Config, ConfigError> {
        let cli = Cli { upstream: Some(upstream.to_owned()), ..Cli::default() };
        Config::merge(&cli, FileConfig::default())
    }

    pub fn merge(cli: &Cli, f: FileConfig) -> Result<Config, ConfigError> {
        let listen_s = cli.listen.clone().or(f.listen).unwrap_or_else(|| DEFAULT_LISTEN.into());
        let upstream_s = cli.upstream.clone().or(f.upstream).unwrap_or_else(|| DEFAULT_UPSTREAM.into());
        let admin_s = cli.admin.clone().or(f.admin).unwrap_or_else(|| DEFAULT_ADMIN.into());
        let upstream: Upstream =
            upstream_s.parse().map_err(|e: upstream::UpstreamError| invalid("upstream", e.to_string()))?;
        if f.auth.method.is_some() && f.auth.mode.is_some() {
            return Err(invalid("auth.mode", "give auth.method only (auth.mode is its former name)"));
        }
        let auth_method = match cli.auth.clone().or(f.auth.method).or(f.auth.mode).as_deref() {
            None | Some("scram-sha-256") => AuthMethod::ScramSha256,
            Some("cleartext" | "passthrough") => AuthMethod::Cleartext,
            Some("trust") => AuthMethod::Trust,
            Some(other) => {
                return Err(invalid(
                    "auth.method",
                    format!("{other:?} (expected \"scram-sha-256\", \"cleartext\" or \"trust\")"),
                ));
            }
        };
        let verifiers = match (f.auth.userlist.clone(), f.auth.query.is_some() || f.auth.user.is_some()) {
            (Some(_), true) => {
                return Err(invalid("auth.userlist", "give either auth.userlist or auth.query/auth.user, not both"));
            }
            (Some(path), false) => VerifierSource::Userlist(path),
            (None, _) => VerifierSource::Query {
                query: f.auth.query.clone().unwrap_or_else(|| DEFAULT_AUTH_QUERY.into()),
                user: f.auth.user.clone().unwrap_or_else(|| upstream.user.clone()),
                database: f.auth.database.clone().unwrap_or_else(|| upstream.dbname.clone()),
            },
        };
        let log_format = match cli.log_format.clone().or(f.log_format).as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid("log_format", format!("{other:?} (expected \"text\" or \"json\")")));
            }
        };
        let parse_mode = |key: &'static str, v: Option<&str>| match v {
            None | Some("session") => Ok(PoolMode::Session),
            Some("transaction") => Ok(PoolMode::Transaction),
            Some(other) => Err(invalid(key, format!("{other:?} (expected \"session\" or \"transaction\")"))),
        };
        let pool_mode = parse_mode("pool.mode", cli.pool_mode.as_deref().or(f.pool.mode.as_deref()))?;
        let mut pool_overrides = Vec::new();
        for o in &f.pool.overrides {
            if o.database.is_none() && o.user.is_none() {
                return Err(invalid("pool.override", "names no database and no user (set pool.mode instead)"));
            }
            pool_overrides.push(PoolOverride {
                database: o.database.clone(),
                user: o.user.clone(),
                mode: parse_mode("pool.override.mode", Some(&o.mode))?,
            });
        }
        let dur = |v: Option<Duration>, d: u64| v.unwrap_or(Duration::from_secs(d));
        let unknown_writes = match f.cache.unknown_writes.as_deref() {
            None | Some("invalidate_all") => UnknownWrites::InvalidateAll,
            Some("ignore") => UnknownWrites::Ignore,
            Some(other) => {
                return Err(invalid(
                    "cache.unknown_writes",
                    format!("{other:?} (expected \"invalidate_all\" or \"ignore\")"),
                ));
            }
        };
        let peers_enabled = match cli.peers.as_deref() {
            None => f.peers.enabled.unwrap_or(true),
            Some("on" | "true") => true,
            Some("off" | "false") => false,
            Some(other) => return Err(invalid("peers.enabled", format!("{other:?} (expected \"on\" or \"off\")"))),
        };
        let rules_given = cli.rules.clone().or(f.rules);
        let config = Config {
            listen: resolve("listen", &listen_s)?,
            unix_socket_dir: cli.unix_socket_dir.clone().or(f.unix_socket_dir),
            admin: resolve("admin", &admin_s)?,
            rules_explicit: rules_given.is_some(),
            rules: rules_given.unwrap_or_else(|| PathBuf::from("./rules")),
            log_format,
            auth: AuthConfig {
                method: auth_method,
                allow_plaintext_over_network: f.auth.allow_plaintext_over_network.unwrap_or(false),
                verify_interval: dur(f.auth.verify_interval, 60),
                verifiers,
                verifier_ttl: f.auth.verifier_ttl.unwrap_or(Duration::from_secs(1)),
                failure_delay: f.auth.failure_delay.unwrap_or(Duration::from_millis(500)),
            },
            pool: PoolConfig {
                mode: pool_mode,
                overrides: pool_overrides,
                max_size: cli.pool_size.or(f.pool.max_size).unwrap_or(20),
                max_prepared_statements: f.pool.max_prepared_statements.unwrap_or(200),
                isolate_sessions: true,
                max_waiting: f.pool.max_waiting.unwrap_or(1000),
                max_statements_per_second: f.pool.max_statements_per_second.unwrap_or(0),
                retry_delay: f.pool.retry_delay.unwrap_or(Duration::from_secs(1)),
                min_idle: f.pool.min_idle.unwrap_or(0),
                acquire_timeout: dur(f.pool.acquire_timeout, 5),
                idle_timeout: dur(f.pool.idle_timeout, 600),
                max_lifetime: dur(f.pool.max_lifetime, 3600),
                connect_timeout: f.pool.connect_timeout.or(upstream.connect_timeout).unwrap_or(Duration::from_secs(5)),
            },
            client: ClientConfig {
                max_connections: f.client.max_connections.unwrap_or(10_000),
                max_message_bytes: f.client.max_message_bytes.unwrap_or(1 << 30),
                max_output_bytes: f.client.max_output_bytes.unwrap_or(1 << 20),
                startup_timeout: dur(f.client.startup_timeout, 60),
                tls_cert: f.client.tls_cert,
                tls_key: f.client.tls_key,
                tls_required: f.client.tls_required.unwrap_or(false),
            },
            drain_timeout: dur(f.shutdown.drain_timeout, 30),
            cache: CacheConfig {
                max_bytes: f.cache.max_bytes.unwrap_or(256 << 20),
                max_entry_bytes: f.cache.max_entry_bytes.unwrap_or(8 << 20),
                single_flight_wait: dur(f.cache.single_flight_wait, 5),
                unknown_writes,
                catalog_ttl: dur(f.cache.catalog_ttl, 60),
                invalidate_on_writes: f.cache.invalidate_on_writes.unwrap_or(true),
                invalidate_by_key: f.cache.invalidate_by_key.unwrap_or(true),
                warm_file: f.cache.warm_file,
                warm_statements: f.cache.warm_statements.unwrap_or(1000),
                warm_rate: f.cache.warm_rate.unwrap_or(20),
                adaptive_admission: match f.cache.admission.as_deref() {
                    None | Some("adaptive") => true,
                    Some("always") => false,
                    Some(other) => {
                        return Err(invalid(
                            "cache.admission",
                            format!("{other:?} (expected \"adaptive\" or \"always\")"),
                        ));
                    }
                },
            },
            console: ConsoleConfig {
                database: f.console.database.unwrap_or_else(|| "pgcache".into()),
                users: f.console.users.unwrap_or_else(|| vec![upstream.user.clone()]),
            },
            peers: PeersConfig {
                enabled: peers_enabled,
                channel: f.peers.channel.unwrap_or_else(|| "pgcache_invalidation".into()),
                heartbeat: f.peers.heartbeat.unwrap_or(Duration::from_millis(250)),
                dead_after: dur(f.peers.dead_after, 1),
                coalesce: f.peers.coalesce.unwrap_or(Duration::from_millis(5)),
                secret: cli
                    .peers_secret
                    .clone()
                    .or(f.peers.secret)
                    .filter(|s| !s.is_empty())
                    .map(|s| PeersSecret::Given(Password::new(s)))
                    .or_else(|| upstream.password.clone().map(PeersSecret::FromUpstream)),
            },
            max_table_labels: f.metrics.max_table_labels.unwrap_or(100),
            metrics_token: cli.metrics_token.clone().or(f.metrics.token).filter(|t| !t.is_empty()).map(Password::new),
            l2: match cli.l2.clone().or(f.l2.url.clone()).filter(|u| !u.is_empty()) {
                Some(url) => {
                    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                        return Err(invalid("l2.url", "must start with redis:// or rediss://"));
                    }
                    Some(L2Config {
                        url: Password::new(url),
                        timeout: f.l2.timeout.unwrap_or(Duration::from_millis(50)),
                        prefix: f.l2.prefix.clone().unwrap_or_else(|| "pgcache:".into()),
                        max_value_bytes: f.l2.max_value_bytes.unwrap_or(1 << 20),
                        compress_above: f.l2.compress_above.unwrap_or(0),
                        failures: f.l2.failures.unwrap_or(3).max(1),
                        cooldown: f.l2.cooldown.unwrap_or(Duration::from_secs(5)),
                        check_versions: true,
                    })
                }
                None => None,
            },
            replicas: replicas::load(cli, &f.replicas, &f.replica)?,
            slow_statement: dur(f.slow_statement, 1),
            worker_threads: cli.worker_threads.or(f.worker_threads),
            upstream,
        };
        config.validate()?;
        Ok(config)
    }

    /// The Unix socket clients may connect to when the TCP listener has `port`, if one is
    /// configured: named as Postgres names its own, so `host=<dir> port=<port>` finds it.
    pub fn unix_socket(&self, port: u16) -> Option<PathBuf> {
        Some(self.unix_socket_dir.as_ref()?.join(format!(".s.PGSQL.{port}")))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.method == AuthMethod::Trust && !self.listen.ip().is_loopback() {
            return Err(invalid(
                "auth.method",
                format!("\"trust\" needs a loopback listen address, not {}", self.listen),
            ));
        }
        if self.worker_threads.is_some_and(|n| !(1..=MAX_WORKER_THREADS).contains(&n)) {
            return Err(invalid("worker_threads", format!("must be between 1 and {MAX_WORKER_THREADS}")));
        }
        if self.pool.max_size == 0 {
            return Err(invalid("pool.max_size", "must be at least 1"));
        }
        if self.pool.max_prepared_statements == 0 {
            return Err(invalid("pool.max_prepared_statements", "must be at least 1"));
        }
        if self.pool.min_idle > self.pool.max_size {
            return Err(invalid("pool.min_idle", "must not exceed pool.max_size"));
        }
        if self.cache.max_bytes < 1 << 16 {
            return Err(invalid("cache.max_bytes", "must be at least 65536"));
        }
        if self.cache.max_entry_bytes == 0 || self.cache.max_entry_bytes > self.cache.max_bytes / 2 {
            return Err(invalid("cache.max_entry_bytes", "must be between 1 and half of cache.max_bytes"));
        }
        if self.cache.warm_rate == 0 {
            return Err(invalid("cache.warm_rate", "must be at least 1 statement per second"));
        }
        if self.cache.warm_statements == 0 {
            return Err(invalid(
                "cache.warm_statements",
                "must be at least 1 (leave warm_file out to turn warm starts off)",
            ));
        }
        if self.console.database.is_empty() {
            return Err(invalid("console.database", "must not be empty"));
        }
        let channel = &self.peers.channel;
        if channel.is_empty()
            || channel.len() > 63
            || !channel.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid("peers.channel", "lower-case letters, digits and _, at most 63 characters"));
        }
        if self.peers.dead_after <= self.peers.heartbeat * 2 {
            return Err(invalid("peers.dead_after", "must be more than twice peers.heartbeat"));
        }
        if self.client.max_connections == 0 {
            return Err(invalid("client.max_connections", "must be at least 1"));
        }
        if self.client.max_message_bytes < 1024 {
            return Err(invalid("client.max_message_bytes", "must be at least 1024"));
        }
        if self.client.max_output_bytes < 8192 {
            return Err(invalid("client.max_output_bytes", "must be at least 8192"));
        }
        if self.client.tls_cert.is_some() != self.client.tls_key.is_some() {
            return Err(invalid("client.tls_cert", "tls_cert and tls_key must be set together"));
        }
        if self.client.tls_required && self.client.tls_cert.is_none() {
            return Err(invalid("client.tls_required", "needs client.tls_cert and client.tls_key"));
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    FileConfig::parse(&text).map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })
}

fn resolve(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.to_socket_addrs()
        .map_err(|e| invalid(key, format!("{s:?}: {e}")))?
        .next()
        .ok_or_else(|| invalid(key, format!("{s:?} resolves to no address")))
}

#[cfg(test)]
mod tests;
