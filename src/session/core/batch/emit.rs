//! Sending a planned batch: what must reach the backend is forwarded (statements and portals
//! only pgcache had are re-created first, hidden), and every answer is queued in order —
//! forwarded ones as pipeline items, pgcache's own as local items.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::protocol::Frame;
use crate::protocol::backend as be;
use crate::protocol::frontend::{self as fe, Target};

use super::super::effect::Step;
use super::super::flow::Statement;
use super::super::pipeline::{Expect, Forwarded, Item, RowLimit};
use super::super::{Action, Core};
use super::{BatchPlan, Exec, Msg};

/// Rows asked for beyond a client's row limit when filling, so that results a little longer
/// than the limit can still be stored whole.
const ROW_LIMIT_SLACK: i32 = 1000;

/// One message pgcache answers with itself (ParseComplete, BindComplete).
fn encoded(put: fn(&mut BytesMut)) -> Bytes {
    let mut b = BytesMut::with_capacity(5);
    put(&mut b);
    b.freeze()
}

/// Sends what must reach the backend and queues every answer in order.
pub(super) fn emit(core: &mut Core, frames: &[Frame], msgs: &[Msg], mut plan: BatchPlan) {
    for (exec, _) in plan.exec.values_mut() {
        if let Exec::Fill(_) = exec
            && let Exec::Fill(fill) = std::mem::replace(exec, Exec::Forward)
        {
            *exec = Exec::Filling(core.flow.pipeline.add_fill(*fill));
        }
    }
    let current_unnamed = plan.unnamed_at_start.take();
    let mut e = Emitter { core, msgs, plan, forwarded: false, current_unnamed, described: false };
    for (i, m) in msgs.iter().enumerate() {
        let frame = frames[i].clone();
        match m {
            Msg::Parse { name, .. } if !name.is_empty() && e.core.server.is_some() => e.parse_renamed(i, frame),
            Msg::Parse { name, .. } => e.parse(i, name, frame),
            Msg::Bind(b) => e.bind(i, &b.statement, b.portal.is_empty(), frame),
            Msg::Describe(Target::Statement, name) => {
                let raw = e.for_backend(i, name, frame);
                e.forward_raw(raw, Expect::DescribeStatement);
            }
            Msg::Close(Target::Statement, name) if !name.is_empty() && e.core.server.is_some() => {
                // Server-named statements stay prepared for other clients; the client's name
                // is gone from its view (the planner dropped it), which is all Close means.
                e.core.answer_locally(encoded(be::close_complete));
            }
            Msg::Describe(Target::Portal, name) => e.describe_portal(i, name.is_empty(), frame),
            Msg::Execute { portal, max_rows } => e.execute(i, portal.is_empty(), *max_rows, frame),
            Msg::Close(target, name) => e.close(*target, name, frame),
            // Postgres needs the Sync (and the Flush) whenever it has messages not yet synced,
            // from this batch or an earlier one ended by a Flush: after an error it skips
            // everything until a Sync. Only a batch answered entirely by pgcache, on a synced
            // backend, gets its ReadyForQuery locally.
            Msg::Sync if e.forwarded || e.core.tracker.unsynced => e.forward(frame, Expect::Sync),
            Msg::Sync => e.core.flow.pipeline.items.push_back(Item::LocalReady),
            Msg::Flush if e.forwarded || e.core.tracker.unsynced => e.core.send(frame.into_raw()),
            Msg::Flush => {}
        }
    }
}

/// The state of sending one batch.
struct Emitter<'a> {
    core: &'a mut Core,
    msgs: &'a [Msg],
    plan: BatchPlan,
    /// Something of this batch went to Postgres.
    forwarded: bool,
    /// The client's unnamed statement at this point of the batch.
    current_unnamed: Option<Arc<Statement>>,
    /// The unnamed portal bound last was described.
    described: bool,
}

