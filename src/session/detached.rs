//! A session without a backend. Two ways to get here ([`Why`]): in transaction pooling every
//! session gives its backend back at the end of each transaction and waits here for its next
//! request; and a session whose backend went away while it was idle, and that holds nothing
//! only that backend had (no transaction, temporary objects, LISTEN, cursors, advisory
//! locks), carries on here instead of being closed. Either way:
//!
//! - requests the cache can answer are answered, found by the relay's own lookup
//!   ([`super::decide::Asker`]: rule, catalog facts, settings, key) — fresh entries, and (only
//!   when the backend was lost) stale ones and entries within their rule's `stale_if_error`
//!   window when Postgres cannot be reached. After a lost backend only verdicts the session's
//!   memo already holds are used (Postgres, and so the catalog, may be down);
//! - any other request takes a backend (after a lost one, at most once a second while
//!   Postgres is down): the session's settings are given to it — nothing to do when the
//!   backend already has them, otherwise `RESET ALL` and `set_config` — its statements are
//!   re-sent when next used (under their server names in transaction pooling), and the
//!   request runs as if nothing happened; on failure the request gets an error (53300 when
//!   the pool is exhausted, 08006 when Postgres cannot be reached) and the session stays
//!   open, so the client can retry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::backend::connection::StartupParams;
use crate::backend::{Connection, Lease, PoolError, PoolKey, Reset};
use crate::cache::{Entry, Freshness};
use crate::context::Context;
use crate::metrics;
use crate::protocol::Frame;
use crate::protocol::backend::{self as be, PgError, TransactionStatus};
use crate::protocol::frontend::{self as fe, Named, Target};
use crate::protocol::sqlstate::SqlState;
use crate::query::Classified;
use crate::stats::{Observation, key_hash};

use super::core::flow::{Flow, Statement};
use super::decide::{Asker, Looked, Request};
use super::memo::Assessments;
use super::refresh::{self, ReplayError};
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
    ClientLeft,
}

struct Detached<'a> {
    ctx: &'a Arc<Context>,
    key: &'a PoolKey,
    startup: &'a StartupParams,
    flow: &'a mut Flow,
    memo: &'a mut Assessments,
    why: Why,
}

