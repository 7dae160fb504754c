//! Operating pgcache: the HTTP endpoints Prometheus and Kubernetes use ([`http`]: `/metrics`,
//! `/healthz`, `/readyz`) and the psql admin console on the virtual database ([`console`], in
//! the simple and the [`extended`] query protocol, running the [`commands`] — those that read
//! the live server in [`show`] — within a transaction [`block`] as drivers open them, with the
//! query advisor in [`advice`]).
//!
//! Owns the operator's interfaces. May use `frontend`, `context` and everything below; never
//! the session's internals (it reads the same [`crate::policy`] decision instead).

pub mod advice;
pub mod block;
pub mod commands;
pub mod console;
pub mod control;
pub mod extended;
pub mod http;
pub mod show;
pub mod table;
