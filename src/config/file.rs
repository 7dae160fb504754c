//! The TOML config file. Every key is optional; a key given on the command line or in the
//! environment wins over the file. Unknown keys are errors (`deny_unknown_fields`), reported
//! by `toml` with the key, line and column. Durations are written as `"500ms"`, `"5s"`,
//! `"10m"` (humantime).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Client listen address (default `127.0.0.1:6432`).
    pub listen: Option<String>,
    /// A directory to listen in on a Unix socket too (`.s.PGSQL.<listen port>`).
    pub unix_socket_dir: Option<PathBuf>,
    /// Upstream Postgres URL (default `postgres://postgres@127.0.0.1:5432/postgres`).
    pub upstream: Option<String>,
    /// Rule directory (default `./rules`).
    pub rules: Option<PathBuf>,
    /// Admin HTTP address (default `127.0.0.1:9930`).
    pub admin: Option<String>,
    /// Threads that run the sessions (default: one per CPU the process may use).
    pub worker_threads: Option<usize>,
    /// Log format, `text` (default) or `json`.
    pub log_format: Option<String>,
    /// Log statements slower than this, with their normalized text (default `1s`).
    #[serde(default, with = "humantime_serde")]
    pub slow_statement: Option<Duration>,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub pool: PoolFile,
    #[serde(default)]
    pub client: ClientFile,
    #[serde(default)]
    pub shutdown: ShutdownFile,
    #[serde(default)]
    pub cache: CacheFile,
    #[serde(default)]
    pub console: ConsoleFile,
    #[serde(default)]
    pub metrics: MetricsFile,
    #[serde(default)]
    pub peers: PeersFile,
    #[serde(default)]
    pub l2: L2File,
    /// `[[replicas]]`: streaming replicas of the upstream.
    #[serde(default)]
    pub replicas: Vec<ReplicaFile>,
    #[serde(default)]
    pub replica: ReplicaSettingsFile,
}

/// `[[replicas]]`: one streaming replica.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaFile {
    /// A libpq URL: its host, port and TLS settings are used.
    pub url: String,
    /// Its share of the reads (default 1; 0: none).
    pub weight: Option<u32>,
}

/// `[replica]`: how replicas are used.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSettingsFile {
    /// A replica further behind than this many bytes of WAL gets no reads (default 16 MiB).
    pub max_lag_bytes: Option<u64>,
    /// A replica that has lacked WAL the primary had for longer than this gets no reads
    /// (default: not used).
    #[serde(default, with = "humantime_serde")]
    pub max_lag_time: Option<Duration>,
    /// The primary's share of the reads replicas could take, against their weights (default 0).
    pub primary_weight: Option<u32>,
    /// How often positions are read (default `100ms`).
    #[serde(default, with = "humantime_serde")]
    pub check_interval: Option<Duration>,
    /// Longest a check may take (default `1s`).
    #[serde(default, with = "humantime_serde")]
    pub check_timeout: Option<Duration>,
    /// `session` (default), `causal` or `off`.
    pub read_your_writes: Option<String>,
}

/// `[peers]`: invalidation shared with the other pgcache instances in front of the same
/// Postgres, over `LISTEN`/`NOTIFY`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersFile {
    /// Publish this instance's invalidations and apply the others' (default `true`; it acts
    /// while the cache is in use: rules loaded, or entries left). `false` makes every
    /// instance's cache its own.
    pub enabled: Option<bool>,
    /// The channel (default `pgcache_invalidation`); every instance of a fleet and the bypass
    /// triggers must use the same one.
    pub channel: Option<String>,
    /// How often an instance says it is alive when it has nothing to publish (default
    /// `250ms`).
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// An instance not heard from for this long may have died with invalidations unsent:
    /// everything cached for the database is dropped (default `1s`).
    #[serde(default, with = "humantime_serde")]
    pub dead_after: Option<Duration>,
    /// The fleet's secret: every message on the channel is signed with it (HMAC-SHA-256), and
    /// unsigned or wrongly signed ones are dropped (default: derived from the upstream URL's
    /// password, which a fleet shares; better given as `PGCACHE_PEERS_SECRET`).
    pub secret: Option<String>,
    /// Invalidations are gathered for at least this long into one notification (default
    /// `5ms`): fewer `NOTIFY` commits under write load, at most this much later.
    #[serde(default, with = "humantime_serde")]
    pub coalesce: Option<Duration>,
}

