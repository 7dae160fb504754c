//! The admin console's commands, parsed once into a [`Command`] that knows its columns (so a
//! driver's Describe runs nothing) and whether it changes something (so a transaction block
//! can refuse it, [`super::block`]). Each runs against the live server and answers with a
//! result set (text columns), so psql shows a table. Unknown commands get an error listing them.

use std::sync::Arc;
use std::time::Duration;

use crate::config::PoolMode;
use crate::context::Context;
use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;
use crate::query::Relation;
use crate::rules::Action;

use super::advice;
use super::control::Control;
use super::table::PAIRS;
pub use super::table::ResultSet;

pub const COMMANDS: &str = "SHOW STATS | POOLS | CLIENTS | SERVERS | CACHE | RULES | CONFIG | QUERIES | ADVICE | PEERS | L2 | REPLICAS, \
    EXPLAIN CACHE [ON <database>] <select>, INVALIDATE TABLE <name> | RULE <name> | ALL, RELOAD, PAUSE, RESUME, BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE";

fn unknown(cmd: &str) -> PgError {
    PgError::error(SqlState::SYNTAX_ERROR, format!("unknown pgcache admin command: {cmd:?}"))
        .with_hint(format!("commands: {COMMANDS}"))
}

/// The session parameters drivers set as they connect, which the console accepts (and ignores).
const DRIVER_PARAMETERS: [&str; 6] =
    ["EXTRA_FLOAT_DIGITS", "APPLICATION_NAME", "CLIENT_ENCODING", "DATESTYLE", "TIMEZONE", "INTERVALSTYLE"];

/// `SET [SESSION] <one of DRIVER_PARAMETERS> {= | TO} …` (words in upper case).
fn sets_a_driver_parameter(up: &[&str]) -> bool {
    let rest = match up {
        ["SET", "SESSION", rest @ ..] | ["SET", rest @ ..] => rest,
        _ => return false,
    };
    // `name=value` may come as one word.
    let name = rest.first().map(|w| w.split('=').next().unwrap_or(w)).unwrap_or("");
    DRIVER_PARAMETERS.contains(&name) && (rest.len() >= 2 || rest[0].contains('='))
}

const STATS: &[&str] = &["stat", "total", "per_second"];
const POOLS: &[&str] = &[
    "database",
    "user",
    "mode",
    "clients_active",
    "clients_idle",
    "clients_waiting",
    "active",
    "idle",
    "max",
    "pinned",
    "throttled",
];
const CLIENTS: &[&str] = &["peer", "user", "database", "connected_since", "backend_pid"];
const SERVERS: &[&str] = &["database", "user", "pid", "state", "age_seconds"];
const CACHE: &[&str] = &["rule", "entries", "bytes", "hits_on_entries", "oldest_age_seconds"];
const RULES: &[&str] = &[
    "name",
    "file",
    "line",
    "action",
    "ttl",
    "stale_while_revalidate",
    "stale_if_error",
    "match",
    "hits",
    "misses",
    "admission",
    "last_reload",
    "reload_error",
];
const PEERS: &[&str] = &[
    "database",
    "channel",
    "state",
    "listening_since",
    "last_message",
    "instances",
    "sent",
    "received",
    "resyncs",
    "last_error",
];
const REPLICAS: &[&str] =
    &["replica", "state", "weight", "replay_lsn", "lag_bytes", "lag_ms", "reads", "active", "idle", "last_error"];

/// What a `SHOW` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Stats,
    Pools,
    Clients,
    Servers,
    Cache,
    Rules,
    Config,
    Queries,
    Advice,
    Peers,
    L2,
    Replicas,
}

