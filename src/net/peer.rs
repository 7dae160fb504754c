//! Who is at the other end of a client connection: a TCP address, or a process on this host
//! connected through the Unix socket.

use std::fmt;
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// Connected through the Unix socket (shown as Postgres shows it, `[local]`).
    Unix,
}

impl Peer {
    /// On this host: a loopback address or the Unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            Peer::Tcp(addr) => addr.ip().is_loopback(),
            Peer::Unix => true,
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => addr.fmt(f),
            Peer::Unix => f.write_str("[local]"),
        }
    }
}
