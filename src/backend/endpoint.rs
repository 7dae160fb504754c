//! Where backend connections go: the upstream's address and TLS set-up, plus sending a
//! CancelRequest there (Postgres docs, "Canceling Requests in Progress").

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{Host, Upstream};
use crate::net::Stream;
use crate::net::tls::{self, TlsError, UpstreamTls};

use super::connection::StartupViolation;
use super::{BackendKey, ConnectError};

/// The upstream server, resolved from the config once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
    pub tls: Option<UpstreamTls>,
    pub connect_timeout: Duration,
}

impl Endpoint {
    pub fn new(upstream: &Upstream, connect_timeout: Duration) -> Result<Self, TlsError> {
        Ok(Endpoint {
            host: upstream.host.clone(),
            port: upstream.port,
            tls: tls::upstream(upstream)?,
            connect_timeout,
        })
    }

    /// The server's address for messages and logs.
    pub fn describe(&self) -> String {
        crate::config::upstream::address(&self.host, self.port)
    }

    /// Opens the transport (no TLS negotiation yet).
    pub async fn open(&self) -> std::io::Result<Stream> {
        match &self.host {
            Host::Tcp(h) => {
                let s = TcpStream::connect((h.as_str(), self.port)).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Host::Unix(dir) => {
                Ok(Stream::Unix(UnixStream::connect(dir.join(format!(".s.PGSQL.{}", self.port))).await?))
            }
        }
    }

    /// Opens the transport and, unless `sslmode=disable`, negotiates TLS (SSLRequest first,
    /// then the handshake; `prefer` falls back to plain when the server answers `N`).
    pub async fn connect(&self) -> Result<Stream, ConnectError> {
        let addr = self.describe();
        let io_err = |source| ConnectError::Io { addr: addr.clone(), source };
        let mut stream = self.open().await.map_err(io_err)?;
        let Some(tls) = &self.tls else { return Ok(stream) };
        let mut req = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        stream.write_all(&req).await.map_err(io_err)?;
        let answer = stream.read_u8().await.map_err(io_err)?;
        match (answer, stream) {
            (b'S', Stream::Tcp(tcp)) => {
                let tls_stream =
                    tls.connector.connect(tls.server_name.clone(), tcp).await.map_err(ConnectError::Tls)?;
                Ok(Stream::TlsClient(Box::new(tls_stream)))
            }
            (b'N', s) if tls.optional => Ok(s),
            (b'N', _) => Err(ConnectError::TlsRefused(addr)),
            (other, _) => Err(StartupViolation::SslAnswer(other).into()),
        }
    }

    /// Asks Postgres to cancel whatever the backend with `key` is running. Best effort, as in
    /// libpq: the server gives no answer beyond closing the connection.
    pub async fn cancel(&self, key: BackendKey) -> std::io::Result<()> {
        let work = async {
            let mut s = self.open().await?;
            let mut buf = BytesMut::new();
            postgres_protocol::message::frontend::cancel_request(key.pid, key.secret, &mut buf);
            s.write_all(&buf).await?;
            s.flush().await?;
            // Wait for the server to close, so the cancel is processed before we report back.
            let mut sink = [0u8; 16];
            while s.read(&mut sink).await? > 0 {}
            Ok(())
        };
        tokio::time::timeout(self.connect_timeout, work)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request timed out")))
    }
}
