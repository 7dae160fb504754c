//! Warm start without an L2 (`[cache] warm_file`): on shutdown the recipes of the most-hit
//! entries ([`crate::cache::warm`]) are written to the file; at start they are re-run,
//! `cache.warm_rate` a second, hottest first.
//!
//! Each is re-run as its session would have run it, through the same decision a client's
//! statement takes ([`Asker::look`]): a pooled connection started with the session's startup
//! parameters is given the session's settings and read back ([`adopt`] with
//! [`ReadBack::Always`]), the statement is classified and assessed against the rules in force
//! now (a rule removed since is not warmed), and the key is built from the settings read on
//! that very connection — so a warmed entry is stored under the state it was computed in,
//! whatever the file says. The fill takes its generation snapshot before its query is sent,
//! like any other: a write meanwhile keeps it out.
//!
//! A role's statements wait until pgcache can log in as it: at once for the upstream URL's
//! user (and in `trust` mode), otherwise after that role's first client log-in since the
//! start (pgcache holds no passwords; SCRAM log-ins leave the keys a pooled connection needs).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::connection::StartupParams;
use crate::backend::{PoolKey, Reset, Secret};
use crate::cache::Keyed;
use crate::cache::flight::Turn;
use crate::cache::warm::{self, Recipe};
use crate::config::AuthMethod;
use crate::context::Context;
use crate::metrics::{WARM_PENDING, WARM_STATEMENTS};
use crate::protocol::backend as be;
use crate::protocol::frontend::BindParts;
use crate::query::Kind;

use super::adopt::{ReadBack, Wanted, adopt};
use super::core::flow::Flow;
use super::core::pipeline::Fill;
use super::core::settings::Settings;
use super::decide::{Asker, Looked, Request};
use super::effects;
use super::memo::Assessments;
use super::replay::{self, ReplayError};

/// What re-running one statement came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Filled,
    /// Already cached (or found in the L2), or being filled by a client.
    Present,
    /// No longer cacheable (no rule, a write raced it, too large, settings not reproducible).
    Skipped,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Filled => "filled",
            Outcome::Present => "present",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
        }
    }
}

/// Reads the warm file and re-runs its statements in the background (until they are done or
/// the server shuts down). A file that cannot be read is reported and ignored.
pub fn start(ctx: &Arc<Context>) -> Option<tokio::task::JoinHandle<()>> {
    let path = ctx.config().cache.warm_file.clone()?;
    let recipes = match warm::load(&path) {
        Ok(r) if r.is_empty() => return None,
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "warm file ignored");
            return None;
        }
    };
    tracing::info!(file = %path.display(), statements = recipes.len(), "warming the cache");
    Some(tokio::spawn(run(ctx.clone(), recipes)))
}

/// Writes the hottest statements to the warm file (on shutdown).
pub fn save(ctx: &Context) {
    let config = ctx.config();
    let (Some(path), Some(recipes)) = (&config.cache.warm_file, &ctx.recipes) else { return };
    let hottest = recipes.hottest(&ctx.store, config.cache.warm_statements);
    let n = hottest.len();
    match warm::save(path, hottest) {
        Ok(()) => tracing::info!(file = %path.display(), statements = n, "warm file written"),
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot write the warm file"),
    }
}

