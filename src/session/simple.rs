//! The simple query protocol: a Query message answered from the cache, filled into it, or
//! forwarded — with its writes noted for invalidation either way. A Query that needs the
//! session's settings read first waits, parked, for the probe's answer.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::metrics::Outcome;
use crate::policy::Reason;
use crate::protocol::Frame;
use crate::protocol::frontend;
use crate::query::{Classified, Kind};
use crate::stats::Observation;

use super::decide::{Plan, Request};
use super::effects::Effect;
use super::flow::Parked;
use super::pipeline::{Expect, Forwarded, Item};
use super::relay::Relay;
use crate::frontend::SessionError;

/// The SQL of a Query frame, if it is readable text.
fn sql_of(frame: &Frame) -> Option<&str> {
    frontend::query(frame.body()).ok().and_then(|q| std::str::from_utf8(q.sql).ok())
}

/// Why a request that is not a lone SELECT is forwarded.
pub(super) fn not_cacheable(classified: &[Classified]) -> Reason {
    match classified {
        [c] => c.never_cache.map_or(Reason::MayWrite, Reason::Statement),
        _ => Reason::SeveralStatements,
    }
}

impl Relay<'_> {
    pub(super) async fn on_query(&mut self, frame: Frame) -> Result<(), SessionError> {
        // Non-UTF-8 SQL (e.g. a LATIN1 client) cannot be classified: it passes through as a
        // statement with unknown effects.
        let classified = match sql_of(&frame) {
            Some(sql) => self.ctx.classifier.classify(sql),
            None => Arc::new(vec![Classified::unparseable()]),
        };
        let mut effects = Vec::new();
        for c in classified.iter() {
            effects.extend(self.note(c).await);
        }
        self.query(frame, classified, effects).await
    }

    /// Decides and sends a Query whose statements have been noted.
    pub(super) async fn query(
        &mut self,
        frame: Frame,
        classified: Arc<Vec<Classified>>,
        effects: Vec<Effect>,
    ) -> Result<(), SessionError> {
        let mut observe = Observation::new(classified.clone(), Outcome::Passthrough);
        observe.reason = Some(not_cacheable(&classified));
        if let [c] = classified.as_slice()
            && c.kind == Kind::Select
            && effects.is_empty()
            && let Some(sql) = sql_of(&frame)
        {
            let plan = self.decide(sql, c, Request::Simple).await?;
            plan.observe(&mut observe);
            match plan {
                Plan::Probe => {
                    self.start_probe()?;
                    self.flow.parked = Some(Parked::Query { frame, classified, effects });
                    return Ok(());
                }
                Plan::Hit { entry, .. } => {
                    entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut answer = BytesMut::with_capacity(entry.row_description.len() + entry.body.len());
                    answer.extend_from_slice(&entry.row_description);
                    answer.extend_from_slice(&entry.body);
                    self.ctx.stats.record(&observe, answer.len() as u64, false);
                    self.answer_locally(answer.freeze());
                    self.flow.pipeline.items.push_back(Item::LocalReady);
                    self.flush_locals();
                    return Ok(());
                }
                Plan::Fill(fill) => {
                    let id = self.flow.pipeline.add_fill(*fill);
                    self.request(
                        frame.into_raw(),
                        Forwarded { fill: Some(id), observe: Some(Box::new(observe)), ..Forwarded::new(Expect::Query) },
                    );
                    return Ok(());
                }
                Plan::Forward(_) => {}
            }
        }
        self.request(
            frame.into_raw(),
            Forwarded { effects, observe: Some(Box::new(observe)), ..Forwarded::new(Expect::Query) },
        );
        Ok(())
    }

    /// Queues bytes pgcache answers with itself.
    pub(super) fn answer_locally(&mut self, bytes: Bytes) {
        self.flow.pipeline.items.push_back(Item::Local(bytes));
    }
}