impl Emitter<'_> {
    fn forward(&mut self, frame: Frame, expect: Expect) {
        self.forward_raw(frame.into_raw(), expect);
    }

    fn forward_raw(&mut self, raw: Bytes, expect: Expect) {
        self.core.forward_request(raw, expect);
        self.forwarded = true;
    }

    /// The message at `i`, which names statement `name`, as the backend must receive it: the
    /// statement re-sent first if the backend lacks it, and in transaction pooling its name
    /// replaced by the server name.
    fn for_backend(&mut self, i: usize, name: &[u8], frame: Frame) -> Bytes {
        if name.is_empty() || self.core.server.is_none() {
            materialize(self.core, name, self.current_unnamed.as_ref());
            return frame.into_raw();
        }
        match self.plan.stmt_of.get(&i).cloned() {
            Some(st) => {
                let server_name = prepare_on_backend(self.core, &st);
                fe::rename_statement(frame.raw(), &server_name).unwrap_or_else(|| frame.into_raw())
            }
            // A statement the client never prepared: Postgres says so.
            None => frame.into_raw(),
        }
    }

    /// A named Parse in transaction pooling: answered at once if the backend already has the
    /// statement, otherwise sent under its server name. A Parse of a name the client already
    /// uses is sent under that statement's server name, so that Postgres refuses it as it
    /// would have refused the client's (42P05).
    fn parse_renamed(&mut self, i: usize, frame: Frame) {
        let Some(st) = self.plan.parsed.get(&i).cloned() else { return self.forward(frame, Expect::Parse) };
        if let Some(existing) = self.plan.stmt_of.get(&i).cloned() {
            let name = prepare_on_backend(self.core, &existing);
            let raw = fe::rename_statement(frame.raw(), &name).unwrap_or_else(|| frame.into_raw());
            let client = match &self.msgs[i] {
                Msg::Parse { name, .. } => name.clone(),
                _ => Bytes::new(),
            };
            let renamed = Some((name, client));
            self.core.request(raw, Forwarded { renamed, ..Forwarded::new(Expect::Parse) });
            self.forwarded = true;
            return;
        }
        if prepared_on_backend(self.core, &st) {
            return self.core.answer_locally(encoded(be::parse_complete));
        }
        send_parse(self.core, &st, Forwarded::new(Expect::Parse));
        self.forwarded = true;
    }

    fn parse(&mut self, i: usize, name: &Bytes, frame: Frame) {
        if name.is_empty() {
            self.current_unnamed = self.plan.parsed.get(&i).cloned();
        }
        if self.plan.virtual_parse.has(i) {
            self.core.answer_locally(encoded(be::parse_complete));
            self.core.flow.unprepared.insert(Bytes::new());
        } else {
            // A Parse of a name the client already uses must meet that statement on the
            // backend (the name keeps it), so that Postgres refuses it (42P05) as it would have.
            if self.plan.stmt_of.get(&i).is_some() {
                materialize(self.core, name, self.current_unnamed.as_ref());
            }
            self.forward(frame, Expect::Parse);
            self.core.flow.unprepared.remove(name);
        }
    }

    fn bind(&mut self, i: usize, statement: &Bytes, unnamed_portal: bool, frame: Frame) {
        self.described = false;
        if self.plan.virtual_bind.has(i) {
            self.core.answer_locally(encoded(be::bind_complete));
            self.core.flow.virtual_portal = Some(frame);
        } else {
            let raw = self.for_backend(i, statement, frame);
            let binds = match self.plan.stmt_of.get(&i) {
                Some(st) if !statement.is_empty() && self.core.server.is_some() => Some(st.server_name().clone()),
                _ => None,
            };
            self.core.request(raw, Forwarded { binds, ..Forwarded::new(Expect::Bind) });
            self.forwarded = true;
            if unnamed_portal {
                self.core.flow.virtual_portal = None;
            }
        }
    }

    fn describe_portal(&mut self, i: usize, unnamed: bool, frame: Frame) {
        self.described = true;
        if describe_locally(self.core, &self.plan, i) {
            return;
        }
        if unnamed {
            materialize_portal(self.core, self.current_unnamed.as_ref());
        }
        let fill = fill_of_next_execute(self.msgs, &self.plan, i);
        self.core.request(frame.into_raw(), Forwarded { fill, ..Forwarded::new(Expect::DescribePortal) });
        self.forwarded = true;
    }

    fn execute(&mut self, i: usize, unnamed: bool, max_rows: i32, frame: Frame) {
        let (exec, steps) = self.plan.exec.remove(&i).unwrap_or((Exec::Forward, Vec::new()));
        let observe = self.plan.observe.remove(&i);
        match exec {
            Exec::Hit(entry) => {
                entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let answer = entry.answer(max_rows);
                if let Some(observation) = observe {
                    self.core.act(Action::Record { observation, served: answer.len() as u64, error: false });
                }
                self.core.answer_locally(answer);
            }
            Exec::Filling(id) => {
                execute_fill(self.core, frame, id, max_rows, self.described, steps, observe);
                self.forwarded = true;
            }
            Exec::Forward | Exec::Fill(_) => {
                if unnamed {
                    materialize_portal(self.core, self.current_unnamed.as_ref());
                }
                self.core.request(
                    frame.into_raw(),
                    Forwarded { steps: steps.into(), observe, ..Forwarded::new(Expect::Execute) },
                );
                self.forwarded = true;
            }
        }
    }

    fn close(&mut self, target: Target, name: &Bytes, frame: Frame) {
        match target {
            Target::Statement => {
                self.core.flow.unprepared.remove(name);
                if name.is_empty() {
                    self.current_unnamed = None;
                }
            }
            Target::Portal if name.is_empty() => self.core.flow.virtual_portal = None,
            Target::Portal => {}
        }
        self.forward(frame, Expect::Close);
    }
}

