//! Where backend connections go: the upstream's address and TLS set-up, plus sending a
//! CancelRequest there (Postgres docs, "Canceling Requests in Progress").

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{Host, Upstream};
use crate::net::Stream;
use crate::net::tls::{self, TlsError, UpstreamTls};
use crate::protocol::startup::encode_cancel;

use super::BackendKey;

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

    /// Asks Postgres to cancel whatever the backend with `key` is running. Best effort, as in
    /// libpq: the server gives no answer beyond closing the connection.
    pub async fn cancel(&self, key: BackendKey) -> std::io::Result<()> {
        let work = async {
            let mut s = self.open().await?;
            let mut buf = BytesMut::new();
            encode_cancel(key.pid, &key.secret.to_be_bytes(), &mut buf);
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
