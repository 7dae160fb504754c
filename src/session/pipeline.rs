//! The response pipeline: every request the client is owed an answer for, in order.
//!
//! An item is either a request forwarded to the backend (whose answer is routed to the client,
//! or hidden when pgcache injected the request itself), or an answer pgcache gives locally: a
//! cache hit, a synthesized ParseComplete/BindComplete, a ReadyForQuery. Local answers are
//! emitted only when every item before them has been answered, so the client sees exactly the
//! message order Postgres would produce. When the backend reports an error in the extended
//! protocol it skips everything up to the next Sync; the pipeline drops the local answers in
//! that span too (Postgres docs, "Extended Query").
//!
//! Answers are also where the cache learns: a cache fill tees the RowDescription, DataRows and
//! CommandComplete of its request, and a write's invalidations are applied when its
//! CommandComplete arrives and again when its transaction ends — always before the message is
//! passed to the client, so no client can see a write acknowledged while its old rows are
//! still served.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::cache::{Dependency, Entry, Flight, Key};
use crate::context::Context;
use crate::protocol::Truncated;
use crate::protocol::backend::{self as be, TransactionStatus};
use crate::query::Relation;
use crate::rules::Rule;
use crate::stats::Observation;

use super::effects::{self, Effect};
use super::flow::{Flow, Probe};
use super::relay::Out;

/// Which answer a forwarded request gets (Postgres docs, "Message Flow").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Parse,
    Bind,
    Close,
    DescribeStatement,
    DescribePortal,
    /// DataRows and CommandComplete / EmptyQueryResponse / PortalSuspended (or a COPY).
    Execute,
    /// ReadyForQuery.
    Sync,
    /// Everything up to ReadyForQuery (simple Query and FunctionCall).
    Query,
}

/// A request forwarded to the backend.
#[derive(Debug)]
pub struct Forwarded {
    pub expect: Expect,
    /// Injected by pgcache: the client must not see the answer.
    pub hidden: bool,
    /// The answer feeds this cache fill.
    pub fill: Option<usize>,
    /// The request is the settings probe.
    pub probe: bool,
    /// Invalidations to apply when the request completes.
    pub effects: Vec<Effect>,
    /// Recorded in the statistics when the request completes.
    pub observe: Option<Box<Observation>>,
    /// The backend reported an error for it.
    pub failed: bool,
    /// An Execute with a row limit that pgcache raised to fill the cache: the client sees
    /// only as many rows as it asked for, then the PortalSuspended Postgres would have sent.
    pub row_limit: Option<RowLimit>,
}

/// The client's row limit on an Execute sent with a higher one, and the rows seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLimit {
    pub client: u64,
    pub seen: u64,
}

impl Forwarded {
    pub fn new(expect: Expect) -> Self {
        Forwarded {
            expect,
            hidden: false,
            fill: None,
            probe: false,
            effects: Vec::new(),
            observe: None,
            failed: false,
            row_limit: None,
        }
    }

    pub fn hidden(expect: Expect) -> Self {
        Forwarded { hidden: true, ..Forwarded::new(expect) }
    }
}

/// One answer owed to the client.
#[derive(Debug)]
pub enum Item {
    Backend(Forwarded),
    /// Bytes pgcache sends itself (cache hit or synthesized message).
    Local(Bytes),
    /// A ReadyForQuery pgcache sends itself, with the transaction status current when it is
    /// emitted.
    LocalReady,
}

/// A result being teed into the cache.
#[derive(Debug)]
pub struct Fill {
    pub key: Key,
    pub rule: Arc<Rule>,
    pub deps: Vec<Dependency>,
    pub tables: Vec<Relation>,
    pub sql: Arc<str>,
    pub flight: Option<Flight>,
    pub limit: u64,
    pub row_description: Option<Bytes>,
    pub body: BytesMut,
    pub rows: u64,
    pub aborted: bool,
}