/// Answers a Describe of a portal that only pgcache has, from the entry of the hit it is bound
/// for. Returns whether it did.
fn describe_locally(core: &mut Core, plan: &BatchPlan, i: usize) -> bool {
    if !plan.bound_by.get(&i).is_some_and(|bi| plan.virtual_bind.has(*bi)) {
        return false;
    }
    let entry = plan.exec.iter().find_map(|(e, (exec, _))| match exec {
        Exec::Hit(entry) if plan.bound_by.get(&e) == plan.bound_by.get(&i) => Some(entry.clone()),
        _ => None,
    });
    match entry {
        Some(entry) => {
            core.answer_locally(entry.row_description.clone());
            true
        }
        None => false,
    }
}

/// Sends an Execute that fills the cache: with a hidden Describe first when the client did not
/// describe the portal (the entry needs the RowDescription for clients that will), and with a
/// raised row limit so that results a little longer than the client's are still complete.
fn execute_fill(
    core: &mut Core,
    frame: Frame,
    id: usize,
    max_rows: i32,
    described: bool,
    steps: Vec<Step>,
    observe: Option<Box<crate::stats::Observation>>,
) {
    if !described {
        let mut d = BytesMut::new();
        frontend::describe(b'P', "", &mut d).expect("the unnamed portal's name encodes");
        core.request(d.freeze(), Forwarded { fill: Some(id), ..Forwarded::hidden(Expect::DescribePortal) });
    }
    let (raw, row_limit) = match max_rows {
        0 => (frame.into_raw(), None),
        n => {
            let mut x = BytesMut::new();
            frontend::execute("", n.saturating_add(ROW_LIMIT_SLACK), &mut x)
                .expect("the unnamed portal's name encodes");
            (x.freeze(), Some(RowLimit { client: n as u64, seen: 0 }))
        }
    };
    core.request(
        raw,
        Forwarded { fill: Some(id), steps: steps.into(), observe, row_limit, ..Forwarded::new(Expect::Execute) },
    );
}

/// The fill of the Execute that a Describe of the unnamed portal precedes, if any.
fn fill_of_next_execute(msgs: &[Msg], plan: &BatchPlan, describe: usize) -> Option<usize> {
    let bi = plan.bound_by.get(&describe)?;
    msgs.iter().enumerate().skip(describe + 1).find_map(|(j, m)| match m {
        Msg::Execute { .. } if plan.bound_by.get(&j) == Some(bi) => match plan.exec.get(&j) {
            Some((Exec::Filling(id), _)) => Some(*id),
            _ => None,
        },
        _ => None,
    })
}

