//! The protocol core: one session's protocol state as a pure state machine — messages in,
//! bytes and actions out, no I/O and no shared state inside.
//!
//! ```text
//!              client frames ─┐                         ┌─▶ to_backend (bytes for Postgres)
//!  facts (effects, decisions) ─┼─▶ Core ─ pipeline ─────┼─▶ to_client  (backend slices and
//!             backend frames ─┘  (owed answers, fills)  │                pgcache's own answers, in order)
//!                                                       └─▶ actions    (store a fill, invalidate,
//!                                                                        record an observation)
//! ```
//!
//! What it owns: the backend's protocol state ([`tracker`]), every answer owed to the client in
//! order and the cache fills teed from them ([`pipeline`]), the session's state that caching
//! depends on — statements, portals, settings, transaction writes, the probe and a request
//! parked for it ([`flow`], [`settings`]) — and the planning of simple queries ([`query`]) and
//! extended-protocol batches ([`batch`]). What it may not touch: sockets, the cache, the
//! catalog, the rules, the statistics. Facts that need those (a statement's write effects, a
//! cache decision) are asked of the relay, which looks them up and hands them in; effects on
//! shared state come out as [`Action`]s for the relay to carry out, before anything that
//! follows them reaches the client.

pub mod batch;
pub mod effect;
pub mod flow;
pub mod names;
pub mod pipeline;
pub mod plan;
pub mod query;
pub mod queue;
pub mod rest;
pub mod route;
pub mod settings;
pub mod tracker;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::protocol::backend as be;
use crate::protocol::frame::{FrameError, frame_len};
use crate::stats::Observation;

use effect::Effect;
use flow::Flow;
use pipeline::{Expect, Fill, Forwarded, Item};
use queue::OutQueue;
use tracker::Tracker;

/// The largest frame accepted from Postgres (the protocol's own i32 length bounds it).
pub const BACKEND_MAX_FRAME: usize = i32::MAX as usize + 1;

/// What the relay does for the core, in order, before the client sees what came after.
#[derive(Debug)]
pub enum Action {
    /// Bump the generations these effects name; `committed`: the transaction they belong to
    /// has committed (count them, and tell the other instances).
    Invalidate { effects: Vec<Effect>, committed: bool },
    /// Store a finished fill (unless a write raced it).
    Store(Box<Fill>),
    /// A request completed (or was answered locally): record it.
    Record { observation: Box<Observation>, served: u64, error: bool },
    /// The session took backend-bound state of this kind: it stays on its backend until the
    /// state is released.
    Pinned(crate::query::Held),
    /// The session no longer holds state of this kind.
    Unpinned(crate::query::Held),
    /// A transaction that may have written ended (its writes are committed, unless it
    /// failed); `ddl`: it changed the schema. Reads on replicas wait for a replica that shows
    /// it (see [`crate::replica`]).
    Committed { ddl: bool },
}

/// Whether an invalidation of `effects` not yet committed is covered by a committed one that
/// follows in `rest` with only records between them: a write outside a transaction block,
/// invalidated at its CommandComplete and again when its implicit transaction ends, whose two
/// answers came in together — the committed invalidation alone is carried out, before either
/// reaches the client. Never across anything else (a fill stored between the two must see the
/// first).
pub fn superseded(effects: &[Effect], rest: &[Action]) -> bool {
    for action in rest {
        match action {
            Action::Record { .. } => {}
            Action::Invalidate { effects: later, committed: true } => return effects.iter().all(|e| later.contains(e)),
            _ => return false,
        }
    }
    false
}

/// Postgres sent something the core cannot read.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("malformed message from upstream: {0}")]
    Frame(#[from] FrameError),
    #[error("malformed message from upstream")]
    Malformed,
}

impl From<crate::protocol::Truncated> for BackendError {
    fn from(_: crate::protocol::Truncated) -> Self {
        BackendError::Malformed
    }
}

/// One session's protocol state.
#[derive(Debug, Default)]
pub struct Core {
    pub flow: Flow,
    pub tracker: Tracker,
    /// Bytes for Postgres, in order.
    pub to_backend: OutQueue,
    /// Bytes for the client, in order.
    pub to_client: OutQueue,
    actions: Vec<Action>,
    /// Postgres itself sent a FATAL (the client has it; nothing more to say).
    pub upstream_said_fatal: bool,
    /// In transaction pooling, what the current backend has prepared: client statements go
    /// to it under their server names ([`names`]). `None` in session pooling, where the
    /// client's names are the backend's.
    pub server: Option<crate::backend::Prepared>,
}

/// A piece of output for the client, in order: a range of the backend bytes just read, or
/// pgcache's own.
enum Out {
    Range(usize, usize),
    Bytes(Bytes),
}

impl Core {
    pub fn new(flow: Flow) -> Core {
        Core { flow, ..Core::default() }
    }

    /// The actions the relay must carry out, in order, with the settings the backend was read
    /// to have (what a fill may be stored under: [`settings::Settings::verified`]).
    pub fn take_actions(&mut self) -> (std::vec::Drain<'_, Action>, Option<&Bytes>) {
        (self.actions.drain(..), self.flow.settings.verified())
    }

