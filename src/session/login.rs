//! Before a session's first stretch: its pool key and backend startup parameters, shared
//! with every session that starts alike, and the log-in that leases its first backend.

use crate::backend::Lease;
use crate::backend::PoolKey;
use crate::backend::connection::StartupParams;
use crate::context::Context;
use crate::frontend::{Client, SessionError};
use crate::protocol::backend::{PgError, negotiate_protocol_version};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::Startup;

use bytes::BytesMut;
use std::sync::Arc;

use super::{auth, shared};

/// The startup parameters sessions hold, by their contents.
pub(super) static STARTUPS: shared::Shared<Vec<(String, String)>> = shared::Shared::new();

/// The pool keys sessions hold (one per database and user, however many sessions).
pub(super) static KEYS: shared::Shared<PoolKey> = shared::Shared::new();

/// Derives the pool key and the backend startup parameters from the client's StartupMessage.
/// The client's parameters pass unchanged and in order; a missing user or database is taken
/// from the upstream URL.
pub(super) fn backend_startup(
    ctx: &Context,
    startup: &Startup,
) -> Result<(PoolKey, StartupParams, Vec<String>), SessionError> {
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
pub(super) async fn log_in(
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