/// One console command, parsed: what it shows or does, with its columns known without running
/// it (a driver's Describe of a statement runs nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Show(Show),
    /// `EXPLAIN CACHE [ON <database>] <select>`.
    Explain {
        database: Option<&'a str>,
        sql: &'a str,
    },
    InvalidateTable(&'a str),
    InvalidateRule(&'a str),
    InvalidateAll,
    /// A driver's `SET` of a parameter the console accepts and ignores.
    Set,
    Reload,
    Pause,
    Resume,
    /// A transaction-control statement ([`super::block`] keeps the block).
    Control(Control<'a>),
}

impl<'a> Command<'a> {
    /// Parses one command (a statement without its trailing semicolon).
    pub fn parse(text: &'a str) -> Result<Self, PgError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let up: Vec<&str> = upper.iter().map(String::as_str).collect();
        if let Some(control) = Control::parse(&words, &up) {
            return control.map(Command::Control);
        }
        Ok(match up.as_slice() {
            ["SHOW", what] => Command::Show(match *what {
                "STATS" => Show::Stats,
                "POOLS" => Show::Pools,
                "CLIENTS" => Show::Clients,
                "SERVERS" => Show::Servers,
                "CACHE" => Show::Cache,
                "RULES" => Show::Rules,
                "CONFIG" => Show::Config,
                "QUERIES" => Show::Queries,
                "ADVICE" => Show::Advice,
                "PEERS" => Show::Peers,
                "L2" => Show::L2,
                "REPLICAS" => Show::Replicas,
                _ => return Err(unknown(text.trim())),
            }),
            ["EXPLAIN", "CACHE", ..] => {
                // EXPLAIN CACHE [ON database] <select>
                let rest = text.trim_start()[7..].trim_start()[5..].trim_start();
                let (database, sql) = match up.get(2) {
                    Some(&"ON") if words.len() > 3 => {
                        let after_on = rest[2..].trim_start();
                        let db = words[3];
                        (Some(db), after_on[db.len()..].trim())
                    }
                    _ => (None, rest.trim()),
                };
                if sql.is_empty() {
                    return Err(PgError::error(SqlState::SYNTAX_ERROR, "EXPLAIN CACHE needs a SELECT"));
                }
                Command::Explain { database, sql }
            }
            ["INVALIDATE", "TABLE", _] => Command::InvalidateTable(words[2]),
            ["INVALIDATE", "RULE", _] => Command::InvalidateRule(words[2]),
            ["INVALIDATE", "ALL"] => Command::InvalidateAll,
            // Drivers set session parameters as they connect (pgjdbc: `extra_float_digits`):
            // those are accepted, and change nothing (the console answers in text whatever
            // they say). Any other setting is refused rather than seeming to take.
            ["SET", ..] if sets_a_driver_parameter(&up) => Command::Set,
            ["SET", ..] => {
                return Err(PgError::error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the pgcache admin console has no session settings",
                )
                .with_hint(format!("accepted and ignored: SET {}", DRIVER_PARAMETERS.join(" | "))));
            }
            ["RELOAD"] => Command::Reload,
            ["PAUSE"] => Command::Pause,
            ["RESUME"] => Command::Resume,
            _ => return Err(unknown(text.trim())),
        })
    }

    /// The columns of the command's answer (none: only a command tag).
    pub fn columns(&self) -> &'static [&'static str] {
        match self {
            Command::Show(show) => match show {
                Show::Stats => STATS,
                Show::Pools => POOLS,
                Show::Clients => CLIENTS,
                Show::Servers => SERVERS,
                Show::Cache => CACHE,
                Show::Rules => RULES,
                Show::Queries => advice::QUERIES,
                Show::Advice => advice::ADVICE,
                Show::Peers => PEERS,
                Show::Replicas => REPLICAS,
                Show::Config | Show::L2 => PAIRS,
            },
            Command::Explain { .. }
            | Command::InvalidateTable(_)
            | Command::InvalidateRule(_)
            | Command::InvalidateAll
            | Command::Reload
            | Command::Pause
            | Command::Resume => PAIRS,
            Command::Set | Command::Control(_) => &[],
        }
    }

    /// Whether the command changes something (and so may not run inside a transaction block).
    pub fn changes_something(&self) -> bool {
        matches!(
            self,
            Command::InvalidateTable(_)
                | Command::InvalidateRule(_)
                | Command::InvalidateAll
                | Command::Reload
                | Command::Pause
                | Command::Resume
        )
    }

    /// The name Postgres-style errors call the command by.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Explain { .. } => "EXPLAIN CACHE",
            Command::InvalidateTable(_) | Command::InvalidateRule(_) | Command::InvalidateAll => "INVALIDATE",
            Command::Set => "SET",
            Command::Reload => "RELOAD",
            Command::Pause => "PAUSE",
            Command::Resume => "RESUME",
            Command::Control(control) => control.name(),
        }
    }
}

