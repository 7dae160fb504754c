//! Warm start without an L2 (`[cache] warm_file`): on shutdown the recipes of the most-hit
//! entries ([`crate::cache::warm`]), and the file's statements not yet re-run, are written to
//! the file; at start they are re-run, `cache.warm_rate` a second, hottest first.
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
//! A role's statements wait until pgcache can log in as it — after that role's first client
//! log-in since the start (pgcache holds no passwords; a SCRAM log-in leaves the keys a pooled
//! connection needs), or at once in `trust` mode — as a background refresh's connections do.
//! Statements that could not reach Postgres are tried again a second later.

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
use super::memo::Assessments;
use super::replay::{self, ReplayError};
use super::{effects, refresh};

/// What re-running one statement came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Filled,
    /// Already cached (or found in the L2), or being filled by a client.
    Present,
    /// No longer cacheable (no rule, a write raced it, too large, settings not reproducible).
    Skipped,
    Failed,
    /// Postgres could not be reached: tried again later.
    Unreachable,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Filled => "filled",
            Outcome::Present => "present",
            Outcome::Skipped => "skipped",
            Outcome::Failed | Outcome::Unreachable => "failed",
        }
    }
}

/// Reads the warm file and re-runs its statements in the background (until they are done or
/// the server shuts down). A file that cannot be read is reported and ignored.
pub fn start(ctx: &Arc<Context>) -> Option<tokio::task::JoinHandle<()>> {
    let config = ctx.config();
    let (path, unrun) = (config.cache.warm_file.clone()?, ctx.warm.as_ref()?);
    let recipes = match warm::load(&path, config.cache.warm_statements) {
        Ok((r, dropped)) => {
            if dropped > 0 {
                tracing::warn!(file = %path.display(), dropped, "warm file statements that do not say consistently what they run as were left out");
            }
            r
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "warm file ignored");
            return None;
        }
    };
    if recipes.is_empty() {
        return None;
    }
    tracing::info!(file = %path.display(), statements = recipes.len(), "warming the cache");
    unrun.set(recipes);
    Some(tokio::spawn(run(ctx.clone())))
}

/// Writes the hottest statements to the warm file (on shutdown), with those not yet re-run.
pub fn save(ctx: &Context) {
    let config = ctx.config();
    let (Some(path), Some(unrun)) = (&config.cache.warm_file, &ctx.warm) else { return };
    let hottest = warm::hottest(&ctx.store, unrun, config.cache.warm_statements);
    let n = hottest.len();
    match warm::save(path, hottest) {
        Ok(()) => tracing::info!(file = %path.display(), statements = n, "warm file written"),
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "cannot write the warm file"),
    }
}

/// Longest one statement's re-run may take (connecting, settings, the query).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

async fn run(ctx: Arc<Context>) {
    let Some(unrun) = ctx.warm.as_ref() else { return };
    let metrics = &ctx.stats.metrics;
    let waiting = metrics.gauge(WARM_PENDING, &[]);
    let rate = ctx.config().cache.warm_rate.max(1);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // In the file's order (hottest first), those whose role pgcache can log in as now.
        let (ready, blocked): (Vec<Recipe>, Vec<Recipe>) =
            unrun.get().into_iter().partition(|r| secret(&ctx, &pool_key(r)).is_some());
        waiting.set(blocked.len() as f64);
        for r in &ready {
            tick.tick().await;
            let outcome = match tokio::time::timeout(STATEMENT_TIMEOUT, warm_one(&ctx, r)).await {
                Ok(Ok(o)) => o,
                Ok(Err(ReplayError::Pool(e))) => {
                    tracing::debug!(error = %e, sql = %r.sql, "warm statement could not reach Postgres");
                    Outcome::Unreachable
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, sql = %r.sql, "warm statement failed");
                    Outcome::Failed
                }
                Err(_) => Outcome::Failed,
            };
            metrics.counter(WARM_STATEMENTS, &[("outcome", outcome.label())]).increment(1);
            if outcome != Outcome::Unreachable {
                unrun.remove(r);
            }
        }
        if unrun.is_empty() {
            tracing::info!("cache warmed");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn pool_key(r: &Recipe) -> PoolKey {
    PoolKey { database: r.database.clone(), user: r.user.clone() }
}

/// What pgcache logs in as `key`'s role with, if it can now — as a background refresh does
/// ([`refresh::pooled_secret`]): in `trust` mode the upstream URL's password for its user
/// and nothing for others, otherwise what the role's last log-in proved (`Some(None)`:
/// Postgres asked it for no password).
fn secret(ctx: &Context, key: &PoolKey) -> Option<Option<Secret>> {
    if ctx.config().auth.method == AuthMethod::Trust {
        return Some(refresh::pooled_secret(ctx, key));
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
    // A pooled connection, or, if it cannot show the session's state (another session
    // defined there a custom setting this one never did), a new one — as a session does.
    let mut fresh = false;
    loop {
        let mut lease = ctx.pools.get(&key).acquire(&startup, secret.as_ref(), fresh).await?;
        if !fresh && r.undefined.iter().any(|name| lease.conn().defined.contains(name)) {
            lease.release(Reset::Close);
            fresh = true;
            continue;
        }
        let result = fill(ctx, &mut lease, r, c, &key).await;
        // Whatever it set stays defined on the connection (Postgres cannot undefine it).
        lease.conn().defined.extend(r.customs.iter().cloned());
        match result {
            Err(ReplayError::Unsuitable) if !fresh => {
                lease.release(Reset::Close);
                fresh = true;
            }
            result => {
                lease.release(if result.is_ok() { Reset::Discard } else { Reset::Close });
                return result;
            }
        }
    }
}

async fn fill(
    ctx: &Arc<Context>,
    lease: &mut crate::backend::Lease,
    r: &Recipe,
    c: &crate::query::Classified,
    pool: &PoolKey,
) -> Result<Outcome, ReplayError> {
    let conn = lease.conn();
    let mut settings = Settings::replayed(&r.startup, &r.settings, &r.customs);
    let wanted = Wanted { read_back: ReadBack::Always, ..Wanted::session(ctx, r.settings.clone(), &mut settings) };
    adopt(conn, wanted).await?;
    // The session's undefined custom settings must read as undefined here too.
    if r.undefined.iter().any(|name| !settings.undefined().any(|u| u == name)) {
        return Err(ReplayError::Unsuitable);
    }
    let Some(state) = settings.verified().cloned() else { return Ok(Outcome::Skipped) };
    let flow = Flow { database: Arc::from(r.database.as_str()), settings, ..Default::default() };
    let bind = r.extended.as_ref().map(|e| BindParts {
        raw: Bytes::new(),
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
    let mut memo = Assessments::new(ctx.verdicts.book(pool));
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
    // Kept with the entry for the next shutdown's file, like a client's fill.
    fill.recipe = Some(Arc::new(r.clone()));
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
