//! The extended query protocol. Messages are collected up to their Sync (or Flush) and the
//! batch is planned as a unit, because answers must come back in order and an error makes
//! the backend skip to the Sync:
//!
//! 1. simulate the client's statements and portals through the batch; for every Execute ask
//!    the relay for its write effects ([`Need::Effects`]) and, when it may be answered from the
//!    cache — a single SELECT on the unnamed portal, nothing written, no settings changed and
//!    no transaction statement before it in the batch, and with a row limit only if its portal
//!    cannot be resumed — for a decision ([`Need::Decision`]);
//! 2. a Bind whose portal is only described and executed from the cache need not reach the
//!    backend, nor an unnamed Parse whose every Bind is like that: pgcache answers
//!    ParseComplete/BindComplete itself and re-sends them later if the backend ever needs that
//!    statement or portal ([`virtuals`]);
//! 3. emit ([`emit`]): forwarded messages become pipeline items, cached answers local items; a
//!    batch answered entirely from the cache gets its ReadyForQuery without touching the
//!    backend.

mod emit;
mod virtuals;

use std::sync::Arc;

use bytes::Bytes;
use smallvec::SmallVec;

use crate::cache::Entry;
use crate::metrics::Outcome;
use crate::policy::Reason;
use crate::protocol::Frame;
use crate::protocol::backend::TransactionStatus;
use crate::protocol::frontend::{self as fe, BindParts, Named, Target};
use crate::query::{Classified, Kind};
use crate::stats::Observation;

use super::Core;
use super::effect::{Step, invalidates_nothing, may_change_settings};
use super::flow::{Parked, Statement};
use super::pipeline::Fill;
use super::plan::Plan;

/// One extended-protocol message, its parts sliced from its frame. A Bind's parts are shared
/// with the [`Need`]s that carry them (a clone is a count, not a copy).
#[derive(Debug, Clone)]
pub(crate) enum Msg {
    Parse { name: Bytes, sql: Bytes, param_types: Vec<u32> },
    Bind(Arc<BindParts>),
    Describe(Target, Bytes),
    Execute { portal: Bytes, max_rows: i32 },
    Close(Target, Bytes),
    Sync,
    Flush,
}

impl Msg {
    fn decode(f: &Frame) -> Option<Msg> {
        let raw = f.raw();
        let named = |n: Named<'_>| (n.target, raw.slice_ref(n.name));
        Some(match f.tag() {
            fe::PARSE => {
                let p = fe::parse(f.body()).ok()?;
                Msg::Parse { name: raw.slice_ref(p.name), sql: raw.slice_ref(p.sql), param_types: p.param_types }
            }
            fe::BIND => Msg::Bind(Arc::new(BindParts::decode(raw).ok()?)),
            fe::DESCRIBE => {
                let (t, n) = named(fe::named(f.body()).ok()?);
                Msg::Describe(t, n)
            }
            fe::EXECUTE => {
                let e = fe::execute(f.body()).ok()?;
                Msg::Execute { portal: raw.slice_ref(e.portal), max_rows: e.max_rows }
            }
            fe::CLOSE => {
                let (t, n) = named(fe::named(f.body()).ok()?);
                Msg::Close(t, n)
            }
            fe::SYNC => Msg::Sync,
            fe::FLUSH => Msg::Flush,
            _ => return None,
        })
    }
}

/// What one Execute was planned to be.
#[derive(Debug)]
pub(crate) enum Exec {
    Hit(Arc<Entry>),
    /// A fill not yet in the pipeline (while planning), then its id there.
    Fill(Box<Fill>),
    Filling(usize),
    Forward,
}

/// Up to this many messages, a batch is planned without allocating its per-message tables
/// (a prepared statement's Bind, Execute and Sync fit).
const SHORT_BATCH: usize = 4;

/// Facts about some messages of a batch, by message index. Batches are short, so this is a
/// vector rather than a map, kept inline for a short batch: planning one allocates little and
/// hashes nothing.
#[derive(Debug)]
pub(crate) struct Slots<T>(SmallVec<[Option<T>; SHORT_BATCH]>);

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Slots(SmallVec::new())
    }
}

impl<T> Slots<T> {
    fn insert(&mut self, i: usize, v: T) {
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(v);
    }

    fn has(&self, i: usize) -> bool {
        self.get(&i).is_some()
    }

    fn get(&self, i: &usize) -> Option<&T> {
        self.0.get(*i)?.as_ref()
    }

    fn get_mut(&mut self, i: &usize) -> Option<&mut T> {
        self.0.get_mut(*i)?.as_mut()
    }

