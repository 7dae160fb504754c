//! The extended query protocol. Messages are collected up to their Sync (or Flush) and the
//! batch is planned as a unit, because answers must come back in order and an error makes
//! the backend skip to the Sync:
//!
//! 1. simulate the client's statements and portals through the batch, note every Execute's
//!    writes, and decide each cacheable Execute (a single SELECT on the unnamed portal, no row
//!    limit, no write before it in the batch);
//! 2. a Bind whose portal is only described and executed from the cache need not reach the
//!    backend, nor an unnamed Parse whose every Bind is like that — pgcache answers
//!    ParseComplete/BindComplete itself and re-sends them later if the backend ever needs
//!    that statement or portal;
//! 3. emit: forwarded messages become pipeline items, cached answers local items; a batch
//!    answered entirely from the cache gets its ReadyForQuery without touching the backend.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::metrics::Outcome;
use crate::policy::Reason;
use crate::protocol::Frame;
use crate::protocol::backend::{self as be, TransactionStatus};
use crate::protocol::frontend::{self as fe, Bind, Execute, Named, Parse, Target};
use crate::query::Classified;
use crate::stats::Observation;

use super::decide::{Plan, Request};
use super::effects::{Effect, may_change_settings};
use super::flow::{Parked, Statement};
use super::pipeline::Fill;
use super::pipeline::{Expect, Forwarded, Item, RowLimit};
use super::relay::Relay;
use crate::frontend::SessionError;

