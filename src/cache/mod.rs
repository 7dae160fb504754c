//! The result cache: wire bytes of SELECT results, bounded by bytes, expiring by TTL, and
//! invalidated by table generations.
//!
//! - [`store`]: entries in `quick_cache` with a byte weighter; freshness (fresh, stale within
//!   the rule's windows, dead) is kept in the value and checked on every read; a sweep removes
//!   what can never be served again, when an invalidation or an entry's age says something
//!   may have died.
//! - [`generation`]: one counter per relation (and per relation name, and one global). An
//!   entry records the counters of everything it read when its query was sent, and is dead as
//!   soon as one moves. A write bumps counters before its completion reaches the client, which
//!   also closes the fill race: a miss that started before the write finds a moved counter and
//!   does not insert.
//! - [`key`]: the collision-safe, length-delimited key.
//! - [`admission`]: whether a miss is stored, for rules whose entries are seldom read again.
//! - [`warm`]: recipes of the fills (not their rows), written on shutdown for a warm start.
//! - [`flight`]: single-flight for concurrent misses. quick_cache's placeholder guard is not
//!   used: a fill here streams through the session's relay loop over many iterations (a guard
//!   would borrow the cache across all of them), and while a stale entry is being refreshed
//!   readers must keep getting the stale value, which a placeholder would block.
//!
//! Owns stored results and generations. May use `rules` (an entry keeps its rule) and below;
//! never talks to Postgres or a client.

pub mod admission;
pub mod flight;
pub mod generation;
pub mod key;
pub mod store;
pub mod warm;

pub use flight::{Flight, Flights};
pub use generation::{Dependency, Generations, Keyed, Moves};
pub use key::Key;
pub use store::{Entry, Freshness, Store};