async fn run(ctx: Arc<Context>, mut pending: Vec<Recipe>) {
    let metrics = &ctx.stats.metrics;
    let gauge = metrics.gauge(WARM_PENDING, &[]);
    let rate = ctx.config().cache.warm_rate.max(1);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // In the file's order (hottest first), those whose role pgcache can log in as now.
        let (ready, waiting): (Vec<Recipe>, Vec<Recipe>) =
            std::mem::take(&mut pending).into_iter().partition(|r| secret(&ctx, &pool_key(r)).is_some());
        pending = waiting;
        gauge.set((pending.len() + ready.len()) as f64);
        for (i, r) in ready.iter().enumerate() {
            tick.tick().await;
            let outcome = match warm_one(&ctx, r).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::debug!(error = %e, sql = %r.sql, "warm statement failed");
                    Outcome::Failed
                }
            };
            metrics.counter(WARM_STATEMENTS, &[("outcome", outcome.label())]).increment(1);
            gauge.set((pending.len() + ready.len() - i - 1) as f64);
        }
        if pending.is_empty() {
            tracing::info!("cache warmed");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn pool_key(r: &Recipe) -> PoolKey {
    PoolKey { database: r.database.clone(), user: r.user.clone() }
}

/// What pgcache logs in as `key`'s role with, if it can now: the upstream URL's password for
/// its user (`Some(None)`: it has none), in `trust` mode nothing, otherwise what the role's
/// last log-in proved (`Some(None)`: Postgres asked it for no password).
fn secret(ctx: &Context, key: &PoolKey) -> Option<Option<Secret>> {
    let config = ctx.config();
    if key.user == config.upstream.user {
        return Some(config.upstream.password.clone().map(Secret::Password));
    }
    if config.auth.method == AuthMethod::Trust {
        return Some(None);
    }
    ctx.pools.credentials.last(key).map(|known| known.secret().cloned())
}

/// Re-runs one statement on a pooled connection of its own and fills the cache with it.
async fn warm_one(ctx: &Arc<Context>, r: &Recipe) -> Result<Outcome, ReplayError> {
    let classified = ctx.classifier.classify_off_worker(&r.sql).await;
    let [c] = classified.as_slice() else { return Ok(Outcome::Skipped) };
    if c.kind != Kind::Select {
        return Ok(Outcome::Skipped);
    }
    // The peers' invalidations of the database are heard before anything is filled.
    if !ctx.peers.coherent(&r.database).await {
        return Ok(Outcome::Skipped);
    }
    let key = pool_key(r);
    let Some(secret) = secret(ctx, &key) else { return Ok(Outcome::Skipped) };
    let startup: StartupParams = Arc::new(r.startup.clone());
    let mut lease = ctx.pools.get(&key).acquire(&startup, secret.as_ref(), false).await?;
    let result = fill(ctx, &mut lease, r, c, &key).await;
    lease.release(if result.is_ok() { Reset::Discard } else { Reset::Close });
    result
}

async fn fill(
    ctx: &Arc<Context>,
    lease: &mut crate::backend::Lease,
    r: &Recipe,
    c: &crate::query::Classified,
    pool: &PoolKey,
) -> Result<Outcome, ReplayError> {
    let conn = lease.conn();
    let mut settings = Settings::replayed(&r.startup, &r.settings);
    let wanted = Wanted { read_back: ReadBack::Always, ..Wanted::session(ctx, r.settings.clone(), &mut settings) };
    adopt(conn, wanted).await?;
    let Some(state) = settings.verified().cloned() else { return Ok(Outcome::Skipped) };
    let flow = Flow { database: Arc::from(r.database.as_str()), settings, ..Default::default() };
    let bind = r.extended.as_ref().map(|e| BindParts {
        portal: Bytes::new(),
        statement: Bytes::new(),
        param_formats: e.param_formats.clone(),
        params: e.params.clone(),
        result_formats: e.result_formats.clone(),
    });
    let req = match (&r.extended, &bind) {
        (Some(e), Some(bind)) => Request::Extended { param_types: &e.param_types, bind },
        _ => Request::Simple,
    };
    let mut memo = Assessments::default();
    let mut asker = Asker { ctx, key: pool, flow: &flow, memo: &mut memo, offline: false };
    let (key, a, l2) = match asker.look(&r.sql, c, &req, false).await {
        Looked::Missing { key, a, l2 } => (key, a, l2),
        Looked::Found { .. } => return Ok(Outcome::Present),
        Looked::Forward(_) | Looked::SettingsUnknown => return Ok(Outcome::Skipped),
    };
    let flight = match ctx.flights.join(&key, Duration::ZERO).await {
        Turn::Lead(f) => f,
        Turn::Waited { .. } => return Ok(Outcome::Present),
    };
    if let Some(recipes) = &ctx.recipes {
        // Kept for the next shutdown's file, like a client's fill.
        recipes.record(&key, || r.clone());
    }
    let keys = a
        .keyed
        .as_ref()
        .and_then(|k| effects::pinned_keys(ctx, c, &k.column, k.kind, req.params()).map(|values| (k, values)));
    let keyed = keys.as_ref().map(|(k, values)| Keyed { relation: &k.relation, column: &k.column, values });
    let deps = ctx.generations.snapshot(&r.database, &a.deps, keyed);
    let limit = ctx.config().cache.max_entry_bytes;
    let mut fill =
        Fill::new(key, a.rule.clone(), deps, a.resolved.clone(), Arc::from(r.sql.as_str()), Some(flight), limit)
            .computed_in(state);
    fill.l2 = l2;
    let request = match &r.extended {
        None => replay::Request::Simple { sql: r.sql.clone() },
        Some(e) => replay::Request::Extended {
            sql: r.sql.clone(),
            param_types: e.param_types.clone(),
            param_formats: e.param_formats.clone(),
            params: e.params.clone(),
            result_formats: e.result_formats.clone(),
        },
    };
    let answer = conn.exchange(&replay::encode(&request)?).await?;
    for f in &answer {
        match f.tag() {
            be::ROW_DESCRIPTION | be::NO_DATA => fill.row_description = Some(f.raw().clone()),
            be::DATA_ROW => fill.add_row(f.raw()),
            be::COMMAND_COMPLETE => fill.add_body(f.raw()),
            be::ERROR_RESPONSE | be::NOTICE_RESPONSE => return Err(ReplayError::NotClean),
            _ => {}
        }
    }
    match fill.finish(&ctx.store, conn.verified.as_ref()) {
        Some((entry, l2_key)) => {
            if let (Some(l2_key), Some(l2)) = (l2_key, &ctx.l2) {
                l2.store(l2_key, effects::l2_value(&entry), entry.rule.l2_ttl());
            }
            Ok(Outcome::Filled)
        }
        None => Ok(Outcome::Skipped),
    }
}
