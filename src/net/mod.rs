//! Transport: the byte streams sessions run over (TCP, Unix sockets, TLS on either side), who
//! is at the other end, and the rustls configurations behind them. Nothing here knows the
//! Postgres protocol beyond the SSLRequest handshake for backend connections.
//!
//! May use `config` (TLS settings); nothing above it.

pub mod peer;
pub mod stream;
pub mod tls;

pub use peer::Peer;
pub use stream::Stream;
