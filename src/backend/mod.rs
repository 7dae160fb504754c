//! Connections to Postgres: how one is opened and authenticated ([`connection`]), where it is
//! reached and how its queries are cancelled ([`endpoint`]), and the pool that lends them to
//! client sessions ([`pool`]), keyed by (database, user) and by the client's startup
//! parameters, with what pgcache knows about logging in as each user ([`credentials`]) and
//! the SCRAM verifiers clients are checked against ([`verifiers`]), and the statements a pool
//! may send each second ([`throttle`]).
//!
//! Owns backend connections and their lifetimes. May use `protocol`, `config`, `net`,
//! `metrics`; knows no client, session, cache or rule.

pub mod connection;
pub mod credentials;
pub mod endpoint;
pub mod pool;
pub mod prepared;
pub mod throttle;
pub mod verifiers;

pub use connection::{BackendKey, ConnectError, Connection};
pub use credentials::{Credentials, Secret};
pub use endpoint::Endpoint;
pub use pool::{Lease, Pool, PoolError, PoolKey, Pools, Reset};
pub use prepared::Prepared;