    fn remove(&mut self, i: &usize) -> Option<T> {
        self.0.get_mut(*i)?.take()
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.0.iter().enumerate().filter_map(|(i, v)| Some((i, v.as_ref()?)))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut().flatten()
    }
}

/// Statements or portals by name as a batch leaves them (`None`: closed). A batch names few,
/// so a vector searched from the end.
#[derive(Debug, Default)]
struct Names(SmallVec<[(Bytes, Option<Arc<Statement>>); 2]>);

impl Names {
    fn get(&self, name: &[u8]) -> Option<&Option<Arc<Statement>>> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    fn insert(&mut self, name: Bytes, st: Option<Arc<Statement>>) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = st,
            None => self.0.push((name, st)),
        }
    }
}

/// The plan for a batch, index-aligned with its messages.
#[derive(Debug, Default)]
pub(crate) struct BatchPlan {
    /// Statements created by Parse messages.
    parsed: Slots<Arc<Statement>>,
    /// Per Execute: its plan and its writes.
    exec: Slots<(Exec, Vec<Step>)>,
    /// Per Execute: what the statistics will record.
    observe: Slots<Box<Observation>>,
    /// The unnamed-portal Bind each Execute/Describe of the unnamed portal refers to.
    bound_by: Slots<usize>,
    /// The Parses and Binds that need not reach the backend ([`virtuals`]).
    virtual_parse: Slots<()>,
    virtual_bind: Slots<()>,
    /// The client's unnamed statement when the batch began.
    unnamed_at_start: Option<Arc<Statement>>,
    /// The statement a Bind or a Describe of a statement names at that point of the batch,
    /// and the statement a named Parse would replace (Postgres refuses such a Parse).
    stmt_of: Slots<Arc<Statement>>,
}

/// A fact the planner needs from the relay.
#[derive(Debug)]
pub enum Need {
    /// The write effects of the statements this Execute runs: the relay looks them up, notes
    /// each statement ([`Core::note`]) and hands them back ([`Planner::effects`]). `bind` is
    /// the portal's Bind when it is in this batch and the statement pins key values (a write
    /// to `WHERE id = $1` invalidates by the value bound).
    Effects { statement: Arc<Statement>, bind: Option<Arc<BindParts>> },
    /// Whether this Execute is answered from the cache, filled, or forwarded
    /// ([`Planner::decision`]).
    /// The statement is a single SELECT ([`Statement::select`]).
    Decision { statement: Arc<Statement>, bind: Arc<BindParts>, max_rows: i32 },
}

/// The Execute being planned, waiting for a fact.
#[derive(Debug)]
enum Waiting {
    Effects { at: usize, statement: Option<Arc<Statement>> },
    Decision { at: usize, steps: Vec<Step> },
}

/// A batch being planned. The relay drives it: [`Planner::next`] until it is done, answering
/// every [`Need`], then [`Planner::finish`].
#[derive(Debug)]
pub struct Planner {
    frames: Vec<Frame>,
    msgs: SmallVec<[Msg; SHORT_BATCH]>,
    /// The batch ends in Sync: its Executes may use the cache.
    cacheable: bool,
    at: usize,
    waiting: Option<Waiting>,
    stmts: Names,
    portals: Names,
    unnamed_bind: Option<usize>,
    unnamed_executed: bool,
    write_seen: bool,
    /// Settings changed earlier in the batch are not known until it has run.
    settings_seen: bool,
    /// A transaction statement earlier in the batch (portals may outlive the Sync).
    tx_seen: bool,
    plan: BatchPlan,
}

/// What [`Planner::decision`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decided {
    Planned,
    /// The settings must be read first: the batch was parked and the probe sent.
    Parked,
}

impl Core {
    /// Starts planning the collected batch (`None`: a message pgcache cannot read, in which
    /// case the batch was sent as it is). `classify` classifies a Parse's SQL.
    pub fn begin_batch(&mut self, classify: &dyn Fn(&str) -> Arc<Vec<Classified>>) -> Option<Planner> {
        let frames = std::mem::take(&mut self.flow.batch);
        let Some(msgs) = frames.iter().map(Msg::decode).collect::<Option<SmallVec<_>>>() else {
            // A message pgcache cannot read: Postgres will report it. Send as is.
            self.forward_raw(frames);
            return None;
        };
        let cacheable = frames.last().is_some_and(|f| f.tag() == fe::SYNC);
        let mut plan =
            BatchPlan { unnamed_at_start: self.flow.statements.get(&b""[..]).cloned(), ..Default::default() };
        for (i, m) in msgs.iter().enumerate() {
            if let Msg::Parse { sql, param_types, .. } = m {
                let classified = match std::str::from_utf8(sql) {
                    Ok(sql) => classify(sql),
                    Err(_) => Arc::new(vec![Classified::unparseable()]),
                };
                let sql = Arc::from(String::from_utf8_lossy(sql).as_ref());
                let st = Statement::new(sql, param_types.clone(), frames[i].clone(), classified);
                plan.parsed.insert(i, Arc::new(st));
            }
        }
        Some(Planner {
            frames,
            msgs,
            cacheable,
            at: 0,
            waiting: None,
            stmts: Names::default(),
            portals: Names::default(),
            unnamed_bind: None,
            unnamed_executed: false,
            write_seen: false,
            settings_seen: false,
            tx_seen: false,
            plan,
        })
    }
}

