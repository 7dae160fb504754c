//! The SCRAM-SHA-256 exchange with a client, as Postgres runs it (its `auth-scram.c`): the
//! client is offered SCRAM-SHA-256, and SCRAM-SHA-256-PLUS first when it came over TLS and
//! pgcache's certificate allows channel binding (`tls-server-end-point`, bound to pgcache's
//! certificate: pgcache terminates TLS). A wrong proof is answered exactly like a wrong
//! password from Postgres, after the configured delay; a role without a usable verifier goes
//! through the same exchange against a mock one and fails at its end, so roles cannot be
//! enumerated. The exchange's math is [`crate::protocol::scram`]'s.

use bytes::BytesMut;

use crate::context::Context;
use crate::metrics;
use crate::protocol::backend::{self as be, PgError};
use crate::protocol::frontend::{self as fe, PASSWORD as SASL_RESPONSE};
use crate::protocol::scram::{self, Binding, Keys, ScramError, ServerExchange, Verifier};
use crate::protocol::sqlstate::SqlState;

use super::{Client, SessionError, Violation};
use crate::protocol::startup::MAX_STARTUP_PACKET;

/// How a SCRAM exchange ended without an I/O error.
#[derive(Debug)]
pub enum Outcome {
    /// The client proved its password: the keys its proof gave up. AuthenticationSASLFinal has
    /// been sent; AuthenticationOk has not.
    Proved(Keys),
    /// A wrong password (or a role without a verifier, or a failed channel binding): to be
    /// answered with [`password_failed`] once the failure delay has passed.
    Failed(&'static str),
}

/// The error Postgres sends for a failed password log-in, word for word.
pub fn password_failed(user: &str) -> SessionError {
    SessionError::Refused(PgError::fatal(
        SqlState::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    ))
}

fn violation(e: ScramError) -> SessionError {
    let message = match e {
        ScramError::Malformed(what) => format!("malformed SCRAM message: {what}"),
        ScramError::Refused(what) => what.to_owned(),
    };
    SessionError::Refused(PgError::fatal(SqlState::PROTOCOL_VIOLATION, message))
}

/// Runs the exchange with `client` against `verifier` (`None`: a mock one, and the exchange
/// fails at its end). `end_point`: pgcache's certificate's channel-binding data, when the
/// client came over TLS.
pub async fn exchange(
    client: &mut Client,
    verifier: Option<Verifier>,
    mock: Verifier,
    end_point: Option<&[u8]>,
) -> Result<Outcome, SessionError> {
    let plus = end_point.is_some();
    let mut out = BytesMut::new();
    let offered: &[&str] =
        if plus { &[scram::SCRAM_SHA_256_PLUS, scram::SCRAM_SHA_256] } else { &[scram::SCRAM_SHA_256] };
    be::authentication_sasl(offered, &mut out);
    client.send(&out).await?;

    let frame = client.read_frame(MAX_STARTUP_PACKET).await?;
    if frame.tag() != SASL_RESPONSE {
        return Err(Violation::ExpectedPassword(frame.tag() as char).into());
    }
    let (mechanism, data) = fe::sasl_initial_response(frame.body())?;
    let first = scram::client_first(data).map_err(violation)?;
    match (mechanism, first.binding) {
        (b"SCRAM-SHA-256-PLUS", Binding::ServerEndPoint) if plus => {}
        (b"SCRAM-SHA-256", Binding::None | Binding::Unused) => {
            // 'y': the client could bind but believes the server cannot. It was offered
            // -PLUS, so someone in between removed it (RFC 5802 §6).
            if first.binding == Binding::Unused && plus {
                return Err(violation(ScramError::Refused(
                    "SCRAM channel binding negotiation error: the client supports it, and it was offered",
                )));
            }
        }
        (b"SCRAM-SHA-256", Binding::ServerEndPoint) => {
            return Err(violation(ScramError::Refused(
                "the client selected SCRAM-SHA-256 without channel binding, but its message requests binding",
            )));
        }
        (b"SCRAM-SHA-256-PLUS", _) => {
            return Err(violation(ScramError::Refused(
                "the client selected SCRAM-SHA-256-PLUS, but it was not offered or its message does not bind",
            )));
        }
        _ => return Err(violation(ScramError::Refused("client selected an invalid SASL authentication mechanism"))),
    }
    let known = verifier.is_some();
    let ex = ServerExchange::new(first, verifier.unwrap_or(mock), &scram::nonce());
    let mut out = BytesMut::new();
    be::authentication_sasl_continue(ex.server_first().as_bytes(), &mut out);
    client.send(&out).await?;

    let frame = client.read_frame(MAX_STARTUP_PACKET).await?;
    if frame.tag() != SASL_RESPONSE {
        return Err(Violation::ExpectedPassword(frame.tag() as char).into());
    }
    match ex.finish(frame.body(), end_point) {
        Ok(_) if !known => Ok(Outcome::Failed("no usable SCRAM verifier for the role")),
        Ok((keys, server_final)) => {
            let mut out = BytesMut::new();
            be::authentication_sasl_final(server_final.as_bytes(), &mut out);
            client.send(&out).await?;
            Ok(Outcome::Proved(keys))
        }
        Err(ScramError::Refused(why)) => Ok(Outcome::Failed(why)),
        Err(e) => Err(violation(e)),
    }
}

/// Authenticates `user` with SCRAM against its verifier: the keys the client proved, or
/// Postgres's own refusal after `auth.failure_delay` (counted in
/// `pgcache_login_failures_total`). Used by sessions and the admin console alike.
pub async fn authenticate(client: &mut Client, ctx: &Context, user: &str) -> Result<Keys, SessionError> {
    let verifier = match ctx.verifiers.get(user).await {
        Ok(v) => v,
        Err(e) => {
            // An outage is not a wrong password: the client is told to try again later.
            tracing::warn!(user, error = %e, "could not read the role's SCRAM verifier; the log-in fails");
            return Err(SessionError::Refused(PgError::fatal(
                SqlState::CONNECTION_FAILURE,
                "could not read the credentials of the role; try again later",
            )));
        }
    };
    let mock = Verifier::mock(user, &ctx.process_secret, ctx.verifiers.iterations());
    let end_point = if client.stream.is_tls() { ctx.tls_end_point.as_deref() } else { None };
    match exchange(client, verifier, mock, end_point).await? {
        Outcome::Proved(keys) => Ok(keys),
        Outcome::Failed(why) => {
            tracing::info!(peer = %client.peer, user, reason = why, "log-in failed");
            // A password changed in Postgres: its next attempt is checked against the new one.
            ctx.verifiers.due(user);
            Err(refused(ctx, user).await)
        }
    }
}

/// A refused log-in: counted, answered after `auth.failure_delay` (as Postgres's
/// `auth_delay`) with the error Postgres would send.
pub async fn refused(ctx: &Context, user: &str) -> SessionError {
    ctx.stats.metrics.counter(metrics::LOGIN_FAILURES, &[]).increment(1);
    tokio::time::sleep(ctx.config().auth.failure_delay).await;
    password_failed(user)
}
