//! Transport: the byte streams sessions run over (TCP, Unix sockets, TLS on either side) and
//! the rustls configurations behind them. Nothing here knows the Postgres protocol beyond
//! the SSLRequest handshake for backend connections.
//!
//! May use `config` (TLS settings); nothing above it.

pub mod stream;
pub mod tls;

pub use stream::Stream;
