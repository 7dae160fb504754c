//! Stale-while-revalidate: an entry past its TTL but within its rule's
//! `stale_while_revalidate` window is served, and refreshed once in the background on a
//! pooled connection of its own — started like the session's, with the session's key settings
//! (search_path, TimeZone, role, ...) applied with `set_config` — by replaying the exact
//! request. The answer is filled like any other ([`Fill`]): it records the generations as they
//! were before the refresh was sent, so a write that lands meanwhile still kills it, and a
//! result over the rule's `max_entry_bytes` is not stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::backend::Secret;
use crate::backend::connection::StartupParams;
use crate::backend::{PoolKey, Reset};
use crate::cache::{Entry, Key};
use crate::config::AuthMethod;
use crate::context::Context;
use crate::protocol::backend as be;
use crate::query::Relation;

use super::adopt::{ReadBack, Wanted, adopt};
use super::core::pipeline::Fill;
use super::core::settings::Settings;
use super::replay::{ReplayError, Request, encode};

/// Everything needed to recompute one entry away from its session.
#[derive(Debug)]
pub struct Refresh {
    pub key: Key,
    pub stale: Arc<Entry>,
    pub pool: PoolKey,
    pub startup: StartupParams,
    /// The session's settings to apply ([`Settings::replay`]), and the session's settings
    /// themselves, which the connection must read back exactly.
    pub settings: Vec<(String, String)>,
    pub session: Settings,
    pub request: Request,
    pub deps: Vec<Relation>,
}

/// What pgcache presents to open pooled connections for `key`: in trust mode the upstream
/// URL's password for its user; otherwise what the last verified login proved (a password,
/// or SCRAM keys).
pub fn pooled_secret(ctx: &Context, key: &PoolKey) -> Option<Secret> {
    if ctx.config().auth.method == AuthMethod::Trust {
        let up = &ctx.config().upstream;
        return if key.user == up.user { up.password.clone().map(Secret::Password) } else { None };
    }
    ctx.pools.credentials.last(key).and_then(|k| k.secret().cloned())
}

/// Starts the refresh; the entry's `refreshing` flag (already set) is cleared when it ends.
pub fn spawn(ctx: Arc<Context>, r: Refresh) {
    tokio::spawn(async move {
        if let Err(e) = run(&ctx, &r).await {
            tracing::debug!(error = %e, "background refresh failed; the entry will expire");
        }
        r.stale.refreshing.store(false, Ordering::Release);
    });
}

async fn run(ctx: &Context, r: &Refresh) -> Result<(), ReplayError> {
    let pool = ctx.pools.get(&r.pool);
    let secret = pooled_secret(ctx, &r.pool);
    let mut lease = pool.acquire(&r.startup, secret.as_ref(), false).await?;
    let result = async {
        let conn = lease.conn();
        // Whatever the connection had, it gets the session's settings, read back and checked:
        // the refreshed result is computed in the state its key names.
        let mut session = r.session.clone();
        let wanted = Wanted { read_back: ReadBack::Always, ..Wanted::session(ctx, r.settings.clone(), &mut session) };
        let adopted = adopt(conn, wanted).await;
        // Whatever it set stays defined on the connection (Postgres cannot undefine it).
        conn.defined.extend(session.customs().iter().cloned());
        adopted?;
        // Depends on every write to what it read (a refresh does not carry the read's keys).
        let deps = ctx.generations.snapshot(&r.pool.database, &r.deps, None);
        let request = encode(&r.request)?;
        let answer = conn.exchange(&request).await?;
        let stale = &r.stale;
        let limit = ctx.config().cache.max_entry_bytes;
        let fill =
            Fill::new(r.key.clone(), stale.rule.clone(), deps, stale.tables.clone(), stale.sql.clone(), None, limit);
        let mut fill = match session.verified() {
            Some(state) => fill.computed_in(state.clone()),
            None => fill,
        };
        fill.recipe = stale.recipe.clone();
        for f in &answer {
            match f.tag() {
                be::ROW_DESCRIPTION | be::NO_DATA => fill.row_description = Some(f.raw().clone()),
                be::DATA_ROW => fill.add_row(f.raw()),
                be::COMMAND_COMPLETE => fill.add_body(f.raw()),
                be::ERROR_RESPONSE | be::NOTICE_RESPONSE => return Err(ReplayError::NotClean),
                _ => {}
            }
        }
        // Like any fill: not stored if too large for the rule, or if a write raced it.
        fill.finish(&ctx.store, conn.verified.as_ref());
        Ok(())
    }
    .await;
    lease.release(if result.is_ok() { Reset::Discard } else { Reset::Close });
    result
}
