//! Routing Postgres's answers against the head of the pipeline: each frame is passed to the
//! client, hidden (an answer to pgcache's own request), or completes what was owed — letting
//! pgcache's own answers behind it out in order.
//!
//! This is also where the cache learns: a fill's RowDescription, DataRows and CommandComplete
//! are teed into it, and a write's invalidations come out when its CommandComplete arrives
//! outside a transaction and again when its transaction ends — as actions that the relay
//! carries out before the message reaches the client, so no client can see a write
//! acknowledged while its old rows are still served. After an error in the extended protocol
//! Postgres skips everything up to the next Sync, and so do pgcache's own answers (Postgres
//! docs, "Extended Query").

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::protocol::Truncated;
use crate::protocol::backend::{self as be, TransactionStatus};

use super::pipeline::{Expect, Forwarded, Item, Routed};
use super::{Action, Core};

impl Core {
    /// Routes one backend frame (`raw`, header included) against the head of the pipeline; the
    /// tracker has already seen it.
    pub(super) fn route(
        &mut self,
        params: &mut Arc<BTreeMap<String, String>>,
        raw: &[u8],
    ) -> Result<Routed, Truncated> {
        let tag = raw[0];
        if let Some(routed) = self.route_unsolicited(params, raw)? {
            return Ok(routed);
        }
        let Some(Item::Backend(head)) = self.flow.pipeline.items.front() else {
            // Nothing expected: a FATAL because the server is shutting down, or something new.
            // If the session can move to another backend when this one closes, the client need
            // not hear about it.
            let visible = !(tag == be::ERROR_RESPONSE && self.flow.movable().is_ok());
            return Ok(Routed { visible, completed: false, rewritten: None });
        };
        let (visible, expect, fill, probe) = (!head.hidden, head.expect, head.fill, head.probe);
        let done = |completed| Ok(Routed { visible, completed, rewritten: None });
        match tag {
            be::ERROR_RESPONSE => {
                let rewritten = head.renamed.as_ref().map(|(server, client)| renamed(raw, server, client));
                self.note_stale_plan(&raw[5..]);
                Ok(Routed { rewritten, ..self.on_error(visible, expect, fill, probe) })
            }
            be::PARSE_COMPLETE | be::BIND_COMPLETE | be::CLOSE_COMPLETE => {
                self.flow.pipeline.items.pop_front();
                done(true)
            }
            be::PARAMETER_DESCRIPTION => done(false),
            be::ROW_DESCRIPTION | be::NO_DATA => {
                if let Some(f) = fill.and_then(|id| self.flow.pipeline.fill_mut(id)) {
                    f.row_description = Some(Bytes::copy_from_slice(raw));
                }
                let completes = matches!(expect, Expect::DescribePortal | Expect::DescribeStatement);
                if completes {
                    self.flow.pipeline.items.pop_front();
                }
                done(completes)
            }
            be::DATA_ROW => self.on_data_row(visible, fill, probe, raw),
            be::COMMAND_COMPLETE => Ok(self.on_command_complete(visible, expect, fill, raw)),
            be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED => {
                if let Some(id) = fill {
                    self.flow.pipeline.take_fill(id);
                }
                // A suspended portal's write has run whole (Postgres runs a write to its end
                // and keeps the rows it returns).
                if let Some(Item::Backend(head)) = self.flow.pipeline.items.front_mut()
                    && let Some(step) = head.steps.pop_front()
                {
                    self.completed(step, b"");
                }
                let completes = expect == Expect::Execute;
                if completes {
                    self.observed(false);
                    self.flow.pipeline.items.pop_front();
                }
                done(completes)
            }
            be::COPY_IN_RESPONSE if expect == Expect::Execute => {
                self.on_copy_in();
                done(false)
            }
            be::READY_FOR_QUERY => {
                self.on_ready(probe);
                done(true)
            }
            _ => done(false),
        }
    }