/// `[console]`: the psql admin console.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFile {
    /// The virtual database name (default `pgcache`).
    pub database: Option<String>,
    /// Users allowed to connect to it (default: the user of the upstream URL). They
    /// authenticate as for any database.
    pub users: Option<Vec<String>>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// Distinct `table` label values on `pgcache_invalidations_total` before further tables
    /// are counted as `other` (default 100).
    pub max_table_labels: Option<usize>,
    /// A bearer token `/metrics` requires (`Authorization: Bearer <token>`); none by default.
    /// (`/healthz` and `/readyz` stay open for probes.)
    pub token: Option<String>,
}

/// `[cache]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    /// Total bytes of cached results (default 256 MiB).
    pub max_bytes: Option<u64>,
    /// Largest single result cached, unless a rule says otherwise (default 8 MiB).
    pub max_entry_bytes: Option<u64>,
    /// How long a miss waits for an identical miss in flight before querying itself
    /// (default `5s`).
    #[serde(default, with = "humantime_serde")]
    pub single_flight_wait: Option<Duration>,
    /// Writes whose targets cannot be known (DO, CALL, volatile user functions, unparseable
    /// SQL): `invalidate_all` (default) or `ignore` (counted and logged only).
    pub unknown_writes: Option<String>,
    /// How long catalog facts (function volatility, views, partitions, foreign keys) are
    /// trusted before being looked up again (default `60s`; DDL seen by pgcache clears them).
    #[serde(default, with = "humantime_serde")]
    pub catalog_ttl: Option<Duration>,
    /// Invalidate cached results when pgcache sees writes to the tables they read (default
    /// `true`). `false` makes the cache TTL-only: results may be stale for up to their TTL.
    pub invalidate_on_writes: Option<bool>,
    /// Invalidate by primary-key value when a read and a write are both pinned to key values
    /// of one table (`WHERE id = …`), instead of every result read from that table (default
    /// `true`). `false` invalidates by table only.
    pub invalidate_by_key: Option<bool>,
    /// Where the hottest statements are written on shutdown and re-run from at start (no
    /// default: off).
    pub warm_file: Option<std::path::PathBuf>,
    /// How many statements the warm file keeps (default 1000).
    pub warm_statements: Option<usize>,
    /// How many statements per second re-run at start (default 20).
    pub warm_rate: Option<u32>,
    /// `adaptive` (default): a rule whose entries are seldom read again stores a miss only at
    /// its key's second miss; `always`: every miss is stored.
    pub admission: Option<String>,
}

/// `[auth]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// `scram-sha-256` (default: SCRAM against the role's verifier, then SCRAM pass-through to
    /// Postgres), `cleartext` (the client's password, judged by Postgres) or `trust` (no
    /// client authentication; loopback listen addresses only).
    pub method: Option<String>,
    /// The former name of `method` (`passthrough` meant `cleartext`).
    pub mode: Option<String>,
    /// The query that returns a role's verifier, given its name as `$1` (default: from
    /// `pg_authid`, for a superuser auth user).
    pub query: Option<String>,
    /// Who runs the auth query (default: the upstream URL's user, with its password).
    pub user: Option<String>,
    /// Where the auth query runs (default: the upstream URL's database).
    pub database: Option<String>,
    /// A file of `"role" "SCRAM-SHA-256$..."` lines instead of the auth query.
    pub userlist: Option<PathBuf>,
    /// How long a verifier is used before it is read again (default `1s`; a failed log-in
    /// reads it again at once).
    #[serde(default, with = "humantime_serde")]
    pub verifier_ttl: Option<Duration>,
    /// How long a failed log-in waits before it is answered (default `500ms`).
    #[serde(default, with = "humantime_serde")]
    pub failure_delay: Option<Duration>,
    /// Allow cleartext password exchange with clients on non-loopback, non-TLS connections
    /// (default `false`).
    pub allow_plaintext_over_network: Option<bool>,
    /// How long a password Postgres accepted is trusted before the next client login is
    /// verified by Postgres again (default `60s`; `0s` verifies every login).
    #[serde(default, with = "humantime_serde")]
    pub verify_interval: Option<Duration>,
}

