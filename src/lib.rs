//! pgcache: a sidecar caching proxy for PostgreSQL.
//!
//! The data path, module by module:
//!
//! ```text
//! server     accept loop, client limit, shutdown and drain
//!   └─ session     one client: start-up and TLS, authentication, then the relay loop; its
//!        │         response pipeline answers from the cache or forwards, in order
//!        ├─ protocol   wire format: framing, startup packets, the few messages decoded
//!        ├─ query      SQL classification (libpg_query) and catalog facts
//!        ├─ rules      rule files: which SELECTs are cached, for how long
//!        ├─ cache      the byte-bounded store, keys, table generations, single-flight
//!        ├─ l2         the shared second level on Redis/Valkey, coherent by versions
//!        ├─ peers      invalidations shared with other instances over LISTEN/NOTIFY
//!        ├─ replica    streaming replicas: which reads go there, their lag and health
//!        └─ backend    raw Postgres connections (TLS, SCRAM/md5), the pool, cancel
//! admin      /metrics, /healthz, /readyz, and the psql console with the query advisor
//! metrics    every metric name; stats: what is observed, for both
//! config     flags, environment and TOML file merged and validated
//! net        streams and rustls set-up
//! demo       pgcache demo, and the throwaway cluster the tests use too
//! ```
//!
//! Frames are forwarded as the bytes they arrived as; only what the proxy must know is
//! decoded. A cache hit writes stored wire bytes without touching Postgres; a write observed
//! on the way bumps the generations of what it changed before its completion reaches the
//! client.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod backend;
pub mod cache;
pub mod config;
pub mod context;
pub mod demo;
pub mod frontend;
pub mod l2;
pub mod metrics;
pub mod net;
pub mod peers;
pub mod policy;
pub mod protocol;
pub mod query;
pub mod replica;
pub mod rules;
pub mod server;
pub mod session;
pub mod stats;
