//! What was decided for one SELECT (by the relay, from the cache and the policy): the core
//! carries it out.

use std::sync::Arc;

use crate::cache::Entry;
use crate::policy::Reason;
use crate::stats::Observation;

use super::pipeline::Fill;

/// What to do with one SELECT.
#[derive(Debug)]
pub enum Plan {
    /// Answer from this entry (`key`: a hash of its key; `stale`: past its TTL).
    Hit { entry: Arc<Entry>, key: u64, stale: bool },
    /// Forward, and keep the answer.
    Fill(Box<Fill>),
    /// Forward only, for this reason; with a hash of the read's key when no rule caches it,
    /// for the advisor's count of distinct keys ([`crate::stats::QueryStat::keys`]).
    Forward(Reason, Option<u64>),
    /// The session's settings must be read first: send the probe, decide again on its answer.
    Probe,
}

impl Plan {
    /// Forward only, for this reason (no key counted).
    pub fn forward(why: Reason) -> Plan {
        Plan::Forward(why, None)
    }

    /// Records in `o` what was decided.
    pub fn observe(&self, o: &mut Observation) {
        match self {
            Plan::Hit { entry, key, stale } => o.hit(&entry.rule, *key, *stale, entry.rows),
            Plan::Fill(fill) => o.miss(&fill.rule, fill.key.hashed()),
            Plan::Forward(why, key) => {
                tracing::debug!(reason = %why, "forwarded, not cached");
                o.reason = Some(why.clone());
                o.key = *key;
            }
            Plan::Probe => {}
        }
    }
}
