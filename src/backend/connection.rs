//! One raw protocol connection to Postgres: transport, optional TLS (SSLRequest first), the
//! StartupMessage with the client's own parameters, authentication (trust, cleartext, md5,
//! SCRAM-SHA-256 through postgres-protocol's SCRAM client), and the ParameterStatus values and
//! cancel key the server reports (Postgres docs, "Start-up").
//!
//! After start-up the session owns the stream and forwards frames; this type only keeps what
//! the pool needs: the parameters it was started with, its current ParameterStatus values,
//! its cancel key and its age.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::Stream;
use crate::protocol::backend::{self as be, ErrorFields, TransactionStatus};
use crate::protocol::frame::{self, Frame, FrameError};
use crate::protocol::scram;

use super::{Endpoint, Secret};

/// Frames from Postgres are trusted to be well formed but still bounded by the protocol's own
/// i32 length.
pub const BACKEND_MAX_FRAME: usize = i32::MAX as usize + 1;

/// The key Postgres gave a backend for CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// The startup parameters a connection was opened with (user and database included), in the
/// order the client sent them. Two connections are interchangeable only when these are equal:
/// Postgres resets to them on `RESET`/`DISCARD ALL`.
pub type StartupParams = Arc<Vec<(String, String)>>;

/// Why a backend connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to upstream {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("connecting to upstream {0} timed out")]
    Timeout(String),
    #[error("TLS with upstream failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("upstream {0} refused TLS but sslmode requires it")]
    TlsRefused(String),
    #[error("upstream asked for a password")]
    PasswordRequired,
    /// Postgres refused the login; `raw` is its ErrorResponse, forwarded to the client as is.
    #[error("upstream refused the connection: {fields}")]
    Server { raw: Bytes, fields: ErrorFields },
    #[error("upstream asked for an unsupported authentication method: {0}")]
    UnsupportedAuth(String),
    #[error("protocol error from upstream during start-up: {0}")]
    Protocol(#[from] StartupViolation),
}

