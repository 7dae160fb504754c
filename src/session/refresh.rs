//! Stale-while-revalidate: an entry past its TTL but within its rule's
//! `stale_while_revalidate` window is served, and refreshed once in the background on a
//! pooled connection of its own — started like the session's, with the session's key settings
//! (search_path, TimeZone, role, ...) applied with `set_config` — by replaying the exact
//! request. The answer is filled like any other ([`Fill`]): it records the generations as they
//! were before the refresh was sent, so a write that lands meanwhile still kills it, and a
//! result over the rule's `max_entry_bytes` is not stored.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::backend::connection::StartupParams;
use crate::backend::credentials::Known;
use crate::backend::{PoolKey, Reset};
use crate::cache::{Entry, Key};
use crate::config::{AuthMode, Password};
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

/// The password pgcache uses to open pooled connections for `key`.
pub fn pooled_password(ctx: &Context, key: &PoolKey) -> Option<Password> {
    if ctx.config().auth.mode == AuthMode::Trust {
        let up = &ctx.config().upstream;
        return if key.user == up.user { up.password.clone() } else { None };
    }
    match ctx.pools.credentials.last(key) {
        Some(Known::Password(p)) => Some(p),
        _ => None,
    }
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
    let password = pooled_password(ctx, &r.pool);
    let mut lease = pool.acquire(&r.startup, password.as_ref(), false).await?;
    let result = async {
        let conn = lease.conn();
        // Whatever the connection had, it gets the session's settings, read back and checked:
        // the refreshed result is computed in the state its key names.
        let mut session = r.session.clone();
        let wanted = Wanted { read_back: ReadBack::Always, ..Wanted::session(ctx, r.settings.clone(), &mut session) };
        adopt(conn, wanted).await?;
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