    pub(crate) fn act(&mut self, action: Action) {
        self.actions.push(action);
    }

    /// Gives back the memory the session's buffers grew to, when nothing is in them: a client
    /// waiting between transactions (transaction pooling) keeps little.
    pub fn shrink(&mut self) {
        if self.to_client.is_empty() {
            self.to_client = OutQueue::default();
        }
        if self.to_backend.is_empty() {
            self.to_backend = OutQueue::default();
        }
        if self.flow.owes_nothing() {
            self.flow.pipeline = Default::default();
            self.flow.batch = Vec::new();
        }
        self.flow.probe_rows = Vec::new();
        self.actions = Vec::new();
    }

    /// Every answer owed has been given and the backend is idle outside a transaction.
    pub fn at_rest(&self) -> bool {
        self.flow.owes_nothing() && self.tracker.at_rest()
    }

    /// Queues a frame for the backend and notes it.
    pub fn send(&mut self, frame: Bytes) {
        if let Some(&tag) = frame.first() {
            self.tracker.client_sent(tag);
        }
        self.to_backend.push(frame);
    }

    /// Queues frames that need no inspection (COPY data and the like), noting each tag.
    pub fn send_plain(&mut self, chunk: Bytes, tags: impl IntoIterator<Item = u8>) {
        tags.into_iter().for_each(|t| self.tracker.client_sent(t));
        self.to_backend.push(chunk);
    }

    /// Sends a request to the backend and queues the answer it is owed.
    pub fn request(&mut self, bytes: Bytes, answer: Forwarded) {
        self.send(bytes);
        self.flow.pipeline.items.push_back(Item::Backend(answer));
    }

    /// Forwards a request as the client sent it, expecting `expect` as its answer.
    pub fn forward_request(&mut self, frame: Bytes, expect: Expect) {
        self.request(frame, Forwarded::new(expect));
    }

    /// Queues bytes pgcache answers with itself.
    pub fn answer_locally(&mut self, bytes: Bytes) {
        self.flow.pipeline.items.push_back(Item::Local(bytes));
    }

    /// Emits local answers now if nothing before them is pending (called after queuing them).
    pub fn flush_locals(&mut self) {
        let mut out = Vec::new();
        self.emit_locals(&mut out);
        for o in out {
            if let Out::Bytes(b) = o {
                self.to_client.push(b);
            }
        }
    }

    /// Routes the complete backend frames at the front of `buf`: through the pipeline, to the
    /// client (as slices of the bytes read, in order with pgcache's own answers) or nowhere
    /// (answers to pgcache's own requests). `params` are the connection's ParameterStatus
    /// values, kept current.
    pub fn on_backend(
        &mut self,
        buf: &mut BytesMut,
        params: &mut Arc<BTreeMap<String, String>>,
    ) -> Result<(), BackendError> {
        let mut out: Vec<Out> = Vec::new();
        self.emit_locals(&mut out);
        let (mut at, mut run_start) = (0, 0);
        while let Some(len) = frame_len(&buf[at..], BACKEND_MAX_FRAME)? {
            if buf.len() - at < len {
                break;
            }
            let raw = &buf[at..at + len];
            let (tag, body) = (raw[0], &raw[5..]);
            self.tracker.backend_sent(tag, body)?;
            if tag == be::ERROR_RESPONSE {
                let fields = be::error_fields(body)?;
                self.upstream_said_fatal |= fields.severity == "FATAL" || fields.severity == "PANIC";
            }
            let routed = self.route(params, raw)?;
            if !routed.visible || routed.rewritten.is_some() {
                out.push(Out::Range(run_start, at));
                run_start = at + len;
            }
            if let Some(b) = routed.rewritten.filter(|_| routed.visible) {
                out.push(Out::Bytes(b));
            }
            at += len;
            if routed.completed {
                out.push(Out::Range(run_start, at));
                run_start = at;
                self.emit_locals(&mut out);
            }
        }
        out.push(Out::Range(run_start, at));
        let consumed = buf.split_to(at).freeze();
        for o in out {
            match o {
                Out::Range(a, b) if b > a => self.to_client.push(consumed.slice(a..b)),
                Out::Range(..) => {}
                Out::Bytes(b) => self.to_client.push(b),
            }
        }
        Ok(())
    }

    /// Emits the local answers at the head of the pipeline.
    fn emit_locals(&mut self, out: &mut Vec<Out>) {
        loop {
            match self.flow.pipeline.items.front() {
                Some(Item::Local(_)) => {
                    if let Some(Item::Local(b)) = self.flow.pipeline.items.pop_front() {
                        out.push(Out::Bytes(b));
                    }
                }
                Some(Item::LocalReady) => {
                    self.flow.pipeline.items.pop_front();
                    let mut b = BytesMut::new();
                    be::ready_for_query(self.tracker.status, &mut b);
                    out.push(Out::Bytes(b.freeze()));
                }
                _ => return,
            }
        }
    }
}
