//! The simple query protocol: a Query message answered from the cache, filled into it, or
//! forwarded — with its writes noted for invalidation either way. A Query that needs the
//! session's settings read first waits, parked, for the probe's answer.

use std::sync::Arc;

use bytes::BytesMut;

use crate::metrics::Outcome;
use crate::policy::Reason;
use crate::protocol::Frame;
use crate::protocol::frontend;
use crate::query::{Classified, Kind};
use crate::stats::Observation;

use super::effect::{Step, invalidates_nothing};
use super::flow::{Parked, Probe};
use super::pipeline::{Expect, Forwarded, Item};
use super::plan::Plan;
use super::{Action, Core};

/// The SQL of a Query frame, if it is readable text.
pub fn sql_of(frame: &Frame) -> Option<&str> {
    frontend::query(frame.body()).ok().and_then(|q| std::str::from_utf8(q.sql).ok())
}

/// Why a request that is not a lone SELECT is forwarded.
pub fn not_cacheable(classified: &[Classified]) -> Reason {
    match classified {
        [c] => c.never_cache.map_or(Reason::MayWrite, Reason::Statement),
        _ => Reason::SeveralStatements,
    }
}

/// The statement of a Query the cache may answer (a lone SELECT writing nothing), which the
/// relay then decides on.
pub fn candidate<'a>(
    frame: &'a Frame,
    classified: &'a [Classified],
    steps: &[Step],
) -> Option<(&'a str, &'a Classified)> {
    match classified {
        [c] if c.kind == Kind::Select && invalidates_nothing(steps) => Some((sql_of(frame)?, c)),
        _ => None,
    }
}

impl Core {
    /// A Query whose statements have been noted, with the decision for its candidate (see
    /// [`candidate`]), if it had one.
    pub fn query(&mut self, frame: Frame, classified: Arc<Vec<Classified>>, steps: Vec<Step>, plan: Option<Plan>) {
        let mut observe = Observation::new(self.flow.database.clone(), classified.clone(), Outcome::Passthrough);
        observe.reason = Some(not_cacheable(&classified));
        if let Some(plan) = plan {
            plan.observe(&mut observe);
            match plan {
                Plan::Probe => {
                    self.start_probe();
                    self.flow.parked = Some(Parked::Query { frame, classified, steps });
                    return;
                }
                Plan::Hit { entry, .. } => {
                    entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // The entry's own bytes, shared rather than copied: hits queued for a
                    // client cost no more memory than the entry.
                    let served = (entry.row_description.len() + entry.body.len()) as u64;
                    self.act(Action::Record { observation: Box::new(observe), served, error: false });
                    self.answer_locally(entry.row_description.clone());
                    self.answer_locally(entry.body.clone());
                    self.flow.pipeline.items.push_back(Item::LocalReady);
                    self.flush_locals();
                    return;
                }
                Plan::Fill(fill) => {
                    let id = self.flow.pipeline.add_fill(*fill);
                    let answer =
                        Forwarded { fill: Some(id), observe: Some(Box::new(observe)), ..Forwarded::new(Expect::Query) };
                    self.request(frame.into_raw(), answer);
                    return;
                }
                Plan::Forward(..) => {}
            }
        }
        self.request(
            frame.into_raw(),
            Forwarded { steps: steps.into(), observe: Some(Box::new(observe)), ..Forwarded::new(Expect::Query) },
        );
    }

    /// Why this session cannot use the cache right now, if it cannot (no look-up needed).
    pub fn refuses(&self) -> Option<Reason> {
        self.flow.refuses(self.tracker.status, self.tracker.unsynced, self.tracker.awaiting_ready > 0)
    }

    /// Sends the probe that reads the session's settings; its answer is hidden from the client.
    /// One runs at a time: while one is running, a request that needs the settings waits for
    /// its answer (and probes again if the settings were forgotten since it was sent).
    pub fn start_probe(&mut self) {
        if self.flow.probe == Some(Probe::Running) {
            return;
        }
        self.flow.probe = Some(Probe::Running);
        self.flow.probe_epoch = self.flow.settings.epoch();
        self.flow.probe_rows.clear();
        let mut q = BytesMut::new();
        // The probe's text has no NUL (names in it are validated), so it always encodes.
        let _ = postgres_protocol::message::frontend::query(&self.flow.settings.probe_sql(), &mut q);
        self.request(q.freeze(), Forwarded { probe: true, ..Forwarded::hidden(Expect::Query) });
    }

    /// The parked request, once the probe has answered (the relay decides it again).
    pub fn unpark(&mut self) -> Option<Parked> {
        if self.flow.probe == Some(Probe::Running) {
            return None;
        }
        self.flow.parked.take()
    }
}
