//! Which Binds and Parses of a batch need not reach the backend: a Bind is virtual when its
//! portal is used only by cache hits (and Describes answered from them); an unnamed Parse is
//! virtual when all its Binds are. pgcache answers them itself and re-sends them later if the
//! backend ever needs that statement or portal.

use std::collections::HashMap;

use crate::metrics::Outcome;
use crate::policy::Reason;
use crate::protocol::frontend::Target;

use super::{BatchPlan, Exec, Msg};

pub(super) fn find(msgs: &[Msg], plan: &mut BatchPlan) {
    let mut uses: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, &bi) in plan.bound_by.iter() {
        uses.entry(bi).or_default().push(i);
    }
    for (bi, used) in uses {
        let all_hits = used.iter().all(|i| match &msgs[*i] {
            Msg::Execute { .. } => matches!(plan.exec.get(i), Some((Exec::Hit(_), _))),
            Msg::Describe(..) => true,
            _ => false,
        });
        let executes = used.iter().filter(|i| matches!(msgs[**i], Msg::Execute { .. })).count();
        plan.virtual_bind[bi] = all_hits && executes == 1;
    }
    // A hit whose Bind must reach the backend anyway is not served from the cache.
    let mut demote = Vec::new();
    for (i, (exec, _)) in plan.exec.iter() {
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
                    ok &= plan.virtual_bind[j];
                }
                _ => {}
            }
        }
        plan.virtual_parse[pi] = ok && binds > 0;
    }
}
