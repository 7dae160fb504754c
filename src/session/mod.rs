//! One client session, from its StartupMessage to its close.
//!
//! ```text
//! StartupMessage ──(login; backend leased)──▶ Relaying ──Terminate/EOF──▶ Closed
//!                                               │ shutdown: at rest ──▶ 57P01, Closed
//!                                               │ error ──▶ ErrorResponse, Closed
//!                                               │ backend lost while idle ──▶ Detached
//!                      Relaying ◀──(new backend, settings replayed)── Detached
//!                      Relaying ──transaction over (transaction pooling)──▶ Detached
//!                      Relaying ──transaction over (session pooling, replicas)──▶ Detached,
//!                                                        the backend kept as the session's home
//!   Detached, nothing read from the client ──▶ Resting (a compact struct; no future of its own)
//!                      Detached ◀──the client speaks── Resting
//! ```
//!
//! Its life from login to end, in stretches of work and rests between them, is [`life`]'s.
//! The protocol state is the [`core`]'s (pure, unit-tested); the [`relay`] does the I/O and
//! feeds it ([`drive`]) with the facts only the shared state has: write effects
//! ([`effects`]) and cache decisions ([`decide`]). When the session ends its backend goes back
//! to the pool only if it is at rest; a backend left mid-query is cancelled and closed. It uses
//! the front end ([`crate::frontend`]) and what every connection shares
//! ([`crate::context`]); it knows nothing of the admin console.

mod adopt;
mod answer;
pub mod auth;
pub mod core;
mod decide;
mod detached;
mod drive;
pub mod effects;
mod life;
mod memo;
pub mod refresh;
pub mod relay;
mod replay;
pub mod shared;
pub mod warm;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::backend::connection::{SessionState, StartupParams};
use crate::backend::{Lease, PoolKey, Reset};
use crate::context::Context;
use crate::protocol::backend::{PgError, negotiate_protocol_version};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::Startup;

pub use self::life::serve;

use self::core::Core;
use crate::frontend::{Client, SessionError};

/// The startup parameters sessions hold, by their contents.
static STARTUPS: shared::Shared<Vec<(String, String)>> = shared::Shared::new();

/// The pool keys sessions hold (one per database and user, however many sessions).
static KEYS: shared::Shared<PoolKey> = shared::Shared::new();

/// Derives the pool key and the backend startup parameters from the client's StartupMessage.
/// The client's parameters pass unchanged and in order; a missing user or database is taken
/// from the upstream URL.
fn backend_startup(ctx: &Context, startup: &Startup) -> Result<(PoolKey, StartupParams, Vec<String>), SessionError> {
    if startup.param("replication").is_some_and(|v| v != "false" && v != "off" && v != "0") {
        return Err(SessionError::Refused(PgError::fatal(
            SqlState::FEATURE_NOT_SUPPORTED,
            "pgcache does not proxy replication connections; connect to Postgres directly",
        )));
    }
    let upstream = &ctx.config().upstream;
    let mut params: Vec<(String, String)> = Vec::with_capacity(startup.params.len() + 2);
    let mut unsupported = Vec::new();
    for (k, v) in &startup.params {
        if k.starts_with("_pq_.") {
            unsupported.push(k.clone());
        } else {
            params.push((k.clone(), v.clone()));
        }
    }
    let user = startup.param("user").filter(|u| !u.is_empty()).unwrap_or(&upstream.user).to_owned();
    let database = startup.param("database").filter(|d| !d.is_empty()).unwrap_or(&upstream.dbname).to_owned();
    if startup.param("user").is_none_or(str::is_empty) {
        params.retain(|(k, _)| k != "user");
        params.insert(0, ("user".into(), user.clone()));
    }
    if startup.param("database").is_none_or(str::is_empty) {
        params.retain(|(k, _)| k != "database");
        params.insert(1, ("database".into(), database.clone()));
    }
    // Shared: most clients of a pool start alike, and each keeps its parameters for its life.
    Ok((PoolKey { database, user }, STARTUPS.get(params), unsupported))
}