/// What went wrong in a start-up exchange that Postgres itself would never cause.
#[derive(Debug, thiserror::Error)]
pub enum StartupViolation {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("malformed message: {0}")]
    Malformed(#[source] std::io::Error),
    #[error("message type {0:?} is not expected during authentication")]
    DuringAuthentication(char),
    #[error("message type {0:?} is not expected after authentication")]
    AfterAuthentication(char),
    #[error("SASL {0} before SASL start")]
    SaslOutOfOrder(&'static str),
    #[error("SCRAM exchange failed: {0}")]
    Scram(#[source] std::io::Error),
    #[error("SSLRequest answered with {0:#x}")]
    SslAnswer(u8),
}

impl ConnectError {
    /// Whether Postgres is unreachable or refusing connections (not a login it judged): the
    /// pool's breaker opens for `pool.retry_delay`. "Too many connections" and "starting up"
    /// are refusals too.
    pub fn is_refusal(&self) -> bool {
        match self {
            ConnectError::Server { fields, .. } => matches!(fields.code.as_str(), "53300" | "57P03"),
            ConnectError::PasswordRequired | ConnectError::UnsupportedAuth(_) => false,
            _ => !self.is_scram_mismatch(),
        }
    }

    /// Whether the SCRAM exchange failed on this login's credentials (keys proved against a
    /// verifier Postgres no longer holds: the password changed), not on Postgres's health.
    pub fn is_scram_mismatch(&self) -> bool {
        matches!(self, ConnectError::Protocol(StartupViolation::Scram(_)))
    }

    /// Whether Postgres rejected the password (so a remembered one must be forgotten).
    pub fn is_bad_password(&self) -> bool {
        matches!(self, ConnectError::Server { fields, .. } if fields.code == "28P01")
    }
}

/// A SCRAM exchange with the server: with the password (postgres-protocol's client), or with
/// the keys a client proved (pass-through, [`scram::KeysClient`]).
enum Scram {
    Password(sasl::ScramSha256),
    Keys(scram::KeysClient),
}

/// An authenticated backend connection at ReadyForQuery.
#[derive(Debug)]
pub struct Connection {
    pub stream: Stream,
    /// Bytes read from the server but not yet consumed.
    pub rbuf: BytesMut,
    pub startup: StartupParams,
    /// ParameterStatus values as the server last reported them. Shared with the sessions that
    /// last told their clients these values (copied only when the server reports a change).
    pub params: Arc<BTreeMap<String, String>>,
    pub key: BackendKey,
    pub status: TransactionStatus,
    pub created: Instant,
    /// The session state the last client left on it, as far as pgcache knows it.
    pub state: SessionState,
    /// The key part of the settings a probe read *on this connection* (with the role), while
    /// nothing may have changed them since: what a cache fill on it may be keyed with.
    pub verified: Option<bytes::Bytes>,
    /// Custom settings (`app.tenant`) sessions may have defined on it. Postgres cannot
    /// undefine one (`RESET` and `DISCARD ALL` make it ''), so a session to which one of these
    /// is undefined is given another connection.
    pub defined: std::collections::BTreeSet<String>,
    /// Transaction pooling: the statements pgcache prepared on it.
    pub prepared: Option<super::Prepared>,
}

/// What pgcache knows of a connection's session state beyond its startup packet. A session
/// given the connection gets exactly its own state: nothing to do when this equals it,
/// otherwise the connection is reset and the session's settings applied (`session::adopt`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SessionState {
    /// As its startup packet made it, plus these settings applied with `set_config` (none:
    /// as it started, or as `DISCARD ALL` left it).
    Known(Vec<(String, String)>),
    /// A client may have changed something pgcache could not read back (custom settings set
    /// by a function, a settings probe that failed): reset before anyone else uses it.
    #[default]
    Unknown,
}

impl SessionState {
    /// As the startup packet made it.
    pub fn startup() -> SessionState {
        SessionState::Known(Vec::new())
    }
}

impl Connection {
    /// Opens and authenticates a connection. `secret` is used only if the server asks.
    pub async fn connect(
        endpoint: &Endpoint,
        startup: StartupParams,
        secret: Option<&Secret>,
    ) -> Result<Connection, ConnectError> {
        let addr = endpoint.describe();
        match tokio::time::timeout(endpoint.connect_timeout, Self::connect_inner(endpoint, startup, secret)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(addr)),
        }
    }

    async fn connect_inner(
        endpoint: &Endpoint,
        startup: StartupParams,
        secret: Option<&Secret>,
    ) -> Result<Connection, ConnectError> {
        let addr = endpoint.describe();
        let io_err = |source| ConnectError::Io { addr: addr.clone(), source };
        let stream = endpoint.connect().await?;
        let mut conn = Connection {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            startup,
            params: Arc::default(),
            key: BackendKey { pid: 0, secret: 0 },
            status: TransactionStatus::Idle,
            created: Instant::now(),
            state: SessionState::startup(),
            verified: None,
            defined: Default::default(),
            prepared: None,
        };
        let mut out = BytesMut::new();
        // The parameters came NUL-terminated from the client, so they hold no NUL.
        frontend::startup_message(conn.startup.iter().map(|(k, v)| (k.as_str(), v.as_str())), &mut out)
            .map_err(StartupViolation::Malformed)?;
        conn.stream.write_all(&out).await.map_err(io_err)?;
        conn.authenticate(secret).await?;
        conn.finish_startup().await?;
        Ok(conn)
    }

    fn user(&self) -> &str {
        self.startup.iter().find(|(k, _)| k == "user").map_or("", |(_, v)| v.as_str())
    }

    async fn authenticate(&mut self, secret: Option<&Secret>) -> Result<(), ConnectError> {
        let mut scram: Option<Scram> = None;
        loop {
            let (tag, msg) = self.read_startup_message().await?;
            let mut out = BytesMut::new();
            // A password is needed; SCRAM keys log in with SCRAM only.
            let password = || match secret {
                Some(Secret::Password(p)) => Ok(p),
                Some(Secret::Keys(_)) => Err(ConnectError::UnsupportedAuth(
                    "the server asks for a password, and only SCRAM keys are known for this role \
                     (SCRAM pass-through needs scram-sha-256 in pg_hba.conf)"
                        .into(),
                )),
                None => Err(ConnectError::PasswordRequired),
            };
            let malformed = |e| ConnectError::Protocol(StartupViolation::Malformed(e));
            let scram_failed = |e| ConnectError::Protocol(StartupViolation::Scram(e));
            let keys_failed = |e: scram::ScramError| scram_failed(std::io::Error::other(e.to_string()));
            match msg {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.expose().as_bytes(), &mut out).map_err(malformed)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(self.user().as_bytes(), password()?.expose().as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out).map_err(malformed)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = fallible_next(&mut mechanisms)? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ConnectError::UnsupportedAuth("SASL without SCRAM-SHA-256".into()));
                    }
                    // Channel binding is not offered ('n'): the TLS session pgcache holds with
                    // Postgres is not the client's, so binding could not be end to end anyway.
                    let s = match secret {
                        Some(Secret::Keys(keys)) => {
                            Scram::Keys(scram::KeysClient::new((**keys).clone(), &scram::nonce()))
                        }
                        _ => Scram::Password(sasl::ScramSha256::new(
                            password()?.expose().as_bytes(),
                            sasl::ChannelBinding::unsupported(),
                        )),
                    };
                    let first = match &s {
                        Scram::Password(p) => p.message().to_vec(),
                        Scram::Keys(k) => k.first().into_bytes(),
                    };
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, &first, &mut out).map_err(malformed)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let response = match scram.as_mut().ok_or(StartupViolation::SaslOutOfOrder("continue"))? {
                        Scram::Password(s) => {
                            s.update(body.data()).map_err(scram_failed)?;
                            s.message().to_vec()
                        }
                        Scram::Keys(k) => k.respond(body.data()).map_err(keys_failed)?.into_bytes(),
                    };
                    frontend::sasl_response(&response, &mut out).map_err(malformed)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    // Verifies the server's signature: a server that does not know the
                    // password (the verifier) cannot complete this.
                    match scram.as_mut().ok_or(StartupViolation::SaslOutOfOrder("final"))? {
                        Scram::Password(s) => s.finish(body.data()).map_err(scram_failed)?,
                        Scram::Keys(k) => k.verify(body.data()).map_err(keys_failed)?,
                    }
                    continue;
                }
                Message::NoticeResponse(_) => continue,
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(ConnectError::UnsupportedAuth("GSSAPI/SSPI/Kerberos".into()));
                }
                _ => return Err(StartupViolation::DuringAuthentication(tag as char).into()),
            }
            self.stream.write_all(&out).await.map_err(|source| ConnectError::Io { addr: "upstream".into(), source })?;
        }
    }

    /// After AuthenticationOk: ParameterStatus and BackendKeyData until ReadyForQuery.
    async fn finish_startup(&mut self) -> Result<(), ConnectError> {
        loop {
            let (tag, msg) = self.read_startup_message().await?;
            match msg {
                Message::ParameterStatus(p) => {
                    let name = p.name().map_err(StartupViolation::Malformed)?;
                    let value = p.value().map_err(StartupViolation::Malformed)?;
                    Arc::make_mut(&mut self.params).insert(name.to_owned(), value.to_owned());
                }
                Message::BackendKeyData(k) => {
                    self.key = BackendKey { pid: k.process_id(), secret: k.secret_key() };
                }
                Message::ReadyForQuery(r) => {
                    self.status = TransactionStatus::from_byte(r.status()).unwrap_or_default();
                    return Ok(());
                }
                Message::NoticeResponse(_) => {}
                _ => return Err(StartupViolation::AfterAuthentication(tag as char).into()),
            }
        }
    }

    /// Reads one frame and decodes it with postgres-protocol (which never panics); an
    /// ErrorResponse becomes [`ConnectError::Server`] with its raw bytes.
    async fn read_startup_message(&mut self) -> Result<(u8, Message), ConnectError> {
        let frame = self.read_frame().await.map_err(StartupViolation::Read)?;
        let tag = frame.tag();
        if frame.tag() == be::ERROR_RESPONSE {
            let fields = be::error_fields(frame.body()).unwrap_or_default();
            return Err(ConnectError::Server { raw: frame.into_raw(), fields });
        }
        let mut buf = BytesMut::from(&frame.raw()[..]);
        match Message::parse(&mut buf) {
            Ok(Some(m)) => Ok((tag, m)),
            Ok(None) => Err(StartupViolation::Read(ReadError::Malformed).into()),
            Err(e) => Err(StartupViolation::Malformed(e).into()),
        }
    }

    /// Reads one complete frame from the server.
    pub async fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(f) = frame::take_frame(&mut self.rbuf, BACKEND_MAX_FRAME)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ReadError::Closed);
            }
        }
    }

    /// Runs a statement the pool issues itself (e.g. `DISCARD ALL`) and waits for
    /// ReadyForQuery, keeping ParameterStatus up to date. An error from Postgres fails it.
    pub async fn run_internal(&mut self, sql: &str) -> Result<(), ReadError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(ReadError::Io)?;
        self.stream.write_all(&out).await?;
        let mut failed = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag() {
                be::ERROR_RESPONSE => failed = Some(be::error_fields(f.body()).unwrap_or_default()),
                be::PARAMETER_STATUS => self.note_parameter(f.body()),
                be::READY_FOR_QUERY => {
                    self.status = be::ready_status(f.body()).map_err(|_| ReadError::Malformed)?;
                    return match failed {
                        Some(e) => Err(ReadError::Server(e)),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }

    /// Sends pgcache's own request (ending in Sync or a Query) and returns every frame of the
    /// answer up to and including ReadyForQuery.
    pub async fn exchange(&mut self, request: &[u8]) -> Result<Vec<Frame>, ReadError> {
        self.exchange_many(request, 1).await
    }

    /// [`Connection::exchange`] for `requests` requests sent at once (one round trip): every
    /// frame up to and including the `requests`-th ReadyForQuery.
    pub async fn exchange_many(&mut self, request: &[u8], requests: usize) -> Result<Vec<Frame>, ReadError> {
        self.stream.write_all(request).await?;
        let mut frames = Vec::new();
        let mut ready = 0;
        loop {
            let f = self.read_frame().await?;
            match f.tag() {
                be::PARAMETER_STATUS => self.note_parameter(f.body()),
                be::READY_FOR_QUERY => {
                    self.status = be::ready_status(f.body()).map_err(|_| ReadError::Malformed)?;
                    ready += 1;
                    if ready == requests {
                        frames.push(f);
                        return Ok(frames);
                    }
                }
                _ => {}
            }
            frames.push(f);
        }
    }

    /// Records a ParameterStatus body.
    pub fn note_parameter(&mut self, body: &[u8]) {
        if let Ok((name, value)) = be::parameter_status(body) {
            Arc::make_mut(&mut self.params).insert(name, value);
        }
    }

    /// Whether an idle connection is still usable: nothing to read and not closed. A server
    /// that shut down has sent a FATAL and closed, which shows up here.
    pub fn is_alive(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        self.stream.read_buf(&mut self.rbuf).now_or_never().is_none()
    }

    /// Says goodbye politely (Terminate) so the server does not log an unexpected EOF.
    pub async fn terminate(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            let _ = self.stream.write_all(&out).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

fn fallible_next<I: fallible_iterator::FallibleIterator<Error = std::io::Error>>(
    it: &mut I,
) -> Result<Option<I::Item>, ConnectError> {
    it.next().map_err(|e| StartupViolation::Malformed(e).into())
}

/// Failure while reading from an established backend connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("upstream connection closed")]
    Closed,
    #[error("upstream I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message from upstream: {0}")]
    Frame(#[from] FrameError),
    #[error("malformed message from upstream")]
    Malformed,
    #[error("upstream error: {0}")]
    Server(ErrorFields),
}
