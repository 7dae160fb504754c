//! Sending a planned batch: what must reach the backend is forwarded (statements and portals
//! only pgcache had are re-created first, hidden), and every answer is queued in order —
//! forwarded ones as pipeline items, pgcache's own as local items.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;

use crate::protocol::Frame;
use crate::protocol::backend as be;
use crate::protocol::frontend::{self as fe, Target};

use super::super::effect::Effect;
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
    let mut forwarded = false;
    let mut current_unnamed = plan.unnamed_at_start.take();
    let mut described = false;
    for (i, m) in msgs.iter().enumerate() {
        let frame = frames[i].clone();
        match m {
            Msg::Parse { name, .. } => {
                if name.is_empty() {
                    current_unnamed = plan.parsed.get(&i).cloned();
                }
                if plan.virtual_parse[i] {
                    core.answer_locally(encoded(be::parse_complete));
                    core.flow.unprepared.insert(Bytes::new());
                } else {
                    core.forward_request(frame.into_raw(), Expect::Parse);
                    forwarded = true;
                    core.flow.unprepared.remove(name);
                }
            }
            Msg::Bind(b) => {
                described = false;
                if plan.virtual_bind[i] {
                    core.answer_locally(encoded(be::bind_complete));
                    core.flow.virtual_portal = Some(frame);
                } else {
                    materialize(core, &b.statement, current_unnamed.as_ref());
                    core.forward_request(frame.into_raw(), Expect::Bind);
                    forwarded = true;
                    if b.portal.is_empty() {
                        core.flow.virtual_portal = None;
                    }
                }
            }
            Msg::Describe(Target::Statement, name) => {
                materialize(core, name, current_unnamed.as_ref());
                core.forward_request(frame.into_raw(), Expect::DescribeStatement);
                forwarded = true;
            }
            Msg::Describe(Target::Portal, name) => {
                described = true;
                if describe_locally(core, &plan, i) {
                    continue;
                }
                if name.is_empty() {
                    materialize_portal(core, current_unnamed.as_ref());
                }
                let fill = fill_of_next_execute(msgs, &plan, i);
                core.request(frame.into_raw(), Forwarded { fill, ..Forwarded::new(Expect::DescribePortal) });
                forwarded = true;
            }
            Msg::Execute { portal, max_rows } => {
                let (exec, effects) = plan.exec.remove(&i).unwrap_or((Exec::Forward, Vec::new()));
                let observe = plan.observe.remove(&i).map(Box::new);
                match exec {
                    Exec::Hit(entry) => {
                        entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let answer = entry.answer(*max_rows);
                        if let Some(observation) = observe {
                            core.act(Action::Record { observation, served: answer.len() as u64, error: false });
                        }
                        core.answer_locally(answer);
                    }
                    Exec::Filling(id) => {
                        execute_fill(core, frame, id, *max_rows, described, effects, observe);
                        forwarded = true;
                    }
                    Exec::Forward | Exec::Fill(_) => {
                        if portal.is_empty() {
                            materialize_portal(core, current_unnamed.as_ref());
                        }
                        let answer = Forwarded { effects, observe, ..Forwarded::new(Expect::Execute) };
                        core.request(frame.into_raw(), answer);
                        forwarded = true;
                    }
                }
            }
            Msg::Close(target, name) => {
                match target {
                    Target::Statement => {
                        core.flow.unprepared.remove(name);
                        if name.is_empty() {
                            current_unnamed = None;
                        }
                    }
                    Target::Portal if name.is_empty() => core.flow.virtual_portal = None,
                    Target::Portal => {}
                }
                core.forward_request(frame.into_raw(), Expect::Close);
                forwarded = true;
            }
            // Postgres needs the Sync (and the Flush) whenever it has messages not yet synced,
            // from this batch or an earlier one ended by a Flush: after an error it skips
            // everything until a Sync. Only a batch answered entirely by pgcache, on a synced
            // backend, gets its ReadyForQuery locally.
            Msg::Sync if forwarded || core.tracker.unsynced => core.forward_request(frame.into_raw(), Expect::Sync),
            Msg::Sync => core.flow.pipeline.items.push_back(Item::LocalReady),
            Msg::Flush if forwarded || core.tracker.unsynced => core.send(frame.into_raw()),
            Msg::Flush => {}
        }
    }
}

/// Answers a Describe of a portal that only pgcache has, from the entry of the hit it is bound
/// for. Returns whether it did.
fn describe_locally(core: &mut Core, plan: &BatchPlan, i: usize) -> bool {
    if !plan.bound_by.get(&i).is_some_and(|bi| plan.virtual_bind[*bi]) {
        return false;
    }
    let entry = plan.exec.iter().find_map(|(e, (exec, _))| match exec {
        Exec::Hit(entry) if plan.bound_by.get(e) == plan.bound_by.get(&i) => Some(entry.clone()),
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
    effects: Vec<Effect>,
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
    core.request(raw, Forwarded { fill: Some(id), effects, observe, row_limit, ..Forwarded::new(Expect::Execute) });
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
    if let Ok(b) = fe::bind(bind.body()) {
        let name = b.statement.to_vec();
        materialize(core, &name, current);
    }
    core.request(bind.into_raw(), Forwarded::hidden(Expect::Bind));
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
                answer.effects.push(Effect::Unknown("execute in a batch pgcache could not read"));
                self.flow.wrote = true;
            }
            self.request(frame.into_raw(), answer);
        }
    }
}