/// Runs a parsed command. A transaction-control statement only answers its tag: the console
/// session keeps the block ([`super::console`]).
pub async fn run(ctx: &Arc<Context>, command: Command<'_>) -> Result<ResultSet, PgError> {
    Ok(match command {
        Command::Show(show) => match show {
            Show::Stats => stats(ctx),
            Show::Pools => pools(ctx),
            Show::Clients => clients(ctx),
            Show::Servers => servers(ctx),
            Show::Cache => cache(ctx),
            Show::Rules => rules(ctx),
            Show::Config => config(ctx),
            Show::Queries => advice::queries(ctx).await,
            Show::Advice => advice::advice(ctx).await,
            Show::Peers => peers(ctx),
            Show::L2 => l2(ctx),
            Show::Replicas => replicas(ctx),
        },
        Command::Explain { database, sql } => advice::explain(ctx, database, sql).await,
        Command::InvalidateTable(name) => {
            // (In the L2, by name in every database is not one version: everything moves.)
            if let Some(l2) = &ctx.l2 {
                l2.bump(&[crate::l2::Version::All]).await;
            }
            invalidate_table(ctx, name)?
        }
        Command::InvalidateRule(name) => invalidate_rule(ctx, name)?,
        Command::InvalidateAll => {
            ctx.generations.bump_all();
            if let Some(l2) = &ctx.l2 {
                l2.bump(&[crate::l2::Version::All]).await;
            }
            ctx.peers.publish_everywhere(&[], true);
            ctx.stats.all_invalidated();
            let n = ctx.store.remove_where(|_| true);
            ResultSet::pairs("INVALIDATE", vec![("entries_removed", n.to_string())])
        }
        Command::Set => ResultSet::new(&[], "SET"),
        Command::Reload => reload(ctx)?,
        Command::Pause => {
            ctx.pause(true);
            ResultSet::pairs("PAUSE", vec![("paused", "new backend work waits until RESUME".into())])
        }
        Command::Resume => {
            ctx.pause(false);
            ResultSet::pairs("RESUME", vec![("paused", "no".into())])
        }
        Command::Control(_) => ResultSet::new(&[], command.name()),
    })
}

/// `SHOW L2`: the shared L2's server, connection, breaker and calls.
fn l2(ctx: &Context) -> ResultSet {
    let Some(l2) = &ctx.l2 else {
        return ResultSet::pairs("SHOW", vec![("l2", "none (no --l2 configured)".into())]);
    };
    let s = l2.state();
    ResultSet::pairs(
        "SHOW",
        vec![
            ("server", s.server),
            ("connected", (if s.connected { "yes" } else { "no" }).into()),
            ("breaker", (if s.breaker_open { "open (not used)" } else { "closed" }).into()),
            ("consecutive_failures", s.consecutive_failures.to_string()),
            ("hits", s.hits.to_string()),
            ("misses", s.misses.to_string()),
            ("errors", s.errors.to_string()),
            ("stores", s.stores.to_string()),
            ("version_bumps", s.version_bumps.to_string()),
        ],
    )
}

