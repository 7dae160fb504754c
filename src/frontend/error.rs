//! The one place where a failure becomes what the client sees: a Postgres ErrorResponse with
//! a SQLSTATE constant, the upstream's own ErrorResponse verbatim, or nothing at all when the
//! client is already gone.

use bytes::{Bytes, BytesMut};

use crate::backend::connection::ReadError;
use crate::backend::{ConnectError, PoolError};
use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::StartupError;
use crate::protocol::{FrameError, Truncated};

/// Why a session ended (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client's socket failed or closed: nobody to tell.
    #[error("client connection lost: {0}")]
    ClientIo(#[from] std::io::Error),
    #[error("client closed the connection")]
    ClientClosed,
    /// The TLS handshake with the client failed (nothing can be sent in the clear).
    #[error("TLS handshake with client failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("timeout expired during start-up")]
    StartupTimeout,
    #[error("invalid startup packet: {0}")]
    Startup(#[from] StartupError),
    #[error("invalid message from client: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(#[from] Violation),
    #[error("{0}")]
    Refused(PgError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("lost connection to upstream: {0}")]
    Upstream(#[from] ReadError),
    #[error("pgcache is shutting down")]
    Shutdown,
    /// A bug in pgcache (a panic) ended the session; the backend it held was closed, not
    /// returned to the pool. Other sessions are unaffected.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Runs a session (or console) future and turns a panic inside it into
/// [`SessionError::Internal`], so the client hears XX000 instead of a dropped connection and
/// the log says what happened. What the future held is dropped during unwinding: a leased
/// backend is closed, never reused.
pub async fn guard<F, T>(work: F) -> Result<T, SessionError>
where
    F: std::future::Future<Output = Result<T, SessionError>>,
{
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(work).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(panicked(panic)),
    }
}

/// The error a caught panic becomes ([`guard`]).
pub fn panicked(panic: Box<dyn std::any::Any + Send>) -> SessionError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into());
    SessionError::Internal(what)
}

/// A client message that breaks the protocol's rules (as opposed to one that cannot be
/// framed at all, which is a [`FrameError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("message body is truncated or malformed")]
    Truncated,
    #[error("SSLRequest on an encrypted connection")]
    SslRequestOverTls,
    /// Bytes sent after SSLRequest but before the handshake would be processed as if they had
    /// come over TLS (CVE-2021-23222).
    #[error("received unencrypted data after SSL request")]
    DataBeforeHandshake,
    #[error("expected password response, got message type {0:?}")]
    ExpectedPassword(char),
    #[error("password is not valid UTF-8")]
    PasswordNotUtf8,
}

impl From<Truncated> for SessionError {
    fn from(_: Truncated) -> Self {
        SessionError::Protocol(Violation::Truncated)
    }
}

/// What to send the client for an error.
pub enum Reply {
    /// An ErrorResponse from Postgres, forwarded as it came.
    Verbatim(Bytes),
    Error(PgError),
    /// The client is gone or went away on its own; say nothing.
    Nothing,
}

impl SessionError {
    pub fn reply(&self) -> Reply {
        use SqlState as S;
        let fatal = |code, msg: String| Reply::Error(PgError::fatal(code, msg));
        match self {
            SessionError::ClientIo(_) | SessionError::ClientClosed | SessionError::TlsHandshake(_) => Reply::Nothing,
            SessionError::StartupTimeout => fatal(S::PROTOCOL_VIOLATION, "timeout expired during start-up".into()),
            SessionError::Startup(StartupError::UnsupportedProtocol { .. }) => {
                fatal(S::FEATURE_NOT_SUPPORTED, self.to_string())
            }
            SessionError::Startup(e) => fatal(S::PROTOCOL_VIOLATION, e.to_string()),
            SessionError::Frame(e) => fatal(S::PROTOCOL_VIOLATION, e.to_string()),
            SessionError::Protocol(v) => fatal(S::PROTOCOL_VIOLATION, v.to_string()),
            SessionError::Refused(e) => Reply::Error(e.clone()),
            SessionError::Pool(PoolError::Timeout { .. } | PoolError::TooManyWaiting { .. }) => {
                fatal(S::TOO_MANY_CONNECTIONS, format!("pgcache: {self}"))
            }
            SessionError::Pool(PoolError::Unavailable { .. }) => {
                fatal(S::CANNOT_CONNECT_NOW, format!("pgcache: {self}"))
            }
            SessionError::Pool(PoolError::Closed) | SessionError::Shutdown => {
                fatal(S::ADMIN_SHUTDOWN, "terminating connection due to administrator command".into())
            }
            SessionError::Pool(PoolError::Connect(e)) => connect_reply(e),
            SessionError::Upstream(e) => {
                fatal(S::CONNECTION_FAILURE, format!("pgcache: lost connection to upstream: {e}"))
            }
            SessionError::Internal(_) => fatal(S::INTERNAL_ERROR, format!("pgcache: {self}; the session is closed")),
        }
    }

    /// Whether this ending deserves a warning in the log (client hang-ups do not).
    pub fn is_noteworthy(&self) -> bool {
        !matches!(self, SessionError::ClientIo(_) | SessionError::ClientClosed | SessionError::Shutdown)
    }

    pub fn encode(&self, out: &mut BytesMut) {
        match self.reply() {
            Reply::Verbatim(raw) => out.extend_from_slice(&raw),
            Reply::Error(e) => e.encode(out),
            Reply::Nothing => {}
        }
    }
}

fn connect_reply(e: &ConnectError) -> Reply {
    use SqlState as S;
    match e {
        ConnectError::Server { raw, .. } => Reply::Verbatim(raw.clone()),
        ConnectError::PasswordRequired => Reply::Error(PgError::fatal(
            S::INVALID_PASSWORD,
            "pgcache: the upstream asks for a password that pgcache does not have for this user",
        )),
        ConnectError::UnsupportedAuth(_) => {
            Reply::Error(PgError::fatal(S::INVALID_AUTHORIZATION_SPECIFICATION, format!("pgcache: {e}")))
        }
        ConnectError::Protocol(_) => Reply::Error(PgError::fatal(S::CONNECTION_FAILURE, format!("pgcache: {e}"))),
        ConnectError::Io { .. } | ConnectError::Timeout(_) | ConnectError::Tls(_) | ConnectError::TlsRefused(_) => {
            Reply::Error(PgError::fatal(S::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION, format!("pgcache: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_a_fatal_internal_error() {
        let e = guard::<_, ()>(async { panic!("index out of bounds") }).await.expect_err("the panic is caught");
        assert!(matches!(&e, SessionError::Internal(m) if m == "index out of bounds"), "{e:?}");
        assert!(e.is_noteworthy());
        let Reply::Error(pg) = e.reply() else { panic!("an ErrorResponse") };
        assert_eq!(pg.code, SqlState::INTERNAL_ERROR);
        assert_eq!(pg.severity, crate::protocol::backend::Severity::Fatal);
        assert!(pg.message.contains("index out of bounds"), "{}", pg.message);
    }

    #[tokio::test]
    async fn a_session_that_ends_normally_is_untouched() {
        assert!(guard(async { Ok(()) }).await.is_ok());
        assert!(matches!(
            guard::<_, ()>(async { Err(SessionError::ClientClosed) }).await,
            Err(SessionError::ClientClosed)
        ));
    }
}
