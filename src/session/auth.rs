//! Client authentication and the first backend lease, by `auth.method`:
//!
//! - `scram-sha-256` (the default): pgcache runs the SCRAM exchange with the client itself,
//!   against the role's verifier as Postgres stores it ([`crate::backend::verifiers`]), and
//!   keeps the keys the client's proof gives up to log into Postgres as that role with SCRAM
//!   (pass-through): no password is ever held or configured. Backends opened later for the
//!   role — pool growth, `min_idle` — use the same keys. A wrong proof gets Postgres's own
//!   28P01 after `auth.failure_delay`, as does a role without a usable verifier (after a mock
//!   exchange), and the role's verifier is read again for its next attempt.
//! - `cleartext`: pgcache asks the client for its password in cleartext (only over TLS or
//!   loopback, unless configured otherwise) and Postgres judges it; what Postgres accepted is
//!   remembered in memory for `auth.verify_interval`, so later clients are checked against it
//!   and can be given pooled connections. For upstreams that authenticate with LDAP, PAM or
//!   `password`.
//! - `trust`: every client is admitted (loopback listeners only); backend logins use the
//!   upstream URL's password for its user.
//!
//! Nothing is created for a client that has not logged in: its pool (and the pool's metric
//! series) is made only once the client has proved who it is — for `cleartext`, once Postgres
//! has accepted its password on a connection opened for that purpose, which then joins the
//! pool (connections opened for log-ins wait for a pool slot first, so a crowd of clients
//! logging in at once never opens more than the pools may hold). Failed log-ins are counted
//! (`pgcache_login_failures_total`).

use crate::backend::connection::StartupParams;
use crate::backend::credentials::Known;
use crate::backend::{ConnectError, Lease, PoolError, PoolKey, Secret};
use crate::config::{AuthMethod, Password};
use crate::context::Context;
use crate::frontend::scram;
use crate::frontend::{self, Client, SessionError};
use crate::metrics;

/// Authenticates the client and returns its backend connection.
pub async fn login(
    client: &mut Client,
    ctx: &Context,
    key: &PoolKey,
    startup: &StartupParams,
) -> Result<Lease, SessionError> {
    match ctx.config().auth.method {
        AuthMethod::Trust => {
            let upstream = &ctx.config().upstream;
            let password = (key.user == upstream.user).then(|| upstream.password.clone()).flatten();
            let secret = password.map(Secret::Password);
            Ok(ctx.pools.get(key).acquire(startup, secret.as_ref(), false).await?)
        }
        AuthMethod::ScramSha256 => {
            let keys = scram::authenticate(client, ctx, &key.user).await?;
            let secret = Secret::Keys(Box::new(keys));
            ctx.pools.credentials.remember(key, Some(&secret));
            match ctx.pools.get(key).acquire(startup, Some(&secret), false).await {
                // The password changed in Postgres after pgcache read the verifier: the client
                // proved the old one. Its next attempt is checked against the new verifier.
                Err(PoolError::Connect(e)) if e.is_scram_mismatch() || e.is_bad_password() => {
                    tracing::info!(user = %key.user, error = %e, "Postgres refused the keys of a SCRAM log-in");
                    ctx.verifiers.due(&key.user);
                    ctx.pools.credentials.forget(key);
                    Err(scram::refused(ctx, &key.user).await)
                }
                other => Ok(other?),
            }
        }
        AuthMethod::Cleartext => cleartext(client, ctx, key, startup).await,
    }
}

/// `cleartext`: Postgres judges the password the client gives.
async fn cleartext(
    client: &mut Client,
    ctx: &Context,
    key: &PoolKey,
    startup: &StartupParams,
) -> Result<Lease, SessionError> {
    let credentials = &ctx.pools.credentials;
    let allow = ctx.config().auth.allow_plaintext_over_network;
    match credentials.get(key) {
        Some(Known::NoPassword) => match ctx.pools.get(key).acquire(startup, None, false).await {
            Err(PoolError::Connect(ConnectError::PasswordRequired)) => credentials.forget(key),
            other => return Ok(other?),
        },
        Some(Known::Secret(Secret::Password(known))) => {
            let given = frontend::ask_password(client, allow).await?;
            if given == known {
                let secret = Secret::Password(known);
                return match ctx.pools.get(key).acquire(startup, Some(&secret), false).await {
                    Err(PoolError::Connect(e)) if e.is_bad_password() => {
                        credentials.forget(key);
                        ctx.stats.metrics.counter(metrics::LOGIN_FAILURES, &[]).increment(1);
                        Err(PoolError::Connect(e).into())
                    }
                    other => Ok(other?),
                };
            }
            return fresh(client, ctx, key, startup, Some(given)).await;
        }
        Some(Known::Secret(Secret::Keys(_))) | None => {}
    }
    fresh(client, ctx, key, startup, None).await
}

/// Logs in on a connection of its own (within the pools' bounds, [`Pools::log_in`]), asking
/// the client for a password if Postgres wants one; once Postgres has accepted, the login is
/// remembered and the connection is the session's.
///
/// [`Pools::log_in`]: crate::backend::Pools::log_in
async fn fresh(
    client: &mut Client,
    ctx: &Context,
    key: &PoolKey,
    startup: &StartupParams,
    mut password: Option<Password>,
) -> Result<Lease, SessionError> {
    let allow = ctx.config().auth.allow_plaintext_over_network;
    loop {
        let secret = password.clone().map(Secret::Password);
        match ctx.pools.log_in(key, startup, secret.as_ref()).await {
            Ok(lease) => {
                ctx.pools.credentials.remember(key, secret.as_ref());
                return Ok(lease);
            }
            Err(PoolError::Connect(ConnectError::PasswordRequired)) if password.is_none() => {
                password = Some(frontend::ask_password(client, allow).await?);
            }
            Err(e) => {
                if matches!(&e, PoolError::Connect(e) if e.is_bad_password()) {
                    ctx.stats.metrics.counter(metrics::LOGIN_FAILURES, &[]).increment(1);
                }
                return Err(e.into());
            }
        }
    }
}
