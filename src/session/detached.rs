//! A session without a backend. Two ways to get here ([`Why`]): in transaction pooling every
//! session gives its backend back at the end of each transaction and waits here for its next
//! request (in session pooling with replicas it keeps it as its `home`, taken again rather than
//! one from the pool, and leaves it only for a read a replica takes); and a session whose backend went away while it was idle, and that holds nothing
//! only that backend had (no transaction, temporary objects, LISTEN, cursors, advisory
//! locks), carries on here instead of being closed. Either way:
//!
//! - requests the cache can answer whole are answered ([`super::answer`], with the relay's own
//!   lookup) — fresh entries, and (only when the backend was lost) stale ones and entries
//!   within their rule's `stale_if_error` window when Postgres cannot be reached. After a lost
//!   backend only verdicts its pool's book already holds are used (Postgres, and so the
//!   catalog, may be down);
//! - any other request takes a backend (after a lost one, at most once a second while
//!   Postgres is down): the session's settings are given to it — nothing to do when the
//!   backend already has them, otherwise `RESET ALL` and `set_config` — its statements are
//!   re-sent when next used (under their server names in transaction pooling), and the
//!   request runs as if nothing happened; on failure the request gets an error (53300 when
//!   the pool is exhausted, 08006 when Postgres cannot be reached) and the session stays
//!   open, so the client can retry;
//! - with replicas, between transactions, a request that only reads (see
//!   [`crate::replica::route`]) takes a backend on a replica that shows the session's writes,
//!   if one does ([`crate::replica`]), and runs alone there: the client's messages behind it
//!   wait until it is answered, then are read as usual. If the replica cannot be reached the
//!   request goes to the primary, as it does when no replica will do.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::backend::connection::StartupParams;
use crate::backend::{Lease, PoolError, PoolKey, Reset};
use crate::context::Context;
use crate::metrics;
use crate::protocol::Frame;
use crate::protocol::backend::{self as be, PgError, TransactionStatus};
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;

use super::adopt::{Wanted, adopt};
use super::answer::Answerer;
use super::core::flow::Flow;
use super::decide::Serve;
use super::memo::Assessments;
use super::refresh;
use super::replay::ReplayError;
use crate::frontend::Client;
use crate::frontend::SessionError;

/// Why a session is without a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Its backend went away while it was idle.
    Lost,
    /// Transaction pooling: it gave its backend back at the end of a transaction. Only fresh
    /// entries are served meanwhile (a stale one goes to a backend, which refreshes it).
    Pooled,
}

/// How often a detached session tries to reach Postgres again, at most.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// How a detached stretch ended.
pub enum Outcome {
    /// A new backend, settings replayed; the request that needed it is back in the client's
    /// read buffer.
    Reattached(Box<Lease>),
    /// A backend on replica `replica` for the read in the client's read buffer;
    /// `behind`: the client's messages after it.
    OnReplica {
        lease: Box<Lease>,
        replica: usize,
        behind: BytesMut,
    },
    /// Transaction pooling: the request was answered from the cache and the client has sent
    /// nothing more; the session waits at rest.
    Resting,
    ClientLeft,
}