pub async fn run(
    ctx: &Arc<Context>,
    key: &PoolKey,
    startup: &StartupParams,
    client: &mut Client,
    flow: &mut Flow,
    memo: &mut Assessments,
    why: Why,
) -> Result<Outcome, SessionError> {
    let mut d = Detached { ctx, key, startup, flow, memo, why };
    let max = ctx.config().client.max_message_bytes;
    loop {
        let mut frames = Vec::new();
        loop {
            let frame = tokio::select! {
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
        }
        if let Some(answer) = d.answer(&frames, false).await {
            client.send(&answer).await?;
            if client.rbuf.is_empty() {
                // Waiting again: the buffer is made when the client next speaks.
                client.rbuf = BytesMut::new();
            }
            continue;
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
        ReattachError::Pool(e @ PoolError::Timeout { .. }) => {
            PgError::error(SqlState::TOO_MANY_CONNECTIONS, format!("pgcache: {e}"))
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
    /// Takes a new backend and replays the session's settings on it.
    async fn reattach(&mut self) -> Result<Lease, ReattachError> {
        self.flow.movable().map_err(ReattachError::Pinned)?;
        let pool = self.ctx.pools.get(self.key);
        if pool.failed_within(RETRY_EVERY) {
            return Err(ReattachError::RecentlyFailed);
        }
        let password = refresh::pooled_password(self.ctx, self.key);
        let mut lease = pool.acquire(self.startup, password.as_ref(), false).await?;
        let settings = if self.flow.settings.known() {
            self.flow.settings.replay(&self.key.user).ok_or(ReattachError::NotReplayable)?
        } else {
            Vec::new()
        };
        if let Err(e) = self.give_settings(lease.conn(), settings).await {
            lease.release(Reset::Close);
            return Err(e.into());
        }
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
        Ok(lease)
    }

    /// Makes the backend's session settings the client's: nothing to do if they already are
    /// (the last client left the same ones), otherwise the ones left there are reset and the
    /// client's applied.
    async fn give_settings(&self, conn: &mut Connection, settings: Vec<(String, String)>) -> Result<(), ReplayError> {
        if conn.settings == settings {
            return Ok(());
        }
        if !conn.settings.is_empty() {
            // RESET ALL leaves the role alone (Postgres marks it so); RESET ROLE does not.
            conn.run_internal("RESET ALL; RESET ROLE").await.map_err(ReplayError::from)?;
            conn.settings.clear();
        }
        refresh::apply_settings(conn, &settings).await?;
        conn.settings = settings;
        self.ctx.stats.metrics.counter(metrics::SETTINGS_REPLAYS, &[]).increment(1);
        Ok(())
    }

    /// An entry for this request, if one may be served now, with its key's hash and whether
    /// it is past its TTL: the relay's own lookup ([`Asker::look`]), then what a session
    /// without a backend may serve — fresh entries while the peers' invalidations are heard
    /// (or the rule accepts stale answers during an outage), stale ones only after a lost
    /// backend, and `stale_if_error` entries when Postgres cannot answer (`fallback`).
    async fn lookup(
        &mut self,
        statements: &Arc<Vec<Classified>>,
        sql: &str,
        c: &Classified,
        req: Request<'_>,
        fallback: bool,
    ) -> Option<(Arc<Entry>, u64, bool)> {
        if self.flow.taint.is_some() {
            return None;
        }
        let offline = self.why == Why::Lost;
        let mut asker = Asker { ctx: self.ctx, key: self.key, flow: self.flow, memo: self.memo, offline };
        let Looked::Found { entry, freshness, key, .. } = asker.look(statements, sql, c, &req, false).await else {
            return None;
        };
        let coherent = self.ctx.peers.listening(&self.key.database) || !entry.rule.stale_if_error.is_zero();
        let usable = match freshness {
            Freshness::Fresh => coherent,
            Freshness::Stale => coherent && self.why == Why::Lost,
            Freshness::Fallback => fallback,
            Freshness::Dead => false,
        };
        usable.then(|| (entry, key_hash(&key.0), freshness != Freshness::Fresh))
    }

    /// The whole answer to a Query, or to an extended batch of Parse/Bind/Describe/Execute on
    /// the unnamed portal ending in Sync, if the cache holds every result.
    async fn answer(&mut self, frames: &[Frame], fallback: bool) -> Option<Bytes> {
        match frames {
            [q] if q.tag() == fe::QUERY => self.answer_query(q, fallback).await,
            [.., last] if last.tag() == fe::SYNC => self.answer_batch(frames, fallback).await,
            _ => None,
        }
    }

    async fn answer_query(&mut self, q: &Frame, fallback: bool) -> Option<Bytes> {
        let sql = std::str::from_utf8(fe::query(q.body()).ok()?.sql).ok()?;
        let classified = self.ctx.classifier.classify(sql);
        let [c] = classified.as_slice() else { return None };
        let (entry, key, stale) = self.lookup(&classified, sql, c, Request::Simple, fallback).await?;
        let mut out = BytesMut::new();
        out.extend_from_slice(&entry.row_description);
        out.extend_from_slice(&entry.body);
        be::ready_for_query(TransactionStatus::Idle, &mut out);
        self.record(classified.clone(), &entry, key, stale, out.len());
        Some(out.freeze())
    }

    async fn answer_batch(&mut self, frames: &[Frame], fallback: bool) -> Option<Bytes> {
        let mut out = BytesMut::new();
        let mut parsed: HashMap<Vec<u8>, Arc<Statement>> = HashMap::new();
        let mut current: Option<Arc<Entry>> = None;
        let mut hits = Vec::new();
        for f in frames {
            match f.tag() {
                fe::PARSE => {
                    let p = fe::parse(f.body()).ok()?;
                    let sql = std::str::from_utf8(p.sql).ok()?;
                    let classified = self.ctx.classifier.classify(sql);
                    let st = Statement::new(Arc::from(sql), p.param_types.clone(), f.clone(), classified);
                    parsed.insert(p.name.to_vec(), Arc::new(st));
                    be::parse_complete(&mut out);
                }
                fe::BIND => {
                    let b = fe::BindParts::decode(f.raw()).ok()?;
                    if !b.portal.is_empty() {
                        return None;
                    }
                    let known = |name: &[u8]| parsed.get(name).or_else(|| self.flow.statements.get(name)).cloned();
                    let st = known(&b.statement[..])?;
                    let [c] = st.classified.as_slice() else { return None };
                    let req = Request::Extended { param_types: &st.param_types, bind: &b };
                    let (entry, key, stale) = self.lookup(&st.classified, &st.sql, c, req, fallback).await?;
                    hits.push((st.classified.clone(), entry.clone(), key, stale));
                    current = Some(entry);
                    be::bind_complete(&mut out);
                }
                fe::DESCRIBE => match fe::named(f.body()).ok()? {
                    Named { target: Target::Portal, name: b"" } => {
                        out.extend_from_slice(&current.as_ref()?.row_description)
                    }
                    _ => return None,
                },
                fe::EXECUTE => {
                    let e = fe::execute(f.body()).ok()?;
                    let entry = current.take()?;
                    if !e.portal.is_empty() {
                        return None;
                    }
                    // A detached session is outside any transaction: the portal ends at Sync.
                    out.extend_from_slice(&entry.answer(e.max_rows));
                }
                fe::SYNC => be::ready_for_query(TransactionStatus::Idle, &mut out),
                _ => return None,
            }
        }
        let server_names = self.flow.transaction_pooling;
        for (name, st) in parsed {
            let name = Bytes::from(name);
            if name.is_empty() || !server_names {
                self.flow.unprepared.insert(name.clone());
            }
            self.flow.statements.insert(name, st);
        }
        for (classified, entry, key, stale) in hits {
            let served = entry.body.len();
            self.record(classified, &entry, key, stale, served);
        }
        Some(out.freeze())
    }

    fn record(&self, classified: Arc<Vec<Classified>>, entry: &Entry, key: u64, stale: bool, served: usize) {
        entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut o = Observation::new(classified, metrics::Outcome::Hit);
        o.hit(&entry.rule, key, stale, entry.rows);
        self.ctx.stats.record(&o, served as u64, false);
    }
}
