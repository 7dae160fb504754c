//! The client side of a session before relaying starts: the startup phase (SSLRequest and
//! GSSENCRequest answered, TLS accepted, CancelRequest recognised, StartupMessage read), and
//! the helpers for writing pgcache's own messages and reading the password message.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::{Peer, Stream};
use crate::protocol::frame::{self, Frame};
use crate::protocol::startup::{self, MAX_STARTUP_PACKET, Startup, StartupPacket};

use super::SessionError;
use super::error::Violation;

/// A client connection.
#[derive(Debug)]
pub struct Client {
    pub stream: Stream,
    /// Bytes read from the client but not yet consumed.
    pub rbuf: BytesMut,
    pub peer: Peer,
}

/// What a new connection turned out to be.
pub enum Opening {
    Session(Startup),
    Cancel { pid: i32, secret: Vec<u8> },
}

/// A start-up that failed, with the client when it can still be told why.
pub struct Failure {
    pub client: Option<Client>,
    pub error: SessionError,
}

impl Client {
    /// A client on `stream` (TCP or the Unix socket).
    pub fn new(stream: Stream, peer: Peer) -> Client {
        if let Stream::Tcp(tcp) = &stream {
            let _ = tcp.set_nodelay(true);
        }
        Client { stream, rbuf: BytesMut::with_capacity(1024), peer }
    }

    /// Runs the startup phase up to the StartupMessage (Postgres docs, "Start-up" and
    /// "SSL Session Encryption").
    pub async fn open(mut self, tls: Option<&tokio_rustls::TlsAcceptor>) -> Result<(Client, Opening), Failure> {
        loop {
            let packet = match self.read_startup_packet().await {
                Ok(p) => p,
                Err(error) => return Err(Failure { client: Some(self), error }),
            };
            let decoded = match startup::decode(&packet) {
                Ok(d) => d,
                Err(e) => return Err(Failure { client: Some(self), error: e.into() }),
            };
            match decoded {
                StartupPacket::SslRequest => self = self.negotiate_tls(tls).await?,
                StartupPacket::GssEncRequest => {
                    if let Err(e) = self.stream.write_all(b"N").await {
                        return Err(Failure { client: None, error: e.into() });
                    }
                }
                StartupPacket::Cancel { pid, secret } => return Ok((self, Opening::Cancel { pid, secret })),
                StartupPacket::Startup(s) => return Ok((self, Opening::Session(s))),
            }
        }
    }

    async fn negotiate_tls(mut self, tls: Option<&tokio_rustls::TlsAcceptor>) -> Result<Client, Failure> {
        let protocol = |client, v| Failure { client: Some(client), error: SessionError::Protocol(v) };
        if self.stream.is_tls() {
            return Err(protocol(self, Violation::SslRequestOverTls));
        }
        // No TLS on the Unix socket (Postgres offers none there either).
        let Some(acceptor) = tls.filter(|_| matches!(self.stream, Stream::Tcp(_))) else {
            return match self.stream.write_all(b"N").await {
                Ok(()) => Ok(self),
                Err(e) => Err(Failure { client: None, error: e.into() }),
            };
        };
        if !self.rbuf.is_empty() {
            return Err(protocol(self, Violation::DataBeforeHandshake));
        }
        if let Err(e) = self.stream.write_all(b"S").await {
            return Err(Failure { client: None, error: e.into() });
        }
        let (Stream::Tcp(tcp), rbuf, peer) = (self.stream, self.rbuf, self.peer) else {
            unreachable!("TLS is offered on TCP only")
        };
        match acceptor.accept(tcp).await {
            Ok(tls_stream) => Ok(Client { stream: Stream::TlsServer(Box::new(tls_stream)), rbuf, peer }),
            Err(e) => Err(Failure { client: None, error: SessionError::TlsHandshake(e) }),
        }
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

    /// Room made in the read buffer when it has too little (a request's messages in one read).
    const READ_ROOM: usize = 4096;

    /// Reads one tagged frame of at most `max` bytes (during authentication, and by a
    /// session waiting without a backend).
    pub async fn read_frame(&mut self, max: usize) -> Result<Frame, SessionError> {
        loop {
            if let Some(f) = frame::take_frame(&mut self.rbuf, max)? {
                return Ok(f);
            }
            if self.rbuf.capacity() - self.rbuf.len() < Self::READ_ROOM / 4 {
                // An idle client keeps no buffer (see session::serve): make room once it
                // speaks, enough for a request in one read.
                self.stream.readable().await?;
                self.rbuf.reserve(Self::READ_ROOM);
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
            return Err(Violation::ExpectedPassword(f.tag() as char).into());
        }
        let pw = crate::protocol::frontend::password(f.body())?;
        String::from_utf8(pw.to_vec()).map_err(|_| Violation::PasswordNotUtf8.into())
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Whether a password may be asked for in cleartext on this connection.
    pub fn is_private(&self) -> bool {
        self.stream.is_tls() || self.peer.is_local()
    }
}