struct Detached<'a> {
    ctx: &'a Arc<Context>,
    key: &'a PoolKey,
    startup: &'a StartupParams,
    flow: &'a mut Flow,
    memo: &'a mut Assessments,
    why: Why,
    /// Session pooling with replicas: the session's own backend, taken again rather than one
    /// from the pool.
    home: &'a mut Option<Box<Lease>>,
    /// The last request looked up had a cacheable statement the cache lacked: the sample a
    /// replica must have replayed to store its fill.
    fill_at: Option<u64>,
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    ctx: &Arc<Context>,
    key: &PoolKey,
    startup: &StartupParams,
    client: &mut Client,
    flow: &mut Flow,
    memo: &mut Assessments,
    why: Why,
    home: &mut Option<Box<Lease>>,
) -> Result<Outcome, SessionError> {
    let mut d = Detached { ctx, key, startup, flow, memo, why, home, fill_at: None };
    let max = ctx.config().client.max_message_bytes;
    let mut turns = 0u32;
    loop {
        let mut frames = Vec::new();
        let mut held = 0;
        loop {
            // The client first: a frame already read or readable is taken without joining the
            // shutdown token's waiters (a lock every session shares) — but shutdown is asked
            // first every SIGNALS_EVERY frames, so that a client that never stops sending is
            // still told (as the relay does).
            turns = turns.wrapping_add(1);
            if turns.is_multiple_of(super::relay::SIGNALS_EVERY) && ctx.shutdown.is_cancelled() {
                return Err(SessionError::Shutdown);
            }
            let frame = tokio::select! {
                biased;
                f = client.read_frame(max) => f,
                _ = ctx.shutdown.cancelled() => return Err(SessionError::Shutdown),
            };
            let frame = match frame {
                Ok(f) => f,
                Err(SessionError::ClientClosed) => return Ok(Outcome::ClientLeft),
                Err(e) => return Err(e),
            };
            let tag = frame.tag();
            if tag == fe::TERMINATE {
                return Ok(Outcome::ClientLeft);
            }
            frames.push(frame);
            if !matches!(tag, fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE) {
                break;
            }
            // A long batch without its Sync is not held here: it takes a backend, whose relay
            // sends it on.
            held += frames.last().map_or(0, |f| f.raw().len());
            if held >= ctx.config().client.max_output_bytes {
                break;
            }
        }
        if let Some(answer) = d.answer(&frames, false).await {
            client.send(&answer).await?;
            if client.rbuf.is_empty() {
                // Waiting again: the buffer is made when the client next speaks, and a
                // pooled session waits at rest (see `session::serve`).
                client.rbuf = BytesMut::new();
                if d.why == Why::Pooled {
                    return Ok(Outcome::Resting);
                }
            }
            continue;
        }
        if let Some((replica, lease)) = Box::pin(d.onto_replica(&frames)).await {
            let mut read = BytesMut::new();
            for f in &frames {
                read.extend_from_slice(f.raw());
            }
            let behind = std::mem::replace(&mut client.rbuf, read);
            return Ok(Outcome::OnReplica { lease: Box::new(lease), replica, behind });
        }
        // Boxed: a session waiting for its client does not carry the connecting state.
        match Box::pin(d.reattach()).await {
            Ok(lease) => {
                let mut unread = BytesMut::new();
                for f in &frames {
                    unread.extend_from_slice(f.raw());
                }
                unread.extend_from_slice(&client.rbuf);
                client.rbuf = unread;
                return Ok(Outcome::Reattached(Box::new(lease)));
            }
            Err(ReattachError::Settings(ReplayError::Mismatch)) => {
                // The session's state cannot be given to another backend: going on would run
                // its statements in a state it does not have. It ends, as if its connection
                // had been lost; reconnecting starts a session pgcache can carry.
                tracing::error!(user = %key.user, database = %key.database, "session settings could not be restored on another backend connection; closing the session");
                return Err(SessionError::Refused(PgError::fatal(
                    SqlState::CONNECTION_FAILURE,
                    "pgcache could not restore this session's settings on another backend connection; reconnect",
                )));
            }
            Err(why) => {
                let answer = match d.answer(&frames, true).await {
                    Some(stale) => stale,
                    None => refusal(&frames, &why),
                };
                client.send(&answer).await?;
            }
        }
    }
}

/// The error for a request that needed Postgres while it could not be reached, shaped as
/// Postgres would answer a failing request (ReadyForQuery after a Query or Sync).
fn refusal(frames: &[Frame], why: &ReattachError) -> Bytes {
    let mut out = BytesMut::new();
    let error = match why {
        ReattachError::Pool(e @ (PoolError::Timeout { .. } | PoolError::TooManyWaiting { .. })) => {
            PgError::error(SqlState::TOO_MANY_CONNECTIONS, format!("pgcache: {e}"))
        }
        ReattachError::Pool(e @ PoolError::Unavailable { .. }) => {
            PgError::error(SqlState::CANNOT_CONNECT_NOW, format!("pgcache: {e}"))
        }
        _ => PgError::error(SqlState::CONNECTION_FAILURE, format!("pgcache: the upstream is unavailable: {why}")),
    };
    error.with_hint("the session is still open; retry later").encode(&mut out);
    if frames.last().is_some_and(|f| matches!(f.tag(), fe::QUERY | fe::SYNC | fe::FUNCTION_CALL)) {
        be::ready_for_query(TransactionStatus::Idle, &mut out);
    }
    out.freeze()
}

