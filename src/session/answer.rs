//! Answering a whole request from the cache in one step, without the batch planner: a simple
//! Query, or an extended batch of Parse/Bind/Describe/Execute on the unnamed portal ending in
//! Sync, when the cache holds every result. Three kinds of session do this ([`Serve`]): one
//! waiting between transactions in transaction pooling, one that lost its backend, and one
//! whose backend is idle (session pooling, outside a transaction, nothing in flight) — for
//! which this is the short way to the same answer the relay's planner would give.
//!
//! Anything it cannot answer whole — a miss, a stale entry where only fresh ones may be
//! served, a Parse of a name already in use (Postgres refuses it), a Describe of a statement,
//! a named portal — is left to the caller, untouched: `None`, and the session's state is as
//! before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::backend::PoolKey;
use crate::cache::Entry;
use crate::context::Context;
use crate::metrics;
use crate::protocol::Frame;
use crate::protocol::backend::{self as be, TransactionStatus};
use crate::protocol::frontend::{self as fe, Named, Target};
use crate::query::{Classified, Kind};
use crate::stats::Observation;

use super::core::flow::{Flow, Statement};
use super::core::query::sql_of;
use super::decide::{Asker, Looked, Request, Serve, fill_deps, usable};
use super::memo::{Assessments, Missed};

/// The bytes a batch's answer starts with room for: its BindComplete, a point read's rows and
/// its ReadyForQuery in one allocation.
const ANSWER_ROOM: usize = 256;

/// The bytes of a ReadyForQuery, which ends a batch's answer.
const READY_FOR_QUERY: usize = 6;

/// A cacheable request's key, assessment and L2 key, as [`Looked::Missing`] has them.
type Missing = (crate::cache::Key, Arc<crate::policy::Assessment>, Option<String>);

/// The unnamed portal's hit in a batch: its statement, entry, key hash and whether it is stale.
struct Hit {
    classified: Arc<Vec<Classified>>,
    entry: Arc<Entry>,
    key: u64,
    stale: bool,
}

/// The session state an answer reads and, when it answers, updates.
pub struct Answerer<'a> {
    pub ctx: &'a Arc<Context>,
    pub key: &'a PoolKey,
    pub flow: &'a mut Flow,
    pub memo: &'a mut Assessments,
    pub serve: Serve,
    /// A statement it looked up was cacheable and missing (running it would fill the cache):
    /// the clock sample a replica must have replayed for that fill to be stored (the latest,
    /// if several).
    pub fill_at: Option<u64>,
}