/// Negotiates the protocol version if the client asked for more, waits while pgcache is
/// paused, and logs the client in (leasing a backend), within `client.startup_timeout`.
async fn log_in(
    ctx: &Arc<Context>,
    client: &mut Client,
    negotiate: bool,
    unsupported: Vec<String>,
    key: &PoolKey,
    params: &StartupParams,
) -> Result<Lease, SessionError> {
    if negotiate {
        let mut out = BytesMut::new();
        negotiate_protocol_version(unsupported, &mut out);
        client.send(&out).await?;
    }
    ctx.wait_while_paused().await;
    let login = tokio::time::timeout(ctx.config().client.startup_timeout, auth::login(client, ctx, key, params));
    tokio::select! {
        r = login => r.unwrap_or(Err(SessionError::StartupTimeout)),
        _ = ctx.shutdown.cancelled() => Err(SessionError::Shutdown),
    }
}

/// ParameterStatus messages for values a backend reports differently from what the client
/// was last told (`reported`, brought up to date). `reported` shares the map of the backend
/// it was last brought up to date with (an idle client holds a pointer, not a copy); a name
/// only an earlier backend reported is then forgotten, and told again if it comes back.
fn changed_parameters(reported: &mut Arc<BTreeMap<String, String>>, new: &Arc<BTreeMap<String, String>>) -> BytesMut {
    let mut out = BytesMut::new();
    if Arc::ptr_eq(reported, new) {
        return out;
    }
    for (name, value) in new.iter() {
        if reported.get(name) != Some(value) {
            crate::protocol::backend::parameter_status_msg(name, value, &mut out);
        }
    }
    *reported = new.clone();
    out
}

/// Transaction pooling: gives the backend back at the end of a client's transaction (see
/// [`leave`]).
fn hand_back(ctx: &Context, key: &PoolKey, mut lease: Lease, core: &mut Core) {
    leave(ctx, &mut lease, key, core);
    ctx.stats.metrics.handoff();
    lease.release(Reset::None);
}

/// Writes down on the backend what the client left on it at the end of a transaction — its
/// settings (whoever takes it next compares them with its own) and the statements pgcache
/// prepared there.
fn leave(ctx: &Context, lease: &mut Lease, key: &PoolKey, core: &mut Core) {
    let pool = lease.pool().clone();
    let settings = &core.flow.settings;
    let conn = lease.conn();
    // What the session leaves on the backend, as far as it is known. A session that changed
    // nothing since it was given the backend leaves it as it was given; one whose settings
    // were read back leaves exactly those; anything else (a probe that failed, custom
    // settings set under names pgcache cannot know) leaves it unknown, to be reset before
    // anyone else uses it.
    conn.state = match settings.replay(&key.user) {
        _ if settings.unknowable() => SessionState::Unknown,
        Some(replay) => SessionState::Known(replay),
        None if !core.flow.settings_touched && !settings.known() => std::mem::take(&mut conn.state),
        None => SessionState::Unknown,
    };
    conn.verified = settings.verified().cloned();
    conn.defined.extend(settings.customs().iter().cloned());
    conn.prepared = core.server.take();
    if let Some(prepared) = &conn.prepared {
        pool.accept(prepared.names(), ctx.catalog.epoch());
    }
}

/// Returns the backend to the pool if it is at rest; otherwise cancels what it runs and
/// closes it.
fn give_back(mut lease: Lease, core: &Core) {
    lease.conn().defined.extend(core.flow.settings.customs().iter().cloned());
    let track = &core.tracker;
    if core.at_rest() {
        lease.release(if track.used { Reset::Discard } else { Reset::None });
        return;
    }
    if !track.between_requests() {
        let endpoint = lease.pool().endpoint().clone();
        let key = lease.conn_ref().key;
        tokio::spawn(async move {
            let _ = endpoint.cancel(key).await;
        });
    }
    lease.release(Reset::Close);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> Arc<BTreeMap<String, String>> {
        Arc::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn a_client_is_told_only_what_its_new_backend_reports_differently() {
        let first = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        let mut reported = first.clone();
        assert!(changed_parameters(&mut reported, &first).is_empty(), "the same backend");
        let equal = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        assert!(changed_parameters(&mut reported, &equal).is_empty(), "another backend, same values");
        let other = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "Europe/Paris")]);
        let mut told = changed_parameters(&mut reported, &other);
        assert!(Arc::ptr_eq(&reported, &other), "shares the backend's map");
        let f = crate::protocol::frame::take_frame(&mut told, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), b'S');
        assert_eq!(
            crate::protocol::backend::parameter_status(f.body()).unwrap(),
            ("TimeZone".into(), "Europe/Paris".into())
        );
        assert!(told.is_empty(), "one message: the value that changed");
    }
}