/// Why a detached session could not take a backend again.
#[derive(Debug, thiserror::Error)]
enum ReattachError {
    /// The session holds state a new backend would not have (see `Flow::movable`).
    #[error("{0}")]
    Pinned(&'static str),
    #[error("connecting failed less than a second ago")]
    RecentlyFailed,
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the session authorization or custom settings cannot be replayed")]
    NotReplayable,
    #[error("replaying the session's settings failed: {0}")]
    Settings(#[from] ReplayError),
}

impl Detached<'_> {
    /// Takes a new backend (or the session's own, if it keeps one) and replays the session's
    /// settings on it.
    async fn reattach(&mut self) -> Result<Lease, ReattachError> {
        if let Some(mut lease) = self.home.take() {
            if !lease.conn().is_alive() {
                // Postgres ended it while the session was away (a restart, a terminate, an
                // idle timeout): another one, as for any session whose backend was lost.
                tracing::info!(user = %self.key.user, "the session's own backend was closed meanwhile; taking another");
                lease.release(Reset::Close);
                let pool = self.ctx.pools.get(self.key);
                return self.reattach_to(&pool).await;
            }
            // Nothing to send when it shows the session's state, as it does unless the
            // session's settings changed on a replica (which read them back).
            let settings = self.replayable_settings()?;
            match self.give_settings(&mut lease, settings).await {
                Ok(()) => {
                    self.forget_backend_state();
                    return Ok(*lease);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the session's own backend could not be given its settings; taking another");
                    lease.release(Reset::Close);
                }
            }
        }
        let pool = self.ctx.pools.get(self.key);
        self.reattach_to(&pool).await
    }

    /// What to replay on a backend to give it the session's settings (see
    /// [`Settings::replay`](super::core::settings::Settings::replay)).
    fn replayable_settings(&self) -> Result<Vec<(String, String)>, ReattachError> {
        if self.flow.settings.known() {
            self.flow.settings.replay(&self.key.user).ok_or(ReattachError::NotReplayable)
        } else {
            Ok(Vec::new())
        }
    }

    /// A backend on a replica for `frames`, if they only read, the session may move, and a
    /// replica shows what the session must see; `None`: the primary's turn.
    async fn onto_replica(&mut self, frames: &[Frame]) -> Option<(usize, Lease)> {
        let replicas = &self.ctx.replicas;
        if replicas.is_empty() || self.why != Why::Pooled || self.flow.movable().is_err() {
            return None;
        }
        // A standby refuses serializable transactions (0A000): as the session's settings were
        // read (role and database defaults included), or, if they were not, as its startup
        // packet, its role and its database say.
        let serializable = |v: &str| v.to_ascii_lowercase().contains("serializable");
        let serializable = match self.flow.settings.serializable_as_read() {
            Some(s) => s,
            None if self.startup.iter().any(|(_, v)| serializable(v)) => true,
            None => {
                let catalog = &self.ctx.catalog;
                catalog.serializable_by_default(&self.key.database, &self.key.user).await.unwrap_or(true)
            }
        };
        if serializable {
            return None;
        }
        let statements = self.statements(frames).await?;
        let rules = self.ctx.rules.current();
        let (database, user) = (&self.key.database, &self.key.user);
        for (sql, c) in &statements {
            if crate::replica::route::pinned_to_primary(&self.ctx.catalog, &rules, sql, c, database, user).await {
                return None;
            }
        }
        let each: Vec<&crate::query::Classified> = statements.iter().flat_map(|(_, s)| s.iter()).collect();
        if !crate::replica::route::eligible(&self.ctx.catalog, database, &each).await {
            return None;
        }
        if self.fill_at.is_some() && self.ctx.l2.is_some() {
            replicas.fell_back(crate::replica::Fallback::Fill);
            return None;
        }
        // `causal`: the other instances' writes are known only while the peers' link for the
        // database listens (its start counts as an invalidation of everything before it): an
        // instance that has not heard yet does not know what a replica must have replayed,
        // and reads on the primary meanwhile (not waiting for the link).
        if replicas.config().read_your_writes == crate::config::ReadYourWrites::Causal
            && !self.ctx.peers.listening_or_start(&self.key.database)
        {
            replicas.fell_back(crate::replica::Fallback::Behind);
            return None;
        }
        let replica = replicas.choose(replicas.needs(self.flow.replica_need), self.fill_at).ok()?;
        let pool = replicas.nodes[replica].pools.get(self.key);
        let s = pool.stats();
        if s.active >= s.max && s.idle == 0 {
            // Its pool is full: waiting for a slot would hold the read up.
            replicas.fell_back(crate::replica::Fallback::Busy);
            return None;
        }
        match self.reattach_to(&pool).await {
            Ok(lease) => {
                replicas.routed(replica);
                Some((replica, lease))
            }
            Err(e) => {
                tracing::debug!(replica = %replicas.nodes[replica].name, error = %e, "replica unavailable; the read goes to the primary");
                replicas.fell_back(crate::replica::Fallback::ConnectFailed);
                None
            }
        }
    }

    /// The statements `frames` would run (every Parse's, and every Bind's), with their text, if
    /// they are a Query, or a batch of Parse/Bind/Describe/Execute ending in its one Sync.
    async fn statements(&self, frames: &[Frame]) -> Option<Vec<(Arc<str>, Arc<Vec<crate::query::Classified>>)>> {
        let classifier = &self.ctx.classifier;
        if let [q] = frames
            && q.tag() == fe::QUERY
        {
            let sql = super::core::query::sql_of(q)?;
            return Some(vec![(Arc::from(sql), classifier.classify_off_worker(sql).await)]);
        }
        let (last, batch) = frames.split_last()?;
        if last.tag() != fe::SYNC {
            return None;
        }
        let mut parsed = std::collections::HashMap::new();
        let mut out = Vec::new();
        for f in batch {
            match f.tag() {
                fe::PARSE => {
                    let p = fe::parse(f.body()).ok()?;
                    let sql: Arc<str> = Arc::from(std::str::from_utf8(p.sql).ok()?);
                    let c = (sql.clone(), classifier.classify_off_worker(&sql).await);
                    parsed.insert(p.name.to_vec(), c.clone());
                    out.push(c);
                }
                fe::BIND => {
                    let b = fe::BindParts::decode(f.raw()).ok()?;
                    let c = match parsed.get(&b.statement[..]) {
                        Some(c) => c.clone(),
                        None => {
                            let st = self.flow.statements.get(&b.statement[..])?;
                            (st.sql.clone(), st.classified.clone())
                        }
                    };
                    out.push(c);
                }
                fe::DESCRIBE | fe::EXECUTE => {}
                _ => return None,
            }
        }
        Some(out)
    }

    /// Takes a backend from `pool` and replays the session's settings on it.
    async fn reattach_to(&mut self, pool: &Arc<crate::backend::Pool>) -> Result<Lease, ReattachError> {
        self.flow.movable().map_err(ReattachError::Pinned)?;
        if pool.failed_within(RETRY_EVERY) {
            return Err(ReattachError::RecentlyFailed);
        }
        let secret = refresh::pooled_secret(self.ctx, self.key);
        let settings = self.replayable_settings()?;
        // A pooled connection, or, if it cannot show the session's state (another session
        // defined a custom setting there that this one has not), a new one: a session's
        // state that a new connection cannot be given either is not reproducible.
        let mut fresh = false;
        let lease = loop {
            let mut lease = pool.acquire(self.startup, secret.as_ref(), fresh).await?;
            match self.give_settings(&mut lease, settings.clone()).await {
                Ok(()) => break lease,
                Err(ReplayError::Unsuitable | ReplayError::Mismatch) if !fresh => {
                    lease.release(Reset::Close);
                    fresh = true;
                }
                Err(e) => {
                    lease.release(Reset::Close);
                    return Err(e.into());
                }
            }
        };
        self.forget_backend_state();
        Ok(lease)
    }

    /// Makes `lease` show the session's state, `settings` replayed if it does not already
    /// ([`adopt`]); a replay is counted.
    async fn give_settings(&mut self, lease: &mut Lease, settings: Vec<(String, String)>) -> Result<(), ReplayError> {
        let wanted = Wanted::session(self.ctx, settings, &mut self.flow.settings);
        if adopt(lease.conn(), wanted).await? {
            self.ctx.stats.metrics.counter(metrics::SETTINGS_REPLAYS, &[]).increment(1);
        }
        Ok(())
    }

    /// The session is on another backend than before: the one before had its statements and
    /// portals, this one may not.
    fn forget_backend_state(&mut self) {
        // The new backend knows none of the client's statements; re-send each when needed. In
        // transaction pooling named statements go under server names, which the backend
        // knows or learns when first used; only the unnamed one is the client's own.
        if self.flow.transaction_pooling {
            self.flow.unprepared.extend(self.flow.statements.get_key_value(&b""[..]).map(|(k, _)| k.clone()));
        } else {
            self.flow.unprepared = self.flow.statements.keys().cloned().collect();
        }
        self.flow.portals.clear();
        self.flow.virtual_portal = None;
    }

    /// The whole answer to a Query or a batch, if the cache holds every result
    /// ([`Answerer`]); `fallback` also serves `stale_if_error` entries.
    async fn answer(&mut self, frames: &[Frame], fallback: bool) -> Option<Bytes> {
        let serve = match self.why {
            Why::Lost => Serve::Lost,
            Why::Pooled => Serve::Pooled,
        };
        let mut a = Answerer { ctx: self.ctx, key: self.key, flow: self.flow, memo: self.memo, serve, fill_at: None };
        let answer = a.answer(frames, fallback).await;
        self.fill_at = a.fill_at;
        // A miss is handed on only to a planner deciding next on the same backend state
        // (Relay::answered_whole), not across taking a backend.
        self.memo.missed = None;
        answer
    }
}
