//! The client side of a session before relaying starts: the startup phase (SSLRequest and
//! GSSENCRequest answered, TLS accepted, CancelRequest recognised, StartupMessage read), and
//! the helpers for writing pgcache's own messages and reading the password message.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::Stream;
use crate::protocol::frame::{self, Frame};
use crate::protocol::startup::{self, MAX_STARTUP_PACKET, Startup, StartupPacket};

use super::SessionError;

/// A client connection.
#[derive(Debug)]
pub struct Client {
    pub stream: Stream,
    /// Bytes read from the client but not yet consumed.
    pub rbuf: BytesMut,
    pub peer: SocketAddr,
}

/// What a new connection turned out to be.
pub enum Opening {
    Session(Client, Startup),
    Cancel { pid: i32, secret: Vec<u8> },
}

impl Client {
    /// Runs the startup phase up to the StartupMessage (Postgres docs, "Start-up" and
    /// "SSL Session Encryption").
    pub async fn open(
        tcp: TcpStream,
        peer: SocketAddr,
        tls: Option<&tokio_rustls::TlsAcceptor>,
    ) -> Result<Opening, SessionError> {
        let _ = tcp.set_nodelay(true);
        let mut client = Client {
            stream: Stream::Tcp(tcp),
            rbuf: BytesMut::with_capacity(1024),
            peer,
        };
        loop {
            let packet = client.read_startup_packet().await?;
            match startup::decode(&packet)? {
                StartupPacket::SslRequest => client = client.negotiate_tls(tls).await?,
                StartupPacket::GssEncRequest => client.stream.write_all(b"N").await?,
                StartupPacket::Cancel { pid, secret } => {
                    return Ok(Opening::Cancel { pid, secret });
                }
                StartupPacket::Startup(s) => return Ok(Opening::Session(client, s)),
            }
        }
    }

    async fn negotiate_tls(
        mut self,
        tls: Option<&tokio_rustls::TlsAcceptor>,
    ) -> Result<Client, SessionError> {
        if self.stream.is_tls() {
            return Err(SessionError::Protocol(
                "SSLRequest on an encrypted connection".into(),
            ));
        }
        let Some(acceptor) = tls else {
            self.stream.write_all(b"N").await?;
            return Ok(self);
        };
        // Bytes sent after SSLRequest but before the handshake would be processed as if they
        // had come over TLS (CVE-2021-23222); refuse them.
        if !self.rbuf.is_empty() {
            return Err(SessionError::Protocol(
                "received unencrypted data after SSL request".into(),
            ));
        }
        self.stream.write_all(b"S").await?;
        let Stream::Tcp(tcp) = self.stream else {
            return Err(SessionError::Protocol(
                "SSLRequest on an encrypted connection".into(),
            ));
        };
        let tls_stream = acceptor
            .accept(tcp)
            .await
            .map_err(SessionError::TlsHandshake)?;
        Ok(Client {
            stream: Stream::TlsServer(Box::new(tls_stream)),
            rbuf: self.rbuf,
            peer: self.peer,
        })
    }

    async fn read_startup_packet(&mut self) -> Result<BytesMut, SessionError> {
        loop {
            if let Some(len) = startup::packet_len(&self.rbuf)? {
                if self.rbuf.len() >= len {
                    return Ok(self.rbuf.split_to(len));
                }
                self.rbuf.reserve(len - self.rbuf.len());
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(SessionError::ClientClosed);
            }
        }
    }

    /// Reads one tagged frame of at most `max` bytes (used during authentication).
    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, SessionError> {
        loop {
            if let Some(f) = frame::take_frame(&mut self.rbuf, max)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(SessionError::ClientClosed);
            }
        }
    }

    /// Reads the client's PasswordMessage.
    pub async fn read_password(&mut self) -> Result<String, SessionError> {
        let f = self.read_frame(MAX_STARTUP_PACKET).await?;
        if f.tag() != crate::protocol::frontend::PASSWORD {
            return Err(SessionError::Protocol(format!(
                "expected password response, got message type {:?}",
                f.tag() as char
            )));
        }
        let pw = crate::protocol::frontend::password(f.body())?;
        String::from_utf8(pw.to_vec())
            .map_err(|_| SessionError::Protocol("password is not valid UTF-8".into()))
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Whether a password may be asked for in cleartext on this connection.
    pub fn is_private(&self) -> bool {
        self.stream.is_tls() || self.peer.ip().is_loopback()
    }
}