impl Answerer<'_> {
    /// The whole answer to `frames` (one Query, or a batch ending in Sync) if the cache holds
    /// every result; `fallback` also serves `stale_if_error` entries (Postgres cannot answer).
    pub async fn answer(&mut self, frames: &[Frame], fallback: bool) -> Option<Bytes> {
        self.memo.missed = None;
        match frames {
            [q] if q.tag() == fe::QUERY => self.answer_query(q, fallback).await,
            [.., last] if last.tag() == fe::SYNC => self.answer_batch(frames, fallback).await,
            _ => None,
        }
    }

    /// An entry for this request, if one may be served now, with its key's hash and whether
    /// it is past its TTL: the relay's own lookup ([`Asker::look`]), then what this session
    /// may serve ([`Serve`]) — and `stale_if_error` entries when Postgres cannot answer
    /// (`fallback`). Else, when it is cacheable and missing, what the look-up found
    /// (for [`Missed`]).
    async fn lookup(
        &mut self,
        sql: &str,
        c: &Classified,
        req: Request<'_>,
        fallback: bool,
    ) -> Result<(Arc<Entry>, u64, bool), Option<Missing>> {
        // Whole answers are given only by an idle session, or one without a backend.
        if self.flow.refuses(TransactionStatus::Idle, false, false).is_some() {
            return Err(None);
        }
        let offline = self.serve == Serve::Lost;
        let mut asker = Asker { ctx: self.ctx, key: self.key, flow: self.flow, memo: self.memo, offline };
        let looked = asker.look(sql, c, &req, false).await;
        if let Looked::Missing { a, .. } = &looked
            && !self.ctx.replicas.is_empty()
        {
            let at = crate::cache::generation::written_at(&fill_deps(self.ctx, &self.key.database, a, c, &req));
            self.fill_at = Some(self.fill_at.unwrap_or(0).max(at));
        }
        let (entry, freshness, key) = match looked {
            Looked::Found { entry, freshness, key, .. } => (entry, freshness, key),
            Looked::Missing { key, a, l2 } => return Err(Some((key, a, l2))),
            _ => return Err(None),
        };
        let listening = self.ctx.peers.listening(&self.key.database);
        // An entry that needs refreshing is left to the planner, which refreshes it.
        let served =
            usable(freshness, &entry.rule, self.serve, listening, fallback).filter(|s| !s.refresh).ok_or(None)?;
        Ok((entry, key.hashed(), served.stale))
    }

    async fn answer_query(&mut self, q: &Frame, fallback: bool) -> Option<Bytes> {
        let sql = sql_of(q)?;
        let classified = self.ctx.classifier.classify_off_worker(sql).await;
        self.answer_simple(q, sql, &classified, fallback).await
    }

    /// The whole answer to the Query `frame` of `sql`, already classified, if the cache holds
    /// it; if it is cacheable and missing, what the look-up found is left for the planner
    /// ([`Missed`]).
    pub async fn answer_simple(
        &mut self,
        frame: &Frame,
        sql: &str,
        classified: &Arc<Vec<Classified>>,
        fallback: bool,
    ) -> Option<Bytes> {
        let [c] = classified.as_slice() else { return None };
        if c.kind != Kind::Select {
            return None;
        }
        let started = Instant::now();
        let (rules, catalog) = (self.ctx.rules.version(), self.ctx.catalog.epoch());
        let (entry, key, stale) = match self.lookup(sql, c, Request::Simple, fallback).await {
            Ok(found) => found,
            Err(missing) => {
                if let Some((key, assessment, l2)) = missing {
                    let (frame, statement) = (frame.raw().clone(), None);
                    self.memo.missed = Some(Box::new(Missed { frame, rules, catalog, statement, key, assessment, l2 }));
                }
                return None;
            }
        };
        let mut out = BytesMut::with_capacity(entry.row_description.len() + entry.body.len() + 6);
        out.extend_from_slice(&entry.row_description);
        out.extend_from_slice(&entry.body);
        self.record(classified.clone(), &entry, key, stale, out.len(), (started, started.elapsed()));
        be::ready_for_query(TransactionStatus::Idle, &mut out);
        Some(out.freeze())
    }

    async fn answer_batch(&mut self, frames: &[Frame], fallback: bool) -> Option<Bytes> {
        // Room for a point read's answer at once (grown, once, for a larger one at its Execute,
        // to hold it and the ReadyForQuery).
        let mut out = BytesMut::with_capacity(ANSWER_ROOM);
        let mut parsed: HashMap<Vec<u8>, Arc<Statement>> = HashMap::new();
        let mut current: Option<Hit> = None;
        let mut hits = Vec::new();
        // Statements parsed here that a Bind served from the cache used (so Postgres parsed
        // their text before, for the entry): any other Parse goes to Postgres, which may
        // refuse it and must say so in answer to the Parse itself.
        let mut used = std::collections::HashSet::new();
        let started = Instant::now();
        for f in frames {
            match f.tag() {
                fe::PARSE => {
                    let p = fe::parse(f.body()).ok()?;
                    // Postgres refuses a Parse of a name in use: let it say so.
                    let taken = |name: &[u8]| parsed.contains_key(name) || self.flow.statements.contains_key(name);
                    if !p.name.is_empty() && taken(p.name) {
                        return None;
                    }
                    let sql = std::str::from_utf8(p.sql).ok()?;
                    let classified = self.ctx.classifier.classify_off_worker(sql).await;
                    let st = Statement::new(Arc::from(sql), p.param_types.clone(), f.clone(), classified);
                    // A new text under a name a Bind used before: the new one is unused so far.
                    used.remove(p.name);
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
                    if parsed.contains_key(&b.statement[..]) {
                        used.insert(b.statement.to_vec());
                    }
                    let c = st.select()?;
                    let req = Request::Extended { param_types: &st.param_types, bind: &b };
                    let (rules, catalog) = (self.ctx.rules.version(), self.ctx.catalog.epoch());
                    let (entry, key, stale) = match self.lookup(&st.sql, c, req, fallback).await {
                        Ok(found) => found,
                        Err(missing) => {
                            // Every Bind before this one was a hit (a look-up that fails
                            // ends the answer): what the planner does for those changes
                            // nothing this one's look-up would find.
                            if let Some((key, assessment, l2)) = missing {
                                let (frame, statement) = (b.raw.clone(), Some(st));
                                self.memo.missed =
                                    Some(Box::new(Missed { frame, rules, catalog, statement, key, assessment, l2 }));
                            }
                            return None;
                        }
                    };
                    current = Some(Hit { classified: st.classified.clone(), entry, key, stale });
                    be::bind_complete(&mut out);
                }
                fe::DESCRIBE => match fe::named(f.body()).ok()? {
                    Named { target: Target::Portal, name: b"" } => {
                        out.extend_from_slice(&current.as_ref()?.entry.row_description)
                    }
                    _ => return None,
                },
                fe::EXECUTE => {
                    let e = fe::execute(f.body()).ok()?;
                    let hit = current.take()?;
                    if !e.portal.is_empty() {
                        return None;
                    }
                    // Outside any transaction: the portal ends at Sync.
                    let answer = hit.entry.answer(e.max_rows);
                    out.reserve(answer.len() + READY_FOR_QUERY);
                    out.extend_from_slice(&answer);
                    hits.push((hit, answer.len()));
                }
                fe::SYNC => be::ready_for_query(TransactionStatus::Idle, &mut out),
                _ => return None,
            }
        }
        // ... unless Postgres prepared that very statement on a connection of the pool since
        // the last DDL (transaction pooling, where a Parse alone would otherwise take a
        // backend just to be answered).
        let accepted = |st: &Statement| {
            let pool = self.ctx.pools.get(self.key);
            self.flow.transaction_pooling && pool.accepted(st.server_name(), self.ctx.catalog.epoch())
        };
        if parsed.iter().any(|(name, st)| !used.contains(name) && !accepted(st)) {
            return None;
        }
        // The backend has none of the statements parsed here; each is sent to it before it is
        // first needed (in transaction pooling named ones go under server names, which backends
        // learn when first used).
        let server_names = self.flow.transaction_pooling;
        for (name, st) in parsed {
            let name = Bytes::from(name);
            if name.is_empty() || !server_names {
                self.flow.unprepared.insert(name.clone());
            }
            self.flow.statements.insert(name, st);
        }
        // The unnamed portal bound here ended at the Sync, in the client's view too.
        self.flow.virtual_portal = None;
        // Each hit's share of the batch's time (one clock reading for all of them).
        let took = started.elapsed() / u32::try_from(hits.len()).unwrap_or(u32::MAX).max(1);
        for (Hit { classified, entry, key, stale }, served) in hits {
            self.record(classified, &entry, key, stale, served, (started, took));
        }
        Some(out.freeze())
    }

    /// Records a hit as the planner does: `served` is what its Execute (or Query) sent of the
    /// result, without ReadyForQuery; `started` when answering its request began; `took` its
    /// time (a batch's hits share the batch's time, one clock reading for all of them).
    fn record(
        &self,
        classified: Arc<Vec<Classified>>,
        entry: &Entry,
        key: u64,
        stale: bool,
        served: usize,
        (started, took): (Instant, Duration),
    ) {
        entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut o = Observation::since(self.flow.database.clone(), classified, metrics::Outcome::Hit, started);
        o.hit(&entry.rule, key, stale, entry.rows);
        self.ctx.stats.record_took(&o, served as u64, false, took);
    }
}