enum Msg<'f> {
    Parse(Parse<'f>),
    Bind(Bind<'f>),
    Describe(Named<'f>),
    Execute(Execute<'f>),
    Close(Named<'f>),
    Sync,
    Flush,
}

fn decode(f: &Frame) -> Option<Msg<'_>> {
    let b = f.body();
    Some(match f.tag() {
        fe::PARSE => Msg::Parse(fe::parse(b).ok()?),
        fe::BIND => Msg::Bind(fe::bind(b).ok()?),
        fe::DESCRIBE => Msg::Describe(fe::named(b).ok()?),
        fe::EXECUTE => Msg::Execute(fe::execute(b).ok()?),
        fe::CLOSE => Msg::Close(fe::named(b).ok()?),
        fe::SYNC => Msg::Sync,
        fe::FLUSH => Msg::Flush,
        _ => return None,
    })
}

/// What one Execute was planned to be.
enum Exec {
    Hit(Arc<crate::cache::Entry>),
    /// A fill not yet in the pipeline (while planning), then its id there.
    Fill(Box<Fill>),
    Filling(usize),
    Forward,
}

/// The plan for a batch, index-aligned with its messages.
#[derive(Default)]
struct BatchPlan {
    /// Statements created by Parse messages.
    parsed: HashMap<usize, Arc<Statement>>,
    /// Per Execute: its plan and its writes.
    exec: HashMap<usize, (Exec, Vec<Effect>)>,
    /// Per Execute: what the statistics will record.
    observe: HashMap<usize, Observation>,
    /// The unnamed-portal Bind each Execute/Describe of the unnamed portal refers to.
    bound_by: HashMap<usize, usize>,
    virtual_parse: Vec<bool>,
    virtual_bind: Vec<bool>,
    /// The client's unnamed statement when the batch began.
    unnamed_at_start: Option<Arc<Statement>>,
}

/// Rows asked for beyond a client's row limit when filling, so that results a little longer
/// than the limit can still be stored whole.
const ROW_LIMIT_SLACK: i32 = 1000;

/// Whether the unnamed portal Executed at `i` is used again later in the batch (before it is
/// bound anew or closed).
fn used_later(msgs: &[Msg<'_>], i: usize) -> bool {
    for m in &msgs[i + 1..] {
        match m {
            Msg::Bind(b) if b.portal.is_empty() => return false,
            Msg::Close(Named { target: Target::Portal, name: b"" }) => return false,
            Msg::Execute(e) if e.portal.is_empty() => return true,
            Msg::Describe(Named { target: Target::Portal, name: b"" }) => return true,
            _ => {}
        }
    }
    false
}

/// One message pgcache answers with itself (ParseComplete, BindComplete).
fn encoded(put: fn(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    put(&mut b);
    b.freeze()
}

impl Relay<'_> {
    pub(super) async fn on_extended(&mut self, frame: Frame) -> Result<(), SessionError> {
        let tag = frame.tag();
        self.flow.batch.push(frame);
        if tag == fe::SYNC || tag == fe::FLUSH {
            self.ctx.wait_while_paused().await;
            self.run_batch().await?;
        }
        Ok(())
    }

    /// Plans and sends the collected batch.
    pub(super) async fn run_batch(&mut self) -> Result<(), SessionError> {
        let frames = std::mem::take(&mut self.flow.batch);
        let Some(msgs) = frames.iter().map(decode).collect::<Option<Vec<_>>>() else {
            // A message pgcache cannot read: Postgres will report it. Send as is.
            return self.forward_raw(frames);
        };
        let cacheable = frames.last().is_some_and(|f| f.tag() == fe::SYNC);
        match self.plan(&frames, &msgs, cacheable).await? {
            Some(plan) => {
                self.emit(&frames, &msgs, plan);
                self.flush_locals();
            }
            None => {
                // The settings must be read first: the batch waits for the probe's answer.
                drop(msgs);
                self.flow.batch = frames;
                self.start_probe()?;
                self.flow.parked = Some(Parked::Batch);
            }
        }
        Ok(())
    }

    fn statement(&self, overlay: &HashMap<Vec<u8>, Option<Arc<Statement>>>, name: &[u8]) -> Option<Arc<Statement>> {
        match overlay.get(name) {
            Some(s) => s.clone(),
            None => self.flow.statements.get(name).cloned(),
        }
    }

    /// Phase 1 and 2: simulate, decide, and find what need not reach the backend. `None` when
    /// a decision needs the session's settings read first (nothing was sent or changed that
    /// planning again would not redo the same way).
    async fn plan(
        &mut self,
        frames: &[Frame],
        msgs: &[Msg<'_>],
        cacheable: bool,
    ) -> Result<Option<BatchPlan>, SessionError> {
        let mut plan = BatchPlan {
            virtual_parse: vec![false; msgs.len()],
            virtual_bind: vec![false; msgs.len()],
            unnamed_at_start: self.flow.statements.get(&b""[..]).cloned(),
            ..Default::default()
        };
        let mut stmts: HashMap<Vec<u8>, Option<Arc<Statement>>> = HashMap::new();
        let mut portals: HashMap<Vec<u8>, Option<Arc<Statement>>> = HashMap::new();
        let mut unnamed_bind: Option<usize> = None;
        let mut unnamed_executed = false;
        let mut write_seen = false;
        // Settings changed earlier in the batch are not known until it has run.
        let mut settings_seen = false;
        // A transaction statement earlier in the batch (portals may outlive the Sync).
        let mut tx_seen = false;
        for (i, m) in msgs.iter().enumerate() {
            match m {
                Msg::Parse(p) => {
                    let classified = match std::str::from_utf8(p.sql) {
                        Ok(sql) => self.ctx.classifier.classify(sql),
                        Err(_) => Arc::new(vec![Classified::unparseable()]),
                    };
                    let st = Arc::new(Statement {
                        sql: Arc::from(String::from_utf8_lossy(p.sql).as_ref()),
                        param_types: p.param_types.clone(),
                        parse: frames[i].clone(),
                        classified,
                    });
                    stmts.insert(p.name.to_vec(), Some(st.clone()));
                    plan.parsed.insert(i, st);
                }
                Msg::Bind(b) => {
                    portals.insert(b.portal.to_vec(), self.statement(&stmts, b.statement));
                    if b.portal.is_empty() {
                        unnamed_bind = Some(i);
                        unnamed_executed = false;
                    }
                }
                Msg::Close(Named { target: Target::Statement, name }) => {
                    stmts.insert(name.to_vec(), None);
                }
                Msg::Close(Named { target: Target::Portal, name }) => {
                    portals.insert(name.to_vec(), None);
                    if name.is_empty() {
                        unnamed_bind = None;
                    }
                }
                Msg::Describe(Named { target: Target::Portal, name: b"" }) => {
                    if let Some(bi) = unnamed_bind {
                        plan.bound_by.insert(i, bi);
                    }
                }
                Msg::Execute(e) => {
                    let st = match portals.get(e.portal) {
                        Some(s) => s.clone(),
                        None => self.flow.portals.get(e.portal).cloned(),
                    };
                    let mut effects = Vec::new();
                    match &st {
                        Some(st) => {
                            for c in st.classified.iter() {
                                effects.extend(self.note(c).await);
                            }
                        }
                        None => effects.push(Effect::Unknown("execute of a portal pgcache did not see bound")),
                    }
                    let mut exec = Exec::Forward;
                    let mut observe = st.as_ref().map(|st| {
                        let mut o = Observation::new(st.classified.clone(), Outcome::Passthrough);
                        o.reason = Some(match st.select() {
                            Some(_) if settings_seen => Reason::SettingsUnknown,
                            Some(c) => c.never_cache.map_or(Reason::MayWrite, Reason::Statement),
                            None => Reason::Statement("not a plain SELECT"),
                        });
                        o
                    });

                    if e.portal.is_empty()
                        && let Some(bi) = unnamed_bind
                    {
                        plan.bound_by.insert(i, bi);
                        let select = st.as_ref().and_then(|s| s.select().cloned());
                        // A row-limited Execute is answered exactly only if its portal cannot
                        // be resumed: the implicit transaction ends at the Sync, and nothing in
                        // the batch uses the portal again.
                        let resumable = e.max_rows > 0
                            && (self.track.status != TransactionStatus::Idle || tx_seen || used_later(msgs, i));
                        let plain = !unnamed_executed && !write_seen && !settings_seen && effects.is_empty();
                        if resumable && let Some(o) = observe.as_mut() {
                            o.reason = Some(Reason::RowLimit);
                        }
                        let plain = plain && !resumable;
                        if let (true, Some(c), Some(st), Msg::Bind(b)) = (cacheable && plain, select, &st, &msgs[bi]) {
                            let req = Request::Extended { param_types: &st.param_types, bind: b };
                            let plan = self.decide(&st.sql, &c, req).await?;
                            if let Some(o) = observe.as_mut() {
                                plan.observe(o);
                            }
                            exec = match plan {
                                Plan::Hit { entry, .. } => Exec::Hit(entry),
                                Plan::Fill(fill) => Exec::Fill(fill),
                                Plan::Forward(_) => Exec::Forward,
                                Plan::Probe => return Ok(None),
                            };
                        }
                        unnamed_executed = true;
                    }
                    write_seen |= !effects.is_empty() || st.as_ref().is_none_or(|s| s.select().is_none());
                    settings_seen |= st.as_ref().is_none_or(|s| s.classified.iter().any(may_change_settings));
                    tx_seen |= st.as_ref().is_none_or(|s| {
                        s.classified.iter().any(|c| matches!(c.kind, crate::query::Kind::Transaction(_)))
                    });
                    plan.exec.insert(i, (exec, effects));
                    if let Some(o) = observe {
                        plan.observe.insert(i, o);
                    }
                }
                _ => {}
            }
        }
        self.find_virtual(msgs, &mut plan);
        // The client's view of its statements and portals after this batch.
        for (name, st) in stmts {
            match st {
                Some(st) => self.flow.statements.insert(Bytes::from(name), st),
                None => self.flow.statements.remove(name.as_slice()),
            };
        }
        for (name, st) in portals {
            match st {
                Some(st) => self.flow.portals.insert(Bytes::from(name), st),
                None => self.flow.portals.remove(name.as_slice()),
            };
        }
        Ok(Some(plan))
    }

    /// A Bind is virtual when its portal is used only by cache hits (and Describes answered
    /// from them); an unnamed Parse is virtual when all its Binds are.
    fn find_virtual(&mut self, msgs: &[Msg<'_>], plan: &mut BatchPlan) {
        let mut uses: HashMap<usize, Vec<usize>> = HashMap::new();
        for (&i, &bi) in &plan.bound_by {
            uses.entry(bi).or_default().push(i);
        }
        for (bi, used) in uses {
            let all_hits = used.iter().all(|i| match &msgs[*i] {
                Msg::Execute(_) => matches!(plan.exec.get(i), Some((Exec::Hit(_), _))),
                Msg::Describe(_) => true,
                _ => false,
            });
            let executes = used.iter().filter(|i| matches!(msgs[**i], Msg::Execute(_))).count();
            plan.virtual_bind[bi] = all_hits && executes == 1;
        }
        // A hit whose Bind must reach the backend anyway is not served from the cache.
        let mut demote = Vec::new();
        for (&i, (exec, _)) in &plan.exec {
            if matches!(exec, Exec::Hit(_)) && plan.bound_by.get(&i).is_none_or(|bi| !plan.virtual_bind[*bi]) {
                demote.push(i);
            }
        }
        for i in demote {
            if let Some((exec, _)) = plan.exec.get_mut(&i) {
                *exec = Exec::Forward;
            }
            if let Some(o) = plan.observe.get_mut(&i) {
                o.outcome = Outcome::Passthrough;
                o.reason = Some(Reason::PortalReused);
            }
        }
        for (pi, m) in msgs.iter().enumerate() {
            let Msg::Parse(p) = m else { continue };
            if !p.name.is_empty() {
                continue;
            }
            let mut binds = 0;
            let mut ok = true;
            for (j, later) in msgs.iter().enumerate().skip(pi + 1) {
                match later {
                    Msg::Parse(q) if q.name.is_empty() => break,
                    Msg::Close(Named { target: Target::Statement, name: b"" }) => {
                        ok = false;
                        break;
                    }
                    Msg::Describe(Named { target: Target::Statement, name: b"" }) => ok = false,
                    Msg::Bind(b) if b.statement.is_empty() => {
                        binds += 1;
                        ok &= plan.virtual_bind[j];
                    }
                    _ => {}
                }
            }
            plan.virtual_parse[pi] = ok && binds > 0;
        }
    }

    /// Phase 3: sends what must reach the backend and queues every answer in order.
    fn emit(&mut self, frames: &[Frame], msgs: &[Msg<'_>], mut plan: BatchPlan) {
        for (exec, _) in plan.exec.values_mut() {
            if let Exec::Fill(_) = exec
                && let Exec::Fill(fill) = std::mem::replace(exec, Exec::Forward)
            {
                *exec = Exec::Filling(self.flow.pipeline.add_fill(*fill));
            }
        }
        let mut forwarded = false;
        let mut current_unnamed = plan.unnamed_at_start.take();
        let mut described = false;
        for (i, m) in msgs.iter().enumerate() {
            let frame = frames[i].clone();
            match m {
                Msg::Parse(p) => {
                    if p.name.is_empty() {
                        current_unnamed = plan.parsed.get(&i).cloned();
                    }
                    if plan.virtual_parse[i] {
                        self.answer_locally(encoded(be::parse_complete));
                        self.flow.unprepared.insert(Bytes::new());
                    } else {
                        self.forward_request(frame, Expect::Parse);
                        forwarded = true;
                        self.flow.unprepared.remove(p.name);
                    }
                }
                Msg::Bind(b) => {
                    described = false;
                    if plan.virtual_bind[i] {
                        self.answer_locally(encoded(be::bind_complete));
                        self.flow.virtual_portal = Some(frame);
                    } else {
                        self.materialize(b.statement, current_unnamed.as_ref());
                        self.forward_request(frame, Expect::Bind);
                        forwarded = true;
                        if b.portal.is_empty() {
                            self.flow.virtual_portal = None;
                        }
                    }
                }
                Msg::Describe(Named { target: Target::Statement, name }) => {
                    self.materialize(name, current_unnamed.as_ref());
                    self.forward_request(frame, Expect::DescribeStatement);
                    forwarded = true;
                }
                Msg::Describe(Named { target: Target::Portal, name }) => {
                    described = true;
                    let local = plan.bound_by.get(&i).is_some_and(|bi| plan.virtual_bind[*bi]);
                    if local {
                        // Answered from the entry of the hit this portal is bound for.
                        let entry = plan.exec.iter().find_map(|(e, (exec, _))| match exec {
                            Exec::Hit(entry) if plan.bound_by.get(e) == plan.bound_by.get(&i) => Some(entry.clone()),
                            _ => None,
                        });
                        if let Some(entry) = entry {
                            self.answer_locally(entry.row_description.clone());
                            continue;
                        }
                    }
                    if name.is_empty() {
                        self.materialize_portal(current_unnamed.as_ref());
                    }
                    let fill = self.fill_of_next_execute(msgs, &plan, i);
                    self.request(frame.into_raw(), Forwarded { fill, ..Forwarded::new(Expect::DescribePortal) });
                    forwarded = true;
                }
                Msg::Execute(e) => {
                    let (exec, effects) = plan.exec.remove(&i).unwrap_or((Exec::Forward, Vec::new()));
                    let observe = plan.observe.remove(&i).map(Box::new);
                    match exec {
                        Exec::Hit(entry) => {
                            entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let answer = entry.answer(e.max_rows);
                            if let Some(o) = &observe {
                                self.ctx.stats.record(o, answer.len() as u64, false);
                            }
                            self.answer_locally(answer);
                        }
                        Exec::Filling(id) => {
                            if !described {
                                // The entry needs the RowDescription for clients that will ask.
                                let mut d = BytesMut::new();
                                frontend::describe(b'P', "", &mut d).expect("the unnamed portal's name encodes");
                                self.request(
                                    d.freeze(),
                                    Forwarded { fill: Some(id), ..Forwarded::hidden(Expect::DescribePortal) },
                                );
                            }
                            // A row limit is raised so that results a little longer than it
                            // are still complete (and storable); the client sees its own limit.
                            let (raw, row_limit) = match e.max_rows {
                                0 => (frame.into_raw(), None),
                                n => {
                                    let mut x = BytesMut::new();
                                    frontend::execute("", n.saturating_add(ROW_LIMIT_SLACK), &mut x)
                                        .expect("the unnamed portal's name encodes");
                                    (x.freeze(), Some(RowLimit { client: n as u64, seen: 0 }))
                                }
                            };
                            self.request(
                                raw,
                                Forwarded {
                                    fill: Some(id),
                                    effects,
                                    observe,
                                    row_limit,
                                    ..Forwarded::new(Expect::Execute)
                                },
                            );
                            forwarded = true;
                        }
                        Exec::Forward | Exec::Fill(_) => {
                            if e.portal.is_empty() {
                                self.materialize_portal(current_unnamed.as_ref());
                            }
                            self.request(
                                frame.into_raw(),
                                Forwarded { effects, observe, ..Forwarded::new(Expect::Execute) },
                            );
                            forwarded = true;
                        }
                    }
                }
                Msg::Close(Named { target, name }) => {
                    match target {
                        Target::Statement => {
                            self.flow.unprepared.remove(*name);
                            if name.is_empty() {
                                current_unnamed = None;
                            }
                        }
                        Target::Portal if name.is_empty() => self.flow.virtual_portal = None,
                        Target::Portal => {}
                    }
                    self.forward_request(frame, Expect::Close);
                    forwarded = true;
                }
                // Postgres needs the Sync (and the Flush) whenever it has messages not yet
                // synced, from this batch or an earlier one ended by a Flush: after an error it
                // skips everything until a Sync. Only a batch answered entirely by pgcache, on a
                // synced backend, gets its ReadyForQuery locally.
                Msg::Sync if forwarded || self.track.unsynced => self.forward_request(frame, Expect::Sync),
                Msg::Sync => self.flow.pipeline.items.push_back(Item::LocalReady),
                Msg::Flush if forwarded || self.track.unsynced => self.send(frame.into_raw()),
                Msg::Flush => {}
            }
        }
    }

    /// The fill of the Execute that a Describe of the unnamed portal precedes, if any.
    fn fill_of_next_execute(&self, msgs: &[Msg<'_>], plan: &BatchPlan, describe: usize) -> Option<usize> {
        let bi = plan.bound_by.get(&describe)?;
        msgs.iter().enumerate().skip(describe + 1).find_map(|(j, m)| match m {
            Msg::Execute(_) if plan.bound_by.get(&j) == Some(bi) => match plan.exec.get(&j) {
                Some((Exec::Filling(id), _)) => Some(*id),
                _ => None,
            },
            _ => None,
        })
    }

    /// Re-sends the client's statement `name` if the backend does not have it. `unnamed` is
    /// the client's unnamed statement at this point of the batch.
    fn materialize(&mut self, name: &[u8], unnamed: Option<&Arc<Statement>>) {
        if !self.flow.unprepared.remove(name) {
            return;
        }
        let st = if name.is_empty() { unnamed.cloned() } else { self.flow.statements.get(name).cloned() };
        if let Some(st) = st {
            self.request(st.parse.raw().clone(), Forwarded::hidden(Expect::Parse));
        }
    }

    /// Re-creates the client's unnamed portal if only pgcache had it.
    fn materialize_portal(&mut self, current: Option<&Arc<Statement>>) {
        let Some(bind) = self.flow.virtual_portal.take() else { return };
        if let Ok(b) = fe::bind(bind.body()) {
            let name = b.statement.to_vec();
            self.materialize(&name, current);
        }
        self.request(bind.into_raw(), Forwarded::hidden(Expect::Bind));
    }

    /// Sends a batch pgcache cannot read, expecting the answers its message types get.
    fn forward_raw(&mut self, frames: Vec<Frame>) -> Result<(), SessionError> {
        let current = self.flow.statements.get(&b""[..]).cloned();
        self.materialize_portal(current.as_ref());
        let names: Vec<Bytes> = self.flow.unprepared.iter().cloned().collect();
        for name in names {
            self.materialize(&name, current.as_ref());
        }
        for frame in frames {
            let expect = match frame.tag() {
                fe::PARSE => Some(Expect::Parse),
                fe::BIND => Some(Expect::Bind),
                fe::DESCRIBE if frame.body().first() == Some(&b'S') => Some(Expect::DescribeStatement),
                fe::DESCRIBE => Some(Expect::DescribePortal),
                fe::EXECUTE => Some(Expect::Execute),
                fe::CLOSE => Some(Expect::Close),
                fe::SYNC => Some(Expect::Sync),
                _ => None,
            };
            let Some(expect) = expect else {
                // Flush has no answer of its own.
                self.send(frame.into_raw());
                continue;
            };
            let mut answer = Forwarded::new(expect);
            if expect == Expect::Execute {
                answer.effects.push(Effect::Unknown("execute in a batch pgcache could not read"));
                self.flow.wrote = true;
            }
            self.request(frame.into_raw(), answer);
        }
        Ok(())
    }
}
