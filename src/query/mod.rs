//! What a SQL statement does, as far as the cache is concerned: whether it is a single
//! read-only SELECT, which relations it reads and writes, which functions it calls, and whether
//! it controls the transaction or session. Built on the Postgres grammar itself (pg_query);
//! see [`classify`]. Results are cached by SQL text and shape ([`classifier`]), and function volatility,
//! views and other facts only the database knows come from [`catalog`].
//!
//! Owns the reading of SQL and catalog facts. May use `backend` (its catalog connections) and
//! below; knows no rule, cache entry or session.

pub mod catalog;
pub mod classifier;
pub mod classify;
pub mod digest;
pub mod hold;
pub mod literals;
pub mod point;
pub mod relation;
pub mod tree;
mod walk;

pub use classifier::Classifier;
pub use classify::{Classified, Kind, SessionChange, SettingsChange, TxControl};
pub use hold::{Held, Hold, Holds};
pub use point::Point;
pub use relation::Relation;