    /// Messages that may arrive at any time, whatever is pending.
    fn route_unsolicited(
        &mut self,
        params: &mut Arc<BTreeMap<String, String>>,
        raw: &[u8],
    ) -> Result<Option<Routed>, Truncated> {
        let pass = Some(Routed { visible: true, completed: false, rewritten: None });
        match raw[0] {
            be::PARAMETER_STATUS => {
                let (name, value) = be::parameter_status(&raw[5..])?;
                Arc::make_mut(params).insert(name, value);
                // A reported setting changed (a SET, a function that ran one, the server's
                // configuration reloaded): the settings the key is built from must be read
                // again, and before the backend is handed on.
                self.flow.settings_may_change();
                Ok(pass)
            }
            be::NOTIFICATION_RESPONSE => Ok(pass),
            be::NOTICE_RESPONSE => {
                // A result that raised a notice cannot be replayed faithfully from the cache.
                if let Some(Item::Backend(head)) = self.flow.pipeline.items.front()
                    && let Some(id) = head.fill
                {
                    self.flow.pipeline.take_fill(id);
                }
                Ok(pass)
            }
            _ => Ok(None),
        }
    }

    /// In copy-in mode the backend ignores Sync and Flush (Postgres docs, "COPY Operations"): a
    /// Sync the client sent with this Execute gets no answer; the client sends another after
    /// CopyDone, which Postgres needs — it is unsynced again.
    fn on_copy_in(&mut self) {
        if let Some(Item::Backend(next)) = self.flow.pipeline.items.get(1)
            && next.expect == Expect::Sync
            && !next.hidden
        {
            self.flow.pipeline.items.remove(1);
            self.tracker.copy_ate_sync();
        }
    }

    /// Transaction pooling: a Bind of a server-named statement refused because its result type
    /// changed (DDL) leaves that statement stale on this backend; the next Parse of it
    /// prepares it again, as a client's own re-prepare would with Postgres directly.
    fn note_stale_plan(&mut self, body: &[u8]) {
        let Some(Item::Backend(Forwarded { binds: Some(name), .. })) = self.flow.pipeline.items.front() else {
            return;
        };
        if be::error_fields(body).is_ok_and(|f| f.code == "0A000")
            && let Some(server) = self.server.as_mut()
        {
            server.mark_stale(name);
        }
    }

    fn on_error(&mut self, visible: bool, expect: Expect, fill: Option<usize>, probe: bool) -> Routed {
        // An injected request that fails makes the backend skip the client's own messages up
        // to Sync: the client must see why. Only the settings probe (a request of pgcache's
        // own between the client's) stays silent.
        let visible = visible || !probe;
        // The transaction fails with it (whatever it wrote is rolled back).
        self.flow.tx_failed = true;
        if let Some(id) = fill {
            self.flow.pipeline.take_fill(id);
        }
        if probe {
            self.flow.probe_rows.clear();
        }
        if matches!(expect, Expect::Query | Expect::Sync) {
            if let Some(Item::Backend(head)) = self.flow.pipeline.items.front_mut() {
                head.failed = true;
            }
            return Routed { visible, completed: false, rewritten: None };
        }
        // The backend now skips to Sync, and so do pgcache's own answers. Statements whose
        // Parse failed or was skipped were not prepared.
        self.observed(true);
        let failed = self.flow.pipeline.items.pop_front();
        let skipped = self.flow.pipeline.skip_to_sync();
        for f in failed
            .into_iter()
            .filter_map(|i| match i {
                Item::Backend(f) => Some(f),
                _ => None,
            })
            .chain(skipped)
        {
            if let Some(id) = f.fill {
                self.flow.pipeline.take_fill(id);
            }
            if let (Some(name), Some(server)) = (f.prepares, self.server.as_mut()) {
                server.remove(&name);
            }
        }
        Routed { visible, completed: true, rewritten: None }
    }

    fn on_data_row(
        &mut self,
        visible: bool,
        fill: Option<usize>,
        probe: bool,
        raw: &[u8],
    ) -> Result<Routed, Truncated> {
        let mut visible = visible;
        if let Some(Item::Backend(head)) = self.flow.pipeline.items.front_mut() {
            if let Some(o) = head.observe.as_mut() {
                o.rows += 1;
            }
            if let Some(limit) = head.row_limit.as_mut() {
                limit.seen += 1;
                visible &= limit.seen <= limit.client;
            }
        }
        if probe {
            self.flow.probe_rows.push(be::data_row_text(&raw[5..])?);
        } else if let Some(f) = fill.and_then(|id| self.flow.pipeline.fill_mut(id)) {
            f.add_row(raw);
        }
        Ok(Routed { visible, completed: false, rewritten: None })
    }