impl Fill {
    /// A fill for `rule`, keeping results up to its `max_entry_bytes` (else `default_limit`).
    pub fn new(
        key: Key,
        rule: Arc<Rule>,
        deps: Vec<Dependency>,
        tables: Vec<Relation>,
        sql: Arc<str>,
        flight: Option<Flight>,
        default_limit: u64,
    ) -> Self {
        Fill {
            key,
            limit: rule.max_entry_bytes.unwrap_or(default_limit),
            rule,
            deps,
            tables,
            sql,
            flight,
            row_description: None,
            body: BytesMut::new(),
            rows: 0,
            aborted: false,
        }
    }

    /// A DataRow.
    pub fn add_row(&mut self, frame: &[u8]) {
        self.rows += 1;
        self.add_body(frame);
    }

    /// A DataRow or the CommandComplete.
    pub fn add_body(&mut self, frame: &[u8]) {
        if self.aborted {
            return;
        }
        if (self.body.len() + frame.len()) as u64 > self.limit {
            // Too large to keep: it streams through untouched and is not cached.
            self.aborted = true;
            self.body = BytesMut::new();
            return;
        }
        self.body.extend_from_slice(frame);
    }

    /// Stores the result (unless aborted, too large, or raced by a write); only then are the
    /// sessions waiting on this key's flight woken, so they find the entry.
    pub fn finish(mut self, store: &crate::cache::Store) -> bool {
        let flight = self.flight.take();
        let stored = match self.into_entry() {
            Some((key, entry)) => store.insert(key, entry),
            None => false,
        };
        drop(flight);
        stored
    }

    fn into_entry(self) -> Option<(Key, Entry)> {
        if self.aborted {
            return None;
        }
        let entry = Entry {
            rule: self.rule,
            row_description: self.row_description.unwrap_or_default(),
            body: self.body.freeze(),
            rows: self.rows,
            created: Instant::now(),
            deps: self.deps,
            tables: self.tables,
            sql: self.sql,
            refreshing: AtomicBool::new(false),
            hits: AtomicU64::new(0),
        };
        Some((self.key, entry))
    }
}

/// The items owed, and the fills their answers feed.
#[derive(Debug, Default)]
pub struct Pipeline {
    pub items: VecDeque<Item>,
    fills: Vec<Option<Fill>>,
}

impl Pipeline {
    pub fn add_fill(&mut self, fill: Fill) -> usize {
        self.fills.push(Some(fill));
        self.fills.len() - 1
    }

    pub fn fill_mut(&mut self, id: usize) -> Option<&mut Fill> {
        self.fills.get_mut(id).and_then(Option::as_mut)
    }

    pub fn take_fill(&mut self, id: usize) -> Option<Fill> {
        let f = self.fills.get_mut(id).and_then(Option::take);
        if self.fills.iter().all(Option::is_none) {
            self.fills.clear();
        }
        f
    }

    /// Whether any answer from the backend is still expected.
    pub fn awaits_backend(&self) -> bool {
        self.items.iter().any(|i| matches!(i, Item::Backend(_)))
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// After an error in the extended protocol: drops every item up to (not including) the
    /// next Sync, as the backend skips those messages. Returns the fills they held, to abort.
    pub fn skip_to_sync(&mut self) -> Vec<usize> {
        let mut fills = Vec::new();
        while let Some(item) = self.items.front() {
            match item {
                Item::Backend(f) if f.expect == Expect::Sync || f.expect == Expect::Query => break,
                Item::LocalReady => break,
                _ => {
                    if let Some(Item::Backend(f)) = self.items.pop_front() {
                        fills.extend(f.fill);
                    }
                }
            }
        }
        fills
    }
}

/// What happened to one backend frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    /// Pass it to the client.
    pub visible: bool,
    /// It completed the item at the head of the pipeline (local answers may follow now).
    pub completed: bool,
}

