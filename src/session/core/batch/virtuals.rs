//! Which Binds and Parses of a batch need not reach the backend: a Bind is virtual when its
//! portal is used only by cache hits (and Describes answered from them); an unnamed Parse is
//! virtual when all its Binds are. pgcache answers them itself and re-sends them later if the
//! backend ever needs that statement or portal.

use crate::metrics::Outcome;
use crate::policy::Reason;
use crate::protocol::frontend::Target;

use super::{BatchPlan, Exec, Msg};

pub(super) fn find(msgs: &[Msg], plan: &mut BatchPlan) {
    // A message's Bind is the last unnamed-portal Bind before it, so in message order the uses
    // of one Bind come in one run: each run is judged when the next begins (and at the end).
    let BatchPlan { bound_by, exec, virtual_bind, .. } = &mut *plan;
    let mut run: Option<(usize, bool, usize)> = None; // (bind, all uses hits so far, executes)
    let mut close = |run: Option<(usize, bool, usize)>| {
        if let Some((bi, true, 1)) = run {
            virtual_bind.insert(bi, ());
        }
    };
    for (i, &bi) in bound_by.iter() {
        if run.is_some_and(|(b, ..)| b != bi) {
            close(run.take());
        }
        let (_, all_hits, executes) = run.get_or_insert((bi, true, 0));
        match &msgs[i] {
            Msg::Execute { .. } => {
                *all_hits &= matches!(exec.get(&i), Some((Exec::Hit(_), _)));
                *executes += 1;
            }
            Msg::Describe(..) => {}
            _ => *all_hits = false,
        }
    }
    close(run);
    // A hit whose Bind must reach the backend anyway is not served from the cache.
    let mut demote = Vec::new();
    for (i, (exec, _)) in plan.exec.iter() {
        if matches!(exec, Exec::Hit(_)) && plan.bound_by.get(&i).is_none_or(|bi| !plan.virtual_bind.has(*bi)) {
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
        let Msg::Parse { name, .. } = m else { continue };
        if !name.is_empty() {
            continue;
        }
        let mut binds = 0;
        let mut ok = true;
        for (j, later) in msgs.iter().enumerate().skip(pi + 1) {
            match later {
                Msg::Parse { name, .. } if name.is_empty() => break,
                Msg::Close(Target::Statement, name) if name.is_empty() => {
                    ok = false;
                    break;
                }
                Msg::Describe(Target::Statement, name) if name.is_empty() => ok = false,
                Msg::Bind(b) if b.statement.is_empty() => {
                    binds += 1;
                    ok &= plan.virtual_bind.has(j);
                }
                _ => {}
            }
        }
        if ok && binds > 0 {
            plan.virtual_parse.insert(pi, ());
        }
    }
}