/// One row per replica: what the monitor last found, and the reads sent there.
fn replicas(ctx: &Context) -> ResultSet {
    let mut r = ResultSet::new(REPLICAS, "SHOW");
    for node in &ctx.replicas.nodes {
        let (mut active, mut idle) = (0, 0);
        for p in node.pools.all() {
            let s = p.stats();
            active += s.active;
            idle += s.idle;
        }
        let replay = node.replay();
        r.row([
            node.name.clone(),
            node.state().as_str().to_owned(),
            node.weight.to_string(),
            format!("{:X}/{:X}", replay >> 32, replay & 0xFFFF_FFFF),
            node.lag().to_string(),
            node.lag_time().as_millis().to_string(),
            node.reads.load(std::sync::atomic::Ordering::Relaxed).to_string(),
            active.to_string(),
            idle.to_string(),
            node.last_error.lock().clone().unwrap_or_default(),
        ]);
    }
    r
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn stats(ctx: &Context) -> ResultSet {
    let t = ctx.stats.totals();
    let up = t.uptime.as_secs_f64().max(1e-3);
    let mut r = ResultSet::new(STATS, "SHOW");
    let mut add =
        |name: &str, total: u64| r.row([name.to_owned(), total.to_string(), format!("{:.2}", total as f64 / up)]);
    add("statements", t.statements);
    add("hits", t.hits);
    add("misses", t.misses);
    add("passthrough", t.passthrough);
    add("stale_served", t.stale);
    add("errors", t.errors);
    add("bytes_served_from_cache", t.bytes_served);
    let cacheable = t.hits + t.misses;
    r.row([
        "hit_ratio".into(),
        if cacheable == 0 { "".into() } else { format!("{:.4}", t.hits as f64 / cacheable as f64) },
        "".into(),
    ]);
    r.row(["uptime_seconds".into(), format!("{:.0}", up), "".into()]);
    r.row(["clients".into(), ctx.clients.sessions().to_string(), "".into()]);
    r.row(["cache_entries".into(), ctx.store.len().to_string(), "".into()]);
    r.row(["cache_bytes".into(), ctx.store.bytes().to_string(), "".into()]);
    r.row(["cache_evictions".into(), ctx.store.evictions().to_string(), "".into()]);
    r.row(["paused".into(), (if ctx.is_paused() { "yes" } else { "no" }).into(), "".into()]);
    r
}

fn pools(ctx: &Context) -> ResultSet {
    let config = ctx.config();
    let mut r = ResultSet::new(POOLS, "SHOW");
    let clients = ctx.clients.list();
    for p in ctx.pools.all() {
        let s = p.stats();
        let mine = clients.iter().filter(|c| *c.key == p.key);
        let (mut holding, mut without) = (0, 0);
        for c in mine {
            match c.backend_pid {
                None => without += 1,
                Some(_) => holding += 1,
            }
        }
        let pins: Vec<String> = p.pins().iter().map(|(reason, n)| format!("{reason}: {n}")).collect();
        let mode = match config.pool.mode_for(&p.key.database, &p.key.user) {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        r.row([
            p.key.database.clone(),
            p.key.user.clone(),
            mode.to_owned(),
            holding.to_string(),
            (without - s.waiting.min(without)).to_string(),
            s.waiting.to_string(),
            s.active.to_string(),
            s.idle.to_string(),
            s.max.to_string(),
            pins.join(", "),
            p.throttled().to_string(),
        ]);
    }
    r
}

fn clients(ctx: &Context) -> ResultSet {
    let mut r = ResultSet::new(CLIENTS, "SHOW");
    for c in ctx.clients.list() {
        r.row([
            c.peer.to_string(),
            c.key.user.clone(),
            c.key.database.clone(),
            humantime::format_rfc3339_seconds(c.since).to_string(),
            c.backend_pid.map_or_else(|| "none".into(), |pid| pid.to_string()),
        ]);
    }
    r
}

fn servers(ctx: &Context) -> ResultSet {
    let mut r = ResultSet::new(SERVERS, "SHOW");
    for p in ctx.pools.all() {
        for s in p.servers() {
            r.row([
                p.key.database.clone(),
                p.key.user.clone(),
                s.pid.to_string(),
                (if s.active { "active" } else { "idle" }).into(),
                format!("{:.0}", s.age.as_secs_f64()),
            ]);
        }
    }
    r
}

fn cache(ctx: &Context) -> ResultSet {
    let mut per_rule: std::collections::BTreeMap<String, (u64, u64, u64, Duration)> = Default::default();
    for (_, e) in ctx.store.entries() {
        let slot = per_rule.entry(e.rule.name.clone()).or_default();
        slot.0 += 1;
        slot.1 += e.weight();
        slot.2 += e.hits.load(std::sync::atomic::Ordering::Relaxed);
        slot.3 = slot.3.max(e.age());
    }
    let mut r = ResultSet::new(CACHE, "SHOW");
    for (rule, (n, b, h, age)) in per_rule {
        r.row([rule, n.to_string(), b.to_string(), h.to_string(), secs(age)]);
    }
    r.row([
        "(total)".into(),
        ctx.store.len().to_string(),
        ctx.store.bytes().to_string(),
        format!("capacity {}", ctx.store.capacity()),
        format!("evictions {}", ctx.store.evictions()),
    ]);
    r
}

fn rules(ctx: &Context) -> ResultSet {
    let set = ctx.rules.current();
    let status = ctx.rules.status();
    let queries = ctx.stats.queries();
    let mut r = ResultSet::new(RULES, "SHOW");
    for rule in &set.rules {
        let (hits, misses) = queries
            .iter()
            .filter(|q| q.rule.as_ref().is_some_and(|r| r.name == rule.name))
            .fold((0, 0), |(h, m), q| (h + q.hits, m + q.misses));
        r.row([
            rule.name.clone(),
            rule.file.display().to_string(),
            rule.line.to_string(),
            (if rule.action == Action::Cache { "cache" } else { "bypass" }).into(),
            humantime::format_duration(rule.ttl).to_string(),
            humantime::format_duration(rule.stale_while_revalidate).to_string(),
            humantime::format_duration(rule.stale_if_error).to_string(),
            rule.matcher.describe(),
            hits.to_string(),
            misses.to_string(),
            match (rule.action, rule.usage.gated()) {
                (Action::Bypass, _) => "",
                (_, false) => "open",
                (_, true) => "gated",
            }
            .into(),
            humantime::format_rfc3339_seconds(status.at).to_string(),
            status.error.clone().unwrap_or_default(),
        ]);
    }
    if set.rules.is_empty() {
        r.rows.push(vec![
            Some("(no rules)".into()),
            Some(ctx.rules.dir().display().to_string()),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            Some(humantime::format_rfc3339_seconds(status.at).to_string()),
            Some(status.error.unwrap_or_default()),
        ]);
    }
    r
}

fn config(ctx: &Context) -> ResultSet {
    let c = ctx.config();
    let up = &c.upstream;
    ResultSet::pairs(
        "SHOW",
        vec![
            ("listen", c.listen.to_string()),
            (
                "unix_socket_dir",
                c.unix_socket_dir.as_ref().map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
            ),
            ("admin", c.admin.to_string()),
            (
                "upstream",
                format!(
                    "{}@{}/{} sslmode={:?} password={}",
                    up.user,
                    up.describe(),
                    up.dbname,
                    up.sslmode,
                    if up.password.is_some() { "(set)" } else { "(none)" }
                ),
            ),
            ("rules", c.rules.display().to_string()),
            ("auth.method", c.auth.method.name().to_owned()),
            (
                "auth.verifiers",
                match &c.auth.verifiers {
                    crate::config::VerifierSource::Query { user, database, .. } => {
                        format!("auth query as {user} in {database}")
                    }
                    crate::config::VerifierSource::Userlist(p) => format!("userlist {}", p.display()),
                },
            ),
            ("auth.allow_plaintext_over_network", c.auth.allow_plaintext_over_network.to_string()),
            ("auth.verify_interval", humantime::format_duration(c.auth.verify_interval).to_string()),
            ("pool.mode", format!("{:?}", c.pool.mode).to_lowercase()),
            (
                "pool.override",
                c.pool
                    .overrides
                    .iter()
                    .map(|o| {
                        let who = |v: &Option<String>| v.as_deref().unwrap_or("*").to_owned();
                        format!("{}@{}: {:?}", who(&o.user), who(&o.database), o.mode).to_lowercase()
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("pool.max_size", c.pool.max_size.to_string()),
            ("pool.max_prepared_statements", c.pool.max_prepared_statements.to_string()),
            ("pool.min_idle", c.pool.min_idle.to_string()),
            ("pool.acquire_timeout", humantime::format_duration(c.pool.acquire_timeout).to_string()),
            ("pool.idle_timeout", humantime::format_duration(c.pool.idle_timeout).to_string()),
            ("pool.max_lifetime", humantime::format_duration(c.pool.max_lifetime).to_string()),
            ("pool.connect_timeout", humantime::format_duration(c.pool.connect_timeout).to_string()),
            ("client.max_connections", c.client.max_connections.to_string()),
            ("client.max_message_bytes", c.client.max_message_bytes.to_string()),
            ("client.max_output_bytes", c.client.max_output_bytes.to_string()),
            (
                "client.tls",
                (if c.client.tls_cert.is_some() {
                    if c.client.tls_required { "required" } else { "offered" }
                } else {
                    "off"
                })
                .into(),
            ),
            ("cache.max_bytes", c.cache.max_bytes.to_string()),
            ("cache.max_entry_bytes", c.cache.max_entry_bytes.to_string()),
            ("cache.single_flight_wait", humantime::format_duration(c.cache.single_flight_wait).to_string()),
            ("cache.unknown_writes", format!("{:?}", c.cache.unknown_writes)),
            ("cache.invalidate_on_writes", c.cache.invalidate_on_writes.to_string()),
            ("cache.invalidate_by_key", c.cache.invalidate_by_key.to_string()),
            ("cache.admission", if c.cache.adaptive_admission { "adaptive" } else { "always" }.to_owned()),
            ("cache.catalog_ttl", humantime::format_duration(c.cache.catalog_ttl).to_string()),
            (
                "replicas",
                c.replicas
                    .nodes
                    .iter()
                    .map(|n| format!("{} (weight {})", n.upstream.describe(), n.weight))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("replica.read_your_writes", format!("{:?}", c.replicas.read_your_writes).to_lowercase()),
            ("replica.max_lag_bytes", c.replicas.max_lag_bytes.to_string()),
            (
                "replica.max_lag_time",
                c.replicas.max_lag_time.map_or("off".into(), |t| humantime::format_duration(t).to_string()),
            ),
            ("replica.primary_weight", c.replicas.primary_weight.to_string()),
            ("replica.check_interval", humantime::format_duration(c.replicas.check_interval).to_string()),
            ("replica.check_timeout", humantime::format_duration(c.replicas.check_timeout).to_string()),
            ("console.database", c.console.database.clone()),
            ("console.users", c.console.users.join(",")),
            ("metrics.max_table_labels", c.max_table_labels.to_string()),
            ("peers.enabled", c.peers.enabled.to_string()),
            ("peers.channel", c.peers.channel.clone()),
            ("peers.instance", ctx.peers.instance().to_owned()),
            ("peers.heartbeat", humantime::format_duration(c.peers.heartbeat).to_string()),
            ("peers.dead_after", humantime::format_duration(c.peers.dead_after).to_string()),
            ("peers.coalesce", humantime::format_duration(c.peers.coalesce).to_string()),
            ("slow_statement", humantime::format_duration(c.slow_statement).to_string()),
            ("worker_threads", c.worker_threads.map_or_else(|| "one per CPU".to_owned(), |n| n.to_string())),
            ("shutdown.drain_timeout", humantime::format_duration(c.drain_timeout).to_string()),
        ],
    )
}

/// Per database: the invalidation link's state, since when it listens, the last message, and
/// the other instances heard from.
fn peers(ctx: &Context) -> ResultSet {
    let mut r = ResultSet::new(PEERS, "SHOW");
    let time = |t: Option<std::time::SystemTime>| t.map(|t| humantime::format_rfc3339_millis(t).to_string());
    for p in ctx.peers.status() {
        let mut instances: Vec<String> = p
            .seen
            .instances
            .iter()
            .map(|(id, heard)| format!("{id} ({:.1}s ago)", heard.elapsed().as_secs_f64()))
            .collect();
        instances.sort();
        r.rows.push(vec![
            Some(p.database),
            Some(ctx.peers.channel().to_owned()),
            Some(format!("{:?}", p.state).to_lowercase()),
            time(p.seen.listening_since),
            time(p.seen.last_message),
            Some(instances.join(", ")),
            Some(p.seen.sent.to_string()),
            Some(p.seen.received.to_string()),
            Some(p.seen.resyncs.to_string()),
            p.seen.last_error,
        ]);
    }
    if !ctx.peers.enabled() {
        r.rows.push(vec![None, Some(ctx.peers.channel().to_owned()), Some("off (peers.enabled = false)".into())]);
        r.rows.last_mut().expect("just pushed").resize(10, None);
    }
    r
}

fn invalidate_table(ctx: &Context, name: &str) -> Result<ResultSet, PgError> {
    let rel = crate::rules::load::parse_table(name)
        .map_err(|(_, m)| PgError::error(SqlState::SYNTAX_ERROR, format!("INVALIDATE TABLE: {m}")))?;
    match &rel.schema {
        Some(_) => ctx.generations.bump_relations(std::slice::from_ref(&rel)),
        None => ctx.generations.bump_name(&rel.name),
    }
    ctx.peers.publish_everywhere(std::slice::from_ref(&rel.name), false);
    ctx.stats.table_written(&rel.name);
    let n = ctx.store.remove_where(|e| e.invalidated() || e.tables.iter().any(|t| covers(&rel, t)));
    Ok(ResultSet::pairs("INVALIDATE", vec![("table", rel.to_string()), ("entries_removed", n.to_string())]))
}

/// Whether `wanted` (as the operator wrote it) names `read` (as an entry resolved it).
fn covers(wanted: &Relation, read: &Relation) -> bool {
    wanted.name == read.name && (wanted.schema.is_none() || read.schema.is_none() || wanted.schema == read.schema)
}

fn invalidate_rule(ctx: &Context, name: &str) -> Result<ResultSet, PgError> {
    let name = name.trim_matches('"');
    let n = ctx.store.remove_where(|e| e.rule.name == name);
    if n == 0 && ctx.rules.current().get(name).is_none() {
        return Err(PgError::error(SqlState::UNDEFINED_OBJECT, format!("no rule named {name:?}")));
    }
    Ok(ResultSet::pairs("INVALIDATE", vec![("rule", name.to_owned()), ("entries_removed", n.to_string())]))
}

fn reload(ctx: &Context) -> Result<ResultSet, PgError> {
    match ctx.reload() {
        Ok(restart) => {
            let mut pairs = vec![("rules", ctx.rules.current().rules.len().to_string())];
            pairs.push(("needs_restart", if restart.is_empty() { "none".into() } else { restart.join(", ") }));
            Ok(ResultSet::pairs("RELOAD", pairs))
        }
        Err(e) => Err(PgError::error(SqlState::CONFIG_FILE_ERROR, format!("reload failed: {e}"))),
    }
}