/// Re-sends the client's statement `name` if the backend does not have it. `unnamed` is the
/// client's unnamed statement at this point of the batch.
fn materialize(core: &mut Core, name: &[u8], unnamed: Option<&Arc<Statement>>) {
    if !core.flow.unprepared.remove(name) {
        return;
    }
    let st = if name.is_empty() { unnamed.cloned() } else { core.flow.statements.get(name).cloned() };
    if let Some(st) = st {
        core.request(st.parse.raw().clone(), Forwarded::hidden(Expect::Parse));
    }
}

/// Re-creates the client's unnamed portal if only pgcache had it.
fn materialize_portal(core: &mut Core, current: Option<&Arc<Statement>>) {
    let Some(bind) = core.flow.virtual_portal.take() else { return };
    let Ok(name) = fe::bind(bind.body()).map(|b| b.statement.to_vec()) else {
        return core.request(bind.into_raw(), Forwarded::hidden(Expect::Bind));
    };
    let st = core.flow.statements.get(&name[..]).cloned();
    let raw = match st {
        Some(st) if !name.is_empty() && core.server.is_some() => {
            let server_name = prepare_on_backend(core, &st);
            fe::rename_statement(bind.raw(), &server_name).unwrap_or_else(|| bind.into_raw())
        }
        _ => {
            materialize(core, &name, current);
            bind.into_raw()
        }
    };
    core.request(raw, Forwarded::hidden(Expect::Bind));
}

/// Transaction pooling: makes sure the backend has `st` under its server name, preparing it
/// there (hidden) if not. Returns the server name.
fn prepare_on_backend(core: &mut Core, st: &Statement) -> Bytes {
    if core.server.is_some() && !prepared_on_backend(core, st) {
        send_parse(core, st, Forwarded::hidden(Expect::Parse));
    }
    st.server_name().clone()
}

/// Whether the backend has `st` under its server name (and notes the use).
fn prepared_on_backend(core: &mut Core, st: &Statement) -> bool {
    core.server.as_mut().is_some_and(|s| s.has(st.server_name(), &st.sql, &st.param_types))
}

/// Sends `st`'s Parse under its server name, expecting `answer`, after closing what making
/// room for it evicts.
fn send_parse(core: &mut Core, st: &Statement, answer: Forwarded) {
    close_to_make_room(core, st);
    let name = st.server_name().clone();
    let raw = fe::rename_statement(st.parse.raw(), &name).unwrap_or_else(|| st.parse.raw().clone());
    core.request(raw, Forwarded { prepares: Some(name), ..answer });
}

/// Notes `st` as prepared on the backend and closes (hidden) what that evicts: the least
/// recently used statement beyond `pool.max_prepared_statements`, or a statement that holds
/// the same server name with other text.
fn close_to_make_room(core: &mut Core, st: &Statement) {
    let name = st.server_name().clone();
    let Some(server) = core.server.as_mut() else { return };
    let collided = server.exists(&name).then(|| name.clone());
    let evicted = server.add(name, st.sql.clone(), st.param_types.clone());
    for old in evicted.into_iter().chain(collided) {
        let mut close = BytesMut::new();
        frontend::close(b'S', std::str::from_utf8(&old).unwrap_or_default(), &mut close).expect("server names encode");
        core.request(close.freeze(), Forwarded::hidden(Expect::Close));
    }
}

impl Core {
    /// Sends a batch pgcache cannot read, expecting the answers its message types get.
    pub(super) fn forward_raw(&mut self, frames: Vec<Frame>) {
        let current = self.flow.statements.get(&b""[..]).cloned();
        materialize_portal(self, current.as_ref());
        let names: Vec<Bytes> = self.flow.unprepared.iter().cloned().collect();
        for name in names {
            materialize(self, &name, current.as_ref());
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
                answer.steps.push_back(Step::unknown("execute in a batch pgcache could not read"));
                self.flow.wrote = true;
            }
            self.request(frame.into_raw(), answer);
        }
    }
}