    fn on_command_complete(&mut self, visible: bool, expect: Expect, fill: Option<usize>, raw: &[u8]) -> Routed {
        // The statement ran: what it does to its transaction happens now.
        if let Some(Item::Backend(head)) = self.flow.pipeline.items.front_mut()
            && let Some(step) = head.steps.pop_front()
        {
            self.completed(step, be::command_tag(&raw[5..]).unwrap_or_default());
        }
        if let Some(id) = fill
            && let Some(mut f) = self.flow.pipeline.take_fill(id)
        {
            f.add_body(raw);
            self.act(Action::Store(Box::new(f)));
        }
        if expect != Expect::Execute {
            return Routed { visible, completed: false, rewritten: None };
        }
        self.observed(false);
        if let Some(Item::Backend(Forwarded { row_limit: Some(l), .. })) = self.flow.pipeline.items.pop_front()
            && l.seen >= l.client
        {
            // The client's limit was reached: Postgres would have suspended here.
            let mut s = BytesMut::new();
            be::portal_suspended(&mut s);
            self.flow.pipeline.items.push_front(Item::Local(s.freeze()));
            return Routed { visible: false, completed: true, rewritten: None };
        }
        Routed { visible, completed: true, rewritten: None }
    }

    fn on_ready(&mut self, probe: bool) {
        let status = self.tracker.status;
        if self.tracker.awaiting_ready == 0 {
            self.flow.begins_in_flight = false;
        }
        if let Some(Item::Backend(head)) = self.flow.pipeline.items.pop_front() {
            if let Some(observation) = head.observe {
                self.act(Action::Record { observation, served: 0, error: head.failed });
            }
            // Statements left without a CommandComplete of their own ran, unless the request
            // failed (then the rest of it was skipped): pgcache may have split the text into
            // fewer statements than Postgres did.
            if !head.failed {
                for step in head.steps {
                    self.completed(step, b"");
                }
            }
        }
        if probe {
            self.flow.finish_probe();
        }
        if status == TransactionStatus::Idle {
            self.end_transaction();
        }
    }

    /// Records the observation of the item at the head, if it has one.
    fn observed(&mut self, error: bool) {
        if let Some(Item::Backend(head)) = self.flow.pipeline.items.front_mut()
            && let Some(observation) = head.observe.take()
        {
            self.act(Action::Record { observation, served: 0, error });
        }
    }

    /// The transaction (explicit or implicit) ended: its writes are invalidated, now that they
    /// are committed (a COMMIT or ROLLBACK already took what it ended), and settings it changed
    /// may have reverted.
    fn end_transaction(&mut self) {
        let effects = std::mem::take(&mut self.flow.tx_effects);
        if !effects.is_empty() && !self.flow.rolled_back() {
            self.act(Action::Invalidate { effects, committed: true });
        }
        let (wrote, ddl) = (self.flow.wrote || self.flow.may_have_written, self.flow.changed_schema);
        if wrote || ddl {
            self.act(Action::Committed { ddl });
        }
        let f = &mut self.flow;
        f.tx_failed = false;
        f.tx_savepoints = false;
        f.wrote = false;
        f.may_have_written = false;
        f.changed_schema = false;
        f.portals.clear();
        if std::mem::take(&mut f.settings_changed_in_tx) {
            f.settings.forget();
        }
    }
}

/// The frame `raw` with every occurrence of `from` replaced by `to` (server names are long and
/// random enough to occur only where they are meant).
fn renamed(raw: &[u8], from: &[u8], to: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(raw.len());
    let mut rest = &raw[5..];
    while let Some(at) = rest.windows(from.len().max(1)).position(|w| w == from) {
        body.extend_from_slice(&rest[..at]);
        body.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    body.extend_from_slice(rest);
    let mut out = BytesMut::new();
    crate::protocol::frame::put_frame(&mut out, raw[0], &body);
    out.freeze()
}
