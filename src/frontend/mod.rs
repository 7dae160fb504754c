//! The client side of every connection, before and around what it is for: opening
//! (SSLRequest and GSSENCRequest answered, TLS accepted, CancelRequest recognised and
//! forwarded, the StartupMessage read), the SCRAM ([`scram`]) and cleartext password
//! exchanges, the welcome a client
//! gets after authentication, and the one place where an error becomes what the client sees
//! ([`error`]). (The cancel keys handed out live in [`crate::context::clients`].)
//!
//! Both sessions and the admin console use it; it knows neither of them.

pub mod client;
pub mod error;
pub mod scram;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::config::Password;
use crate::context::Context;
use crate::net::{Peer, Stream};
use crate::protocol::backend::{self as be, PgError};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::Startup;

pub use client::{Client, Failure, Opening};
pub use error::{SessionError, Violation, guard};

/// Opens a new connection: TLS and cancel requests are dealt with here; a client that sent a
/// StartupMessage is returned with it. `None` when there is nothing more to do (a cancel
/// request, or a start-up that failed — reported to the client where possible).
pub async fn accept(ctx: &Arc<Context>, stream: Stream, peer: Peer) -> Option<(Client, Startup)> {
    let open = Client::new(stream, peer).open(ctx.tls.as_ref());
    let opened = tokio::select! {
        r = tokio::time::timeout(ctx.config().client.startup_timeout, open) => {
            r.unwrap_or(Err(Failure { client: None, error: SessionError::StartupTimeout }))
        }
        _ = ctx.shutdown.cancelled() => Err(Failure { client: None, error: SessionError::Shutdown }),
    };
    match opened {
        Ok((client, Opening::Session(startup))) => Some((client, startup)),
        Ok((_, Opening::Cancel { pid, secret })) => {
            cancel(ctx, pid, &secret).await;
            None
        }
        Err(Failure { client: Some(mut client), error }) => {
            report(&mut client, &error).await;
            None
        }
        Err(Failure { client: None, error }) => {
            if error.is_noteworthy() {
                tracing::warn!(%peer, %error, "connection failed during start-up");
            }
            None
        }
    }
}

/// Turns a client's CancelRequest into one for the backend it is using.
async fn cancel(ctx: &Context, pid: i32, secret: &[u8]) {
    match ctx.clients.lookup(pid, secret) {
        Some((key, endpoint)) => {
            if let Err(e) = endpoint.cancel(key).await {
                tracing::warn!(error = %e, "could not forward cancel request");
            }
        }
        None => tracing::debug!(pid, "cancel request for an unknown key ignored"),
    }
}

/// Tells the client why its connection ends (if it can still be told), and logs what is
/// worth a warning.
pub async fn report(client: &mut Client, e: &SessionError) {
    if let SessionError::Internal(_) = e {
        tracing::error!(peer = %client.peer, error = %e, "session ended by a bug in pgcache");
    } else if e.is_noteworthy() {
        tracing::warn!(peer = %client.peer, error = %e, "session failed");
    }
    let mut out = BytesMut::new();
    e.encode(&mut out);
    if !out.is_empty() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.send(&out)).await;
    }
}

/// Asks the client for its password in cleartext — only over TLS or loopback, unless
/// `allow_plaintext_over_network`.
pub async fn ask_password(client: &mut Client, allow_plaintext_over_network: bool) -> Result<Password, SessionError> {
    if !client.is_private() && !allow_plaintext_over_network {
        return Err(SessionError::Refused(
            PgError::fatal(
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                "pgcache: password authentication needs TLS or a loopback connection",
            )
            .with_hint("connect with sslmode=require, or set auth.allow_plaintext_over_network"),
        ));
    }
    let mut out = BytesMut::new();
    be::authentication_cleartext(&mut out);
    client.send(&out).await?;
    Ok(Password::new(client.read_password().await?))
}

/// Encodes the messages a client expects after authentication: AuthenticationOk, the
/// server's ParameterStatus values, pgcache's own cancel key, and ReadyForQuery.
pub fn welcome(params: &std::collections::BTreeMap<String, String>, pid: i32, secret: i32) -> Bytes {
    let mut out = BytesMut::with_capacity(512);
    be::authentication_ok(&mut out);
    for (name, value) in params {
        be::parameter_status_msg(name, value, &mut out);
    }
    be::backend_key_data(pid, secret, &mut out);
    be::ready_for_query(be::TransactionStatus::Idle, &mut out);
    out.freeze()
}