impl Planner {
    fn statement(&self, core: &Core, name: &[u8]) -> Option<Arc<Statement>> {
        match self.stmts.get(name) {
            Some(s) => s.clone(),
            None => core.flow.statements.get(name).cloned(),
        }
    }

    /// Simulates up to the next fact needed; `None` once the whole batch is planned. Every
    /// [`Need`] is answered ([`Planner::effects`], [`Planner::decision`]) before the next call.
    pub fn next(&mut self, core: &mut Core) -> Option<Need> {
        debug_assert!(self.waiting.is_none(), "every need is answered before the next");
        while self.at < self.msgs.len() {
            let i = self.at;
            self.at += 1;
            match &self.msgs[i] {
                Msg::Parse { name, .. } => {
                    if !name.is_empty()
                        && let Some(existing) = self.statement(core, name)
                    {
                        // Postgres refuses it (42P05): the name keeps its statement.
                        self.plan.stmt_of.insert(i, existing);
                        continue;
                    }
                    let st = self.plan.parsed.get(&i).cloned();
                    self.stmts.insert(name.clone(), st);
                }
                Msg::Describe(Target::Statement, name) => {
                    if let Some(st) = self.statement(core, name) {
                        self.plan.stmt_of.insert(i, st);
                    }
                }
                Msg::Bind(b) => {
                    let st = self.statement(core, &b.statement);
                    if let Some(st) = &st {
                        self.plan.stmt_of.insert(i, st.clone());
                    }
                    if b.portal.is_empty() {
                        self.unnamed_bind = Some(i);
                        self.unnamed_executed = false;
                    }
                    self.portals.insert(b.portal.clone(), st);
                }
                Msg::Close(Target::Statement, name) => {
                    self.stmts.insert(name.clone(), None);
                }
                Msg::Close(Target::Portal, name) => {
                    if name.is_empty() {
                        self.unnamed_bind = None;
                    }
                    self.portals.insert(name.clone(), None);
                }
                Msg::Describe(Target::Portal, name) if name.is_empty() => {
                    if let Some(bi) = self.unnamed_bind {
                        self.plan.bound_by.insert(i, bi);
                    }
                }
                Msg::Execute { portal, .. } => {
                    let st = match self.portals.get(portal) {
                        Some(s) => s.clone(),
                        None => core.flow.portals.get(portal).cloned(),
                    };
                    self.waiting = Some(Waiting::Effects { at: i, statement: st.clone() });
                    match st {
                        Some(st) => {
                            let pinned = st.classified.iter().any(|c| c.point.is_some());
                            let bind = if pinned { bind_of(&self.msgs[..i], portal) } else { None };
                            return Some(Need::Effects { statement: st, bind });
                        }
                        None => {
                            let steps = vec![Step::unknown("execute of a portal pgcache did not see bound")];
                            if let Some(need) = self.effects(core, steps) {
                                return Some(need);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The effects of the Execute waiting for them (its statements already noted); may ask
    /// for a decision next.
    pub fn effects(&mut self, core: &mut Core, steps: Vec<Step>) -> Option<Need> {
        let Some(Waiting::Effects { at: i, statement: st }) = self.waiting.take() else { return None };
        let Msg::Execute { ref portal, max_rows } = self.msgs[i] else { return None };
        let mut observe = st.as_ref().map(|st| {
            let mut o = Observation::new(core.flow.database.clone(), st.classified.clone(), Outcome::Passthrough);
            o.reason = Some(match st.select() {
                Some(_) if self.settings_seen => Reason::SettingsUnknown,
                Some(c) => c.never_cache.map_or(Reason::MayWrite, Reason::Statement),
                None => Reason::Statement("not a plain SELECT"),
            });
            o
        });
        let mut need = None;
        if portal.is_empty()
            && let Some(bi) = self.unnamed_bind
        {
            self.plan.bound_by.insert(i, bi);
            // A row-limited Execute is answered exactly only if its portal cannot be resumed:
            // the implicit transaction ends at the Sync, and nothing in the batch uses the
            // portal again.
            let resumable = max_rows > 0
                && (core.tracker.status != TransactionStatus::Idle || self.tx_seen || used_later(&self.msgs, i));
            let plain =
                !self.unnamed_executed && !self.write_seen && !self.settings_seen && invalidates_nothing(&steps);
            if resumable && let Some(o) = observe.as_mut() {
                o.reason = Some(Reason::RowLimit);
            }
            if let (true, Some(st), Msg::Bind(b)) = (self.cacheable && plain && !resumable, &st, &self.msgs[bi])
                && st.select().is_some()
            {
                need = Some(Need::Decision { statement: st.clone(), bind: b.clone(), max_rows });
            }
            self.unnamed_executed = true;
        }
        self.write_seen |= !invalidates_nothing(&steps) || st.as_ref().is_none_or(|s| s.select().is_none());
        self.settings_seen |= st.as_ref().is_none_or(|s| s.classified.iter().any(may_change_settings));
        self.tx_seen |= st.as_ref().is_none_or(|s| s.classified.iter().any(|c| matches!(c.kind, Kind::Transaction(_))));
        if let Some(o) = observe {
            self.plan.observe.insert(i, Box::new(o));
        }
        match need {
            Some(n) => {
                self.waiting = Some(Waiting::Decision { at: i, steps });
                Some(n)
            }
            None => {
                self.plan.exec.insert(i, (Exec::Forward, steps));
                None
            }
        }
    }

    /// The decision for the Execute waiting for one. [`Plan::Probe`] parks the batch (it is
    /// planned again once the probe has answered).
    pub fn decision(&mut self, core: &mut Core, plan: Plan) -> Decided {
        let Some(Waiting::Decision { at: i, steps }) = self.waiting.take() else { return Decided::Planned };
        if let Some(o) = self.plan.observe.get_mut(&i) {
            plan.observe(o);
        }
        let exec = match plan {
            Plan::Hit { entry, .. } => Exec::Hit(entry),
            Plan::Fill(fill) => Exec::Fill(fill),
            Plan::Forward(..) => Exec::Forward,
            Plan::Probe => {
                // Nothing planned so far has been sent or changed beyond what planning again
                // redoes the same way: no statement before this one in the batch wrote or
                // changed settings, or this one would not have been a candidate.
                core.flow.batch = std::mem::take(&mut self.frames);
                core.start_probe();
                core.flow.parked = Some(Parked::Batch);
                return Decided::Parked;
            }
        };
        self.plan.exec.insert(i, (exec, steps));
        Decided::Planned
    }

    /// Ends the planning: finds what need not reach the backend, updates the client's view of
    /// its statements and portals, and sends the batch.
    pub fn finish(mut self, core: &mut Core) {
        virtuals::find(&self.msgs, &mut self.plan);
        // The client's view of its statements and portals after this batch.
        for (name, st) in std::mem::take(&mut self.stmts).0 {
            match st {
                Some(st) => core.flow.statements.insert(name, st),
                None => core.flow.statements.remove(&name),
            };
        }
        for (name, st) in std::mem::take(&mut self.portals).0 {
            match st {
                Some(st) => core.flow.portals.insert(name, st),
                None => core.flow.portals.remove(&name),
            };
        }
        emit::emit(core, &self.frames, &self.msgs, self.plan);
        core.flush_locals();
        // The next batch is collected in this one's vector, if it is a short one's (a long
        // pipeline's capacity is not kept for the rest of the session).
        let mut frames = self.frames;
        frames.clear();
        if core.flow.batch.is_empty() && frames.capacity() <= 4 * SHORT_BATCH {
            core.flow.batch = frames;
        }
    }
}

/// The Bind that made `portal` what it is at the end of `msgs`, if there is one.
fn bind_of(msgs: &[Msg], portal: &[u8]) -> Option<Arc<BindParts>> {
    for m in msgs.iter().rev() {
        match m {
            Msg::Bind(b) if b.portal == portal => return Some(b.clone()),
            Msg::Close(Target::Portal, name) if name == portal => return None,
            _ => {}
        }
    }
    None
}

/// Whether the unnamed portal Executed at `i` is used again later in the batch (before it is
/// bound anew or closed).
fn used_later(msgs: &[Msg], i: usize) -> bool {
    for m in &msgs[i + 1..] {
        match m {
            Msg::Bind(b) if b.portal.is_empty() => return false,
            Msg::Close(Target::Portal, name) if name.is_empty() => return false,
            Msg::Execute { portal, .. } if portal.is_empty() => return true,
            Msg::Describe(Target::Portal, name) if name.is_empty() => return true,
            _ => {}
        }
    }
    false
}