impl Flow {
    /// Emits the local answers at the head of the pipeline.
    pub(super) fn emit_locals(&mut self, status: TransactionStatus, out: &mut Vec<Out>) {
        loop {
            match self.pipeline.items.front() {
                Some(Item::Local(_)) => {
                    if let Some(Item::Local(b)) = self.pipeline.items.pop_front() {
                        out.push(Out::Bytes(b));
                    }
                }
                Some(Item::LocalReady) => {
                    self.pipeline.items.pop_front();
                    let mut b = BytesMut::new();
                    be::ready_for_query(status, &mut b);
                    out.push(Out::Bytes(b.freeze()));
                }
                _ => return,
            }
        }
    }

    /// Routes one backend frame (`raw`, header included) against the head of the pipeline.
    /// `status` is the transaction status after this frame.
    pub(super) fn route(
        &mut self,
        ctx: &Arc<Context>,
        params: &mut BTreeMap<String, String>,
        status: TransactionStatus,
        raw: &[u8],
    ) -> Result<Routed, Truncated> {
        let (tag, body) = (raw[0], &raw[5..]);
        let pass = Routed { visible: true, completed: false };
        // Messages that may arrive at any time, whatever is pending.
        match tag {
            be::PARAMETER_STATUS => {
                let (name, value) = be::parameter_status(body)?;
                params.insert(name, value);
                // A reported setting changed (a SET, or the server's configuration reloaded):
                // the settings the key is built from must be read again.
                self.settings.forget();
                return Ok(pass);
            }
            be::NOTIFICATION_RESPONSE => return Ok(pass),
            be::NOTICE_RESPONSE => {
                // A result that raised a notice cannot be replayed faithfully from the cache.
                if let Some(Item::Backend(head)) = self.pipeline.items.front()
                    && let Some(id) = head.fill
                {
                    self.pipeline.take_fill(id);
                }
                return Ok(pass);
            }
            _ => {}
        }
        let Some(Item::Backend(head)) = self.pipeline.items.front() else {
            // Nothing expected: a FATAL because the server is shutting down, or something
            // new. If the session can move to another backend when this one closes, the
            // client need not hear about it.
            if tag == be::ERROR_RESPONSE && self.movable().is_ok() {
                return Ok(Routed { visible: false, completed: false });
            }
            return Ok(pass);
        };
        let (visible, expect, fill, probe) = (!head.hidden, head.expect, head.fill, head.probe);
        let done = |completed| Ok(Routed { visible, completed });
        match tag {
            be::ERROR_RESPONSE => {
                // An injected request that fails makes the backend skip the client's own
                // messages up to Sync: the client must see why. Only the settings probe (a
                // request of pgcache's own between the client's) stays silent.
                let visible = visible || !probe;
                let done = |completed| Ok(Routed { visible, completed });
                if let Some(id) = fill {
                    self.pipeline.take_fill(id);
                }
                if probe {
                    self.probe_rows.clear();
                }
                if matches!(expect, Expect::Query | Expect::Sync) {
                    if let Some(Item::Backend(head)) = self.pipeline.items.front_mut() {
                        head.failed = true;
                    }
                    return done(false);
                }
                // The backend now skips to Sync, and so do pgcache's own answers.
                self.observed(ctx, true);
                self.pipeline.items.pop_front();
                for id in self.pipeline.skip_to_sync() {
                    self.pipeline.take_fill(id);
                }
                done(true)
            }
            be::PARSE_COMPLETE | be::BIND_COMPLETE | be::CLOSE_COMPLETE => {
                self.pipeline.items.pop_front();
                done(true)
            }
            be::PARAMETER_DESCRIPTION => done(false),
            be::ROW_DESCRIPTION | be::NO_DATA => {
                if let Some(f) = fill.and_then(|id| self.pipeline.fill_mut(id)) {
                    f.row_description = Some(Bytes::copy_from_slice(raw));
                }
                if matches!(expect, Expect::DescribePortal | Expect::DescribeStatement) {
                    self.pipeline.items.pop_front();
                    return done(true);
                }
                done(false)
            }
            be::DATA_ROW => {
                let mut visible = visible;
                if let Some(Item::Backend(head)) = self.pipeline.items.front_mut() {
                    if let Some(o) = head.observe.as_mut() {
                        o.rows += 1;
                    }
                    if let Some(limit) = head.row_limit.as_mut() {
                        limit.seen += 1;
                        visible &= limit.seen <= limit.client;
                    }
                }
                if probe {
                    self.probe_rows.push(be::data_row_text(body)?);
                } else if let Some(f) = fill.and_then(|id| self.pipeline.fill_mut(id)) {
                    f.add_row(raw);
                }
                Ok(Routed { visible, completed: false })
            }
            be::COMMAND_COMPLETE => {
                // Outside a transaction block the statement has committed now. Inside one, its
                // invalidations wait for the transaction to end (a rollback discards them).
                if status == TransactionStatus::Idle
                    && let Some(Item::Backend(head)) = self.pipeline.items.front()
                {
                    effects::apply(ctx, &self.database, &head.effects, false);
                }
                if let Some(id) = fill
                    && let Some(mut f) = self.pipeline.take_fill(id)
                {
                    f.add_body(raw);
                    f.finish(&ctx.store);
                }
                if expect == Expect::Execute {
                    self.observed(ctx, false);
                    let head = self.pipeline.items.pop_front();
                    if let Some(Item::Backend(Forwarded { row_limit: Some(l), .. })) = head
                        && l.seen >= l.client
                    {
                        // The client's limit was reached: Postgres would have suspended here.
                        let mut s = BytesMut::new();
                        be::portal_suspended(&mut s);
                        self.pipeline.items.push_front(Item::Local(s.freeze()));
                        return Ok(Routed { visible: false, completed: true });
                    }
                    return done(true);
                }
                done(false)
            }
            be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED => {
                if let Some(id) = fill {
                    self.pipeline.take_fill(id);
                }
                if expect == Expect::Execute {
                    self.observed(ctx, false);
                    self.pipeline.items.pop_front();
                    return done(true);
                }
                done(false)
            }
            be::COPY_IN_RESPONSE if expect == Expect::Execute => {
                // In copy-in mode the backend ignores Sync and Flush (Postgres docs, "COPY
                // Operations"): a Sync the client sent with this Execute gets no answer; the
                // client sends another after CopyDone.
                if let Some(Item::Backend(next)) = self.pipeline.items.get(1)
                    && next.expect == Expect::Sync
                    && !next.hidden
                {
                    self.pipeline.items.remove(1);
                }
                done(false)
            }
            be::READY_FOR_QUERY => {
                if let Some(Item::Backend(head)) = self.pipeline.items.pop_front() {
                    if let Some(o) = &head.observe {
                        ctx.stats.record(o, 0, head.failed);
                    }
                    if status == TransactionStatus::Idle {
                        effects::apply(ctx, &self.database, &head.effects, false);
                    }
                }
                if probe {
                    self.finish_probe();
                }
                if status == TransactionStatus::Idle {
                    self.end_transaction(ctx);
                }
                done(true)
            }
            _ => done(false),
        }
    }

    /// Records the observation of the item at the head, if it has one.
    fn observed(&mut self, ctx: &Context, error: bool) {
        if let Some(Item::Backend(head)) = self.pipeline.items.front_mut()
            && let Some(o) = head.observe.take()
        {
            ctx.stats.record(&o, 0, error);
        }
    }

    fn finish_probe(&mut self) {
        let rows = std::mem::take(&mut self.probe_rows);
        if !rows.is_empty() {
            self.settings.learn(rows);
        }
        self.probe = Some(if self.settings.known() { Probe::Done } else { Probe::Failed });
    }

    /// The transaction (explicit or implicit) ended: its writes are invalidated, now that they
    /// are committed (a ROLLBACK cleared them when it was sent), and settings it changed may
    /// have reverted.
    fn end_transaction(&mut self, ctx: &Arc<Context>) {
        let effects = std::mem::take(&mut self.tx_effects);
        effects::apply(ctx, &self.database, &effects, true);
        self.wrote = false;
        self.portals.clear();
        if std::mem::take(&mut self.settings_changed_in_tx) {
            self.settings.forget();
        }
    }
}
