//! Client authentication and the first backend lease.
//!
//! In `passthrough` mode (the default) pgcache demands exactly what the upstream demands, and
//! lets the upstream judge: a client's first login as (database, user) opens a fresh backend
//! connection without a password; if Postgres asks for one, pgcache asks the client for its
//! password in cleartext (only over TLS or loopback, unless configured otherwise) and logs in
//! with it (cleartext, md5 or SCRAM, whatever the upstream wants). What worked is remembered
//! in memory, so later clients are checked against it and can be given pooled connections.
//! A client whose password differs from the remembered one gets a fresh login of its own, so
//! a password changed in Postgres is picked up, and a wrong one is refused by Postgres itself
//! (SQLSTATE 28P01, forwarded verbatim). An idle pooled connection is never handed to a client
//! that has not been verified.
//!
//! In `trust` mode every client is admitted and backend logins use the upstream URL's password
//! for its user.

use crate::backend::connection::StartupParams;
use crate::backend::credentials::Known;
use crate::backend::{ConnectError, Lease, PoolError, PoolKey};
use crate::config::{AuthMode, Password};
use crate::context::Context;

use crate::frontend::{self, Client, SessionError};

/// Authenticates the client and returns its backend connection.
pub async fn login(
    client: &mut Client,
    ctx: &Context,
    key: &PoolKey,
    startup: &StartupParams,
) -> Result<Lease, SessionError> {
    let pool = ctx.pools.get(key);
    if ctx.config().auth.mode == AuthMode::Trust {
        let upstream = &ctx.config().upstream;
        let password = (key.user == upstream.user).then_some(upstream.password.as_ref()).flatten();
        return Ok(pool.acquire(startup, password, false).await?);
    }
    let credentials = &ctx.pools.credentials;
    match credentials.get(key) {
        Some(Known::NoPassword) => match pool.acquire(startup, None, false).await {
            Err(PoolError::Connect(ConnectError::PasswordRequired)) => credentials.forget(key),
            other => return Ok(other?),
        },
        Some(Known::Password(known)) => {
            let given = frontend::ask_password(client, ctx.config().auth.allow_plaintext_over_network).await?;
            if given == known {
                return match pool.acquire(startup, Some(&known), false).await {
                    Err(PoolError::Connect(e)) if e.is_bad_password() => {
                        credentials.forget(key);
                        Err(PoolError::Connect(e).into())
                    }
                    other => Ok(other?),
                };
            }
            return fresh_login(client, ctx, key, startup, Some(given)).await;
        }
        None => {}
    }
    fresh_login(client, ctx, key, startup, None).await
}

/// Logs in on a new backend connection, asking the client for a password if Postgres wants
/// one, and remembers what worked.
async fn fresh_login(
    client: &mut Client,
    ctx: &Context,
    key: &PoolKey,
    startup: &StartupParams,
    mut password: Option<Password>,
) -> Result<Lease, SessionError> {
    let pool = ctx.pools.get(key);
    loop {
        match pool.acquire(startup, password.as_ref(), true).await {
            Ok(lease) => {
                ctx.pools.credentials.remember(key, password.as_ref());
                return Ok(lease);
            }
            Err(PoolError::Connect(ConnectError::PasswordRequired)) if password.is_none() => {
                password = Some(frontend::ask_password(client, ctx.config().auth.allow_plaintext_over_network).await?);
            }
            Err(e) => return Err(e.into()),
        }
    }
}
