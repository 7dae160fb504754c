//! One client session, from its StartupMessage to its close.
//!
//! ```text
//! StartupMessage ──(login; backend leased)──▶ Relaying ──Terminate/EOF──▶ Closed
//!                                               │ shutdown: at rest ──▶ 57P01, Closed
//!                                               │ error ──▶ ErrorResponse, Closed
//!                                               │ backend lost while idle ──▶ Detached
//!                      Relaying ◀──(new backend, settings replayed)── Detached
//!                      Relaying ──transaction over (transaction pooling)──▶ Detached
//!                      Relaying ──transaction over (session pooling, replicas)──▶ Detached,
//!                                                        the backend kept as the session's home
//!   Detached, nothing read from the client ──▶ Resting (a compact struct; no future of its own)
//!                      Detached ◀──the client speaks── Resting
//! ```
//!
//! Its life from login to end, in stretches of work and rests between them, is [`life`]'s.
//! The protocol state is the [`core`]'s (pure, unit-tested); the [`relay`] does the I/O and
//! feeds it ([`drive`]) with the facts only the shared state has: write effects
//! ([`effects`]) and cache decisions ([`decide`]). When the session ends its backend goes back
//! to the pool only if it is at rest; a backend left mid-query is cancelled and closed. It uses
//! the front end ([`crate::frontend`]) and what every connection shares
//! ([`crate::context`]); it knows nothing of the admin console.

mod adopt;
mod answer;
pub mod auth;
pub mod core;
mod decide;
mod detached;
mod drive;
pub mod effects;
mod handover;
mod life;
mod login;
mod memo;
pub mod refresh;
pub mod relay;
mod replay;
pub mod shared;
pub mod warm;

pub use self::life::serve;