/// `[pool]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// `session` (default) or `transaction`.
    pub mode: Option<String>,
    /// Maximum backend connections per (database, user) (default 20).
    pub max_size: Option<usize>,
    /// Transaction pooling: statements kept prepared per backend connection (default 200).
    pub max_prepared_statements: Option<usize>,
    /// Clients that may wait for a backend of one pool at once; more get 53300 at once
    /// (default 1000; 0: no limit).
    pub max_waiting: Option<usize>,
    /// Statements the session-pooled clients of one pool (database, user) may start sending to
    /// Postgres per second, outside a transaction; more wait their turn (default 0: no limit).
    /// Cache hits do not count.
    pub max_statements_per_second: Option<u32>,
    /// After opening a connection to Postgres failed, clients that need a new one are told so
    /// at once (57P03) until this has passed, instead of each trying (default `1s`).
    #[serde(default, with = "humantime_serde")]
    pub retry_delay: Option<Duration>,
    /// `[[pool.override]]`: another mode for some databases or users (first match wins).
    #[serde(default, rename = "override")]
    pub overrides: Vec<PoolOverrideFile>,
    /// Idle connections kept open per pool once its credentials are known (default 0).
    pub min_idle: Option<usize>,
    /// How long a client waits for a backend before SQLSTATE 53300 (default `5s`).
    #[serde(default, with = "humantime_serde")]
    pub acquire_timeout: Option<Duration>,
    /// Close idle backend connections after this long (default `10m`).
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Close backend connections older than this when they are next idle (default `1h`).
    #[serde(default, with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Give up connecting to Postgres after this long (default `5s`, or the URL's
    /// `connect_timeout`).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

/// `[[pool.override]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolOverrideFile {
    /// The database it applies to (any if absent).
    pub database: Option<String>,
    /// The user it applies to (any if absent).
    pub user: Option<String>,
    /// `session` or `transaction`.
    pub mode: String,
}

/// `[l2]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2File {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS); none by default.
    pub url: Option<String>,
    /// Longest an L2 call may take before it counts as failed (default `50ms`).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Every key pgcache writes starts with this (default `pgcache:`).
    pub prefix: Option<String>,
    /// Larger results are not stored in the L2 (default 1 MiB).
    pub max_value_bytes: Option<u64>,
    /// Larger results are stored compressed with LZ4 (default 0: never).
    pub compress_above: Option<u64>,
    /// Consecutive failures that open the breaker (default 3) ...
    pub failures: Option<u32>,
    /// ... for this long (default `5s`).
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
}

/// `[client]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Maximum concurrent client connections (default 10000).
    pub max_connections: Option<usize>,
    /// Largest message a client may send, in bytes (default 1 GiB, as Postgres).
    pub max_message_bytes: Option<usize>,
    /// Bytes waiting to be sent to one client (answers, cache hits) above which pgcache
    /// stops reading it until it reads (default 1 MiB).
    pub max_output_bytes: Option<usize>,
    /// Time allowed for the startup handshake and authentication (default `60s`).
    #[serde(default, with = "humantime_serde")]
    pub startup_timeout: Option<Duration>,
    /// PEM certificate chain for client TLS; with `tls_key`, SSLRequest is answered `S`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for client TLS.
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS (default `false`; needs `tls_cert`).
    pub tls_required: Option<bool>,
}

/// `[shutdown]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// On SIGTERM/SIGINT, how long running statements may take to finish (default `30s`).
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
}

impl FileConfig {
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}
