//! The console's `SHOW` commands that read the live server (pools, clients, backends, the
//! cache, the rules, the configuration, the peers, the L2, the replicas): each answers in text
//! columns, which [`super::commands::Command::columns`] knows without running it.

use std::time::Duration;

use crate::config::PoolMode;
use crate::context::Context;
use crate::rules::Action;

use super::table::ResultSet;

pub(super) const STATS: &[&str] = &["stat", "total", "per_second"];
pub(super) const POOLS: &[&str] = &[
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
pub(super) const CLIENTS: &[&str] = &["peer", "user", "database", "connected_since", "backend_pid"];
pub(super) const SERVERS: &[&str] = &["database", "user", "pid", "state", "age_seconds"];
pub(super) const CACHE: &[&str] = &["rule", "entries", "bytes", "hits_on_entries", "oldest_age_seconds"];
pub(super) const RULES: &[&str] = &[
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
pub(super) const PEERS: &[&str] = &[
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
pub(super) const REPLICAS: &[&str] =
    &["replica", "state", "weight", "replay_lsn", "lag_bytes", "lag_ms", "reads", "active", "idle", "last_error"];

/// `SHOW L2`: the shared L2's server, connection, breaker and calls.
pub(super) fn l2(ctx: &Context) -> ResultSet {
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
pub(super) fn replicas(ctx: &Context) -> ResultSet {
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

pub(super) fn stats(ctx: &Context) -> ResultSet {
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

pub(super) fn pools(ctx: &Context) -> ResultSet {
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

pub(super) fn clients(ctx: &Context) -> ResultSet {
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

pub(super) fn servers(ctx: &Context) -> ResultSet {
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

pub(super) fn cache(ctx: &Context) -> ResultSet {
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

pub(super) fn rules(ctx: &Context) -> ResultSet {
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

pub(super) fn config(ctx: &Context) -> ResultSet {
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
pub(super) fn peers(ctx: &Context) -> ResultSet {
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
