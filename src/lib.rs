//! pgcache: a sidecar caching proxy for PostgreSQL.
//!
//! The data path, module by module:
//!
//! ```text
//! server   accept loop, client limit, shutdown and drain
//!   └─ session     one client: start-up and TLS, authentication, then the relay loop
//!        ├─ protocol   wire format: framing, startup packets, the few messages decoded
//!        └─ backend    raw Postgres connections (TLS, SCRAM/md5), the pool, cancel
//! config   flags, environment and TOML file merged and validated
//! net      streams and rustls set-up
//! ```
//!
//! Frames are forwarded as the bytes they arrived as; only what the proxy must know is
//! decoded (transaction status, ParameterStatus, COPY state, errors).

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod backend;
pub mod cache;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod query;
pub mod rules;
pub mod server;
pub mod session;
pub mod stats;
