//! The simple query protocol: a Query message answered from the cache, filled into it, or
//! forwarded — with its writes noted for invalidation either way.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::metrics::Outcome;
use crate::protocol::Frame;
use crate::protocol::frontend;
use crate::query::{Classified, Kind};
use crate::stats::Observation;

use super::SessionError;
use super::decide::{Plan, Request};
use super::pipeline::{Expect, Forwarded, Item};
use super::relay::Relay;

impl Relay<'_> {
    pub(super) async fn on_query(&mut self, frame: Frame) -> Result<(), SessionError> {
        // Non-UTF-8 SQL (e.g. a LATIN1 client) cannot be classified: it passes through as a
        // statement with unknown effects.
        let classified = match frontend::query(frame.body()).ok().and_then(|q| std::str::from_utf8(q.sql).ok()) {
            Some(sql) => self.shared.classifier.classify(sql),
            None => Arc::new(vec![Classified::unparseable()]),
        };
        let mut effects = Vec::new();
        for c in classified.iter() {
            effects.extend(self.note(c).await);
        }
        let mut observe = Observation::new(classified.clone(), Outcome::Passthrough);
        observe.reason = Some(Cow::Borrowed(match classified.as_slice() {
            [c] => c.never_cache.unwrap_or("may write (calls a volatile user function)"),
            _ => "several statements in one query",
        }));
        if let [c] = classified.as_slice()
            && c.kind == Kind::Select
            && effects.is_empty()
            && let Ok(q) = frontend::query(frame.body())
            && let Ok(sql) = std::str::from_utf8(q.sql)
        {
            let plan = self.decide(sql, c, Request::Simple).await?;
            plan.observe(&mut observe);
            match plan {
                Plan::Hit { entry, .. } => {
                    entry.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut answer = BytesMut::with_capacity(entry.row_description.len() + entry.body.len());
                    answer.extend_from_slice(&entry.row_description);
                    answer.extend_from_slice(&entry.body);
                    self.shared.stats.record(&observe, answer.len() as u64, false);
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
