//! The relay loop: once a client has its backend, frames flow both ways as raw bytes.
//!
//! One task, four directions: read client, write backend, read backend, write client. The
//! protocol state lives in the [`Core`]: client frames are fed to it ([`super::drive`], which
//! also looks up the facts it asks for), backend frames are routed by it, and what it queues
//! is written out here, along with the [`Action`]s it asks for (carried out before what follows
//! them reaches the client). Reading a side stops while the queue towards the other side is
//! above a high-water mark, so a large result streams with bounded memory and a slow client
//! slows the backend instead of filling pgcache. Reading the backend never waits for the
//! client to speak, so NOTIFY, notices and ParameterStatus reach an idle client at once; and
//! the client is read even while a request waits for the settings probe, so a client that
//! leaves is always noticed, whatever Postgres is doing.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::backend::connection::{ReadError, StartupParams};
use crate::backend::{Connection, PoolKey};
use crate::context::Context;
use crate::frontend::{Client, SessionError};
use crate::metrics;
use crate::net::Stream;
use crate::protocol::backend::PgError;
use crate::protocol::frame::{frame_len, take_frame};
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;

use super::core::flow::Probe;
use super::core::pipeline::Expect;
use super::core::queue::OutQueue;
use super::core::{Action, BackendError, Core, superseded};
use super::effects;
use super::memo::Assessments;

/// Why a session whose settings cannot be replayed stays on its backend.
pub const SETTINGS_PIN: &str = "settings pgcache cannot read back or replay (SET SESSION AUTHORIZATION, or a statement or function that may set unknown settings)";

/// Stop reading the client while this much is queued for the backend.
const HIGH_WATER: usize = 256 * 1024;
/// Stop reading the client while this many answers are owed to it (each may be a cache hit
/// waiting behind a forwarded request).
const MAX_OWED: usize = 4096;
/// Room made in a read buffer before each read.
const READ_CHUNK: usize = 32 * 1024;

/// The relay polls the shutdown signals first on every this many turns (else only before it
/// sleeps; see [`Relay::main_loop`]); a session without a backend asks on every this many
/// frames (else only when its client has nothing to read).
pub(super) const SIGNALS_EVERY: u32 = 32;

/// How a relay ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent Terminate or closed its socket.
    ClientLeft,
    /// pgcache is shutting down; the client was told so at a quiet moment.
    Drained,
    /// The backend went away while the session was idle and could move to another one.
    BackendLost,
    /// Transaction pooling: the client's transaction ended and nothing ties it to its
    /// backend, which can go back to the pool.
    Released,
}

/// Everything the relay works on, for the life of its backend connection.
pub struct Relay<'a> {
    pub(super) ctx: &'a Arc<Context>,
    pub(super) key: &'a PoolKey,
    pub(super) startup: &'a StartupParams,
    pub(super) core: &'a mut Core,
    pub(super) memo: &'a mut Assessments,
    client: &'a mut Stream,
    backend: &'a mut Stream,
    client_buf: &'a mut BytesMut,
    backend_buf: &'a mut BytesMut,
    params: &'a mut Arc<BTreeMap<String, String>>,
    max_message: usize,
    /// `client.max_output_bytes`: stop reading the client, and the backend, while this much
    /// waits to be sent to the client.
    max_output: usize,
    /// Complete client messages wait in the read buffer until the client has read enough
    /// of what it is owed.
    held_back: bool,
    /// The bytes of the extended-protocol messages waiting for their Sync.
    batch_held: usize,
    /// L2 versions that writes completed in the backend data just read moved (see
    /// [`Relay::move_l2_versions`]).
    l2_moves: Vec<crate::l2::Version>,
}

impl From<BackendError> for SessionError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Frame(f) => SessionError::Upstream(ReadError::Frame(f)),
            BackendError::Malformed => SessionError::Upstream(ReadError::Malformed),
        }
    }
}

/// Relays between `client` and `conn` until one side ends. The core holds the backend's
/// protocol state afterwards, which decides whether the connection can be reused.
pub async fn run(
    ctx: &Arc<Context>,
    key: &PoolKey,
    startup: &StartupParams,
    client: &mut Client,
    conn: &mut Connection,
    core: &mut Core,
    memo: &mut Assessments,
) -> Result<Ending, SessionError> {
    let mut relay = Relay {
        ctx,
        key,
        startup,
        core,
        memo,
        client: &mut client.stream,
        backend: &mut conn.stream,
        client_buf: &mut client.rbuf,
        backend_buf: &mut conn.rbuf,
        params: &mut conn.params,
        max_message: ctx.config().client.max_message_bytes,
        max_output: ctx.config().client.max_output_bytes,
        held_back: false,
        batch_held: 0,
        l2_moves: Vec::new(),
    };
    let result = relay.main_loop().await;
    relay.finish(&result).await;
    result
}

/// What woke the relay.
enum Event {
    /// This many bytes were read from the client (0: it closed).
    Client(usize),
    /// The backend was read: this many bytes, or the error.
    Backend(std::io::Result<usize>),
    Shutdown,
    ForceClose,
    /// The client read enough of what it was owed: its held-back messages can be handled.
    Drained,
}

impl Relay<'_> {
    /// The loop. Each turn polls, in one future and without splitting the streams: writing
    /// what is queued for either side, reading either side (each only below its high-water
    /// mark), and the shutdown signals, created once rather than per turn. The first read or
    /// signal is handled, which may take awaits (the catalog, the single flight), then the
    /// next turn begins.
    ///
    /// The signals are polled when the turn finds nothing else to do (before the task sleeps,
    /// so they always hold its waker while it does, and a wake-up that brought no data is one
    /// of theirs), and first on every [`SIGNALS_EVERY`]th turn, so a client that always has
    /// something to read is still drained or closed. Polling a cancellation token locks a
    /// mutex every session shares: polling both on every turn was about 2 % of pgcache's CPU
    /// on the pass-through path.
    async fn main_loop(&mut self) -> Result<Ending, SessionError> {
        let ctx = self.ctx;
        let shutdown = ctx.shutdown.cancelled();
        let force_close = ctx.force_close.cancelled();
        tokio::pin!(shutdown, force_close);
        let mut draining = false;
        let mut turns = 0u32;
        let pooling_transactions = self.core.flow.transaction_pooling;
        // The client may have pipelined messages behind its startup packet.
        if let Some(end) = self.on_client_data().await? {
            return Ok(end);
        }
        loop {
            if draining && self.core.at_rest() {
                return Ok(Ending::Drained);
            }
            if pooling_transactions && self.may_release() {
                return Ok(Ending::Released);
            }
            reserve(self.client_buf);
            reserve(self.backend_buf);
            turns = turns.wrapping_add(1);
            let signals_first = turns.is_multiple_of(SIGNALS_EVERY);
            let event = std::future::poll_fn(|cx| {
                let mut signal = |cx: &mut TaskContext<'_>| {
                    if force_close.as_mut().poll(cx).is_ready() {
                        return Some(Event::ForceClose);
                    }
                    (!draining && shutdown.as_mut().poll(cx).is_ready()).then_some(Event::Shutdown)
                };
                if signals_first && let Some(e) = signal(cx) {
                    return Poll::Ready(Ok(e));
                }
                if let Poll::Ready(r) = self.poll_event(cx) {
                    return Poll::Ready(r);
                }
                match signal(cx) {
                    Some(e) => Poll::Ready(Ok(e)),
                    None => Poll::Pending,
                }
            })
            .await?;
            match event {
                Event::Client(0) => return Ok(Ending::ClientLeft),
                Event::Client(_) => {
                    if let Some(end) = self.on_client_data().await? {
                        return Ok(end);
                    }
                }
                Event::Backend(Ok(n)) if n > 0 => {
                    self.on_backend_data()?;
                    self.move_l2_versions().await;
                    if let Some(end) = self.resume_parked().await? {
                        return Ok(end);
                    }
                }
                Event::Backend(_) if self.core.tracker.at_rest() && self.core.flow.movable().is_ok() => {
                    return Ok(Ending::BackendLost);
                }
                Event::Backend(Ok(_)) => return Err(ReadError::Closed.into()),
                Event::Backend(Err(e)) => return Err(ReadError::Io(e).into()),
                Event::Drained => {
                    if let Some(end) = self.on_client_data().await? {
                        return Ok(end);
                    }
                }
                Event::Shutdown => draining = true,
                Event::ForceClose => return Err(SessionError::Shutdown),
            }
        }
    }

    /// Transaction pooling: whether the backend can go back to the pool now — every answer
    /// given, outside a transaction, nothing held that lives only in this backend, and the
    /// session's settings known so that the next backend can be given them. Settings changed
    /// and not yet read back are read first (the probe, hidden from the client).
    fn may_release(&mut self) -> bool {
        if !self.core.at_rest() || !self.core.to_backend.is_empty() {
            return false;
        }
        let f = &self.core.flow;
        if !f.holds.is_empty() || f.taint.is_some() {
            return false;
        }
        if f.settings_touched && !f.settings.known() && f.probe != Some(Probe::Failed) {
            self.core.start_probe();
            return false;
        }
        let replayable = !f.settings_touched || f.settings.replay(&self.key.user).is_some();
        if replayable == f.settings_pinned && f.gives_backend_back() {
            // Pinned by its settings just now, or released from that pin.
            self.core.flow.settings_pinned = !replayable;
            pin(self.ctx, self.key, "settings", SETTINGS_PIN, !replayable);
        }
        replayable
    }

    /// Writes what it can to both sides, then reads the first side that has data.
    fn poll_event(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<Event, SessionError>> {
        if !self.core.to_client.is_empty() {
            // Pending is fine: the socket's waker is registered, and reading goes on.
            if let Poll::Ready(r) = poll_write_queue(self.client, &mut self.core.to_client, cx) {
                r?;
            }
        }
        if !self.core.to_backend.is_empty()
            && let Poll::Ready(r) = poll_write_queue(self.backend, &mut self.core.to_backend, cx)
        {
            r.map_err(ReadError::Io)?;
        }
        if self.held_back && !self.owing_too_much() {
            self.held_back = false;
            return Poll::Ready(Ok(Event::Drained));
        }
        if self.reading_client()
            && let Poll::Ready(r) =
                tokio_util::io::poll_read_buf(Pin::new(&mut *self.client), cx, &mut *self.client_buf)
        {
            return Poll::Ready(Ok(Event::Client(r?)));
        }
        if self.core.to_client.len() < self.max_output
            && let Poll::Ready(r) =
                tokio_util::io::poll_read_buf(Pin::new(&mut *self.backend), cx, &mut *self.backend_buf)
        {
            return Poll::Ready(Ok(Event::Backend(r)));
        }
        Poll::Pending
    }

    /// Whether to read the client now: not while too much waits for the backend, and while a
    /// request waits for the probe only until the read buffer holds a fair amount (it is still
    /// read, so a client that leaves meanwhile is noticed).
    fn reading_client(&self) -> bool {
        // On a replica the session runs the one read it was sent there for, nothing else.
        self.core.flow.replica.is_none()
            && self.core.to_backend.len() < HIGH_WATER
            && !self.owing_too_much()
            && (self.core.flow.parked.is_none() || self.client_buf.len() < HIGH_WATER)
    }

    /// Whether the client is owed so much (bytes queued for it, or answers still to come)
    /// that it must read before it is read again: a client that pipelines cache hits and
    /// never reads its socket holds at most this much of pgcache's memory.
    fn owing_too_much(&self) -> bool {
        self.core.to_client.len() >= self.max_output || self.core.flow.pipeline.items.len() >= MAX_OWED
    }

    /// After backend data: if a parked request's probe has been answered, decide it now and
    /// carry on with what the client sent meanwhile.
    async fn resume_parked(&mut self) -> Result<Option<Ending>, SessionError> {
        match self.core.unpark() {
            Some(parked) => {
                self.resume(parked).await?;
                self.on_client_data().await
            }
            None => Ok(None),
        }
    }

    /// Tells the client why it is being closed, after whatever was already on its way.
    async fn finish(&mut self, result: &Result<Ending, SessionError>) {
        let mut tail = BytesMut::new();
        match result {
            Ok(Ending::Drained) => {
                PgError::fatal(SqlState::ADMIN_SHUTDOWN, "terminating connection due to administrator command")
                    .encode(&mut tail)
            }
            Err(SessionError::Upstream(_)) if self.core.upstream_said_fatal => {}
            Err(e) => e.encode(&mut tail),
            Ok(Ending::ClientLeft | Ending::BackendLost | Ending::Released) => {}
        }
        self.core.to_client.push(tail.freeze());
        if !matches!(result, Err(SessionError::ClientIo(_)) | Ok(Ending::ClientLeft)) {
            // Also flushes what was owed before a lost backend, so nothing is dropped.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                self.client.write_all_buf(&mut self.core.to_client).await?;
                self.client.flush().await
            })
            .await;
        }
    }

    /// Handles the complete client frames at the front of the read buffer. Frames that need
    /// no inspection pass as one chunk; queries and extended-protocol messages go to the core.
    /// Returns an ending if the client sent Terminate.
    async fn on_client_data(&mut self) -> Result<Option<Ending>, SessionError> {
        loop {
            if self.core.flow.parked.is_some() {
                // The rest waits, in order, until the parked request is decided.
                return Ok(None);
            }
            if self.owing_too_much() {
                // The rest waits until the client has read (see `Event::Drained`).
                self.held_back = true;
                return Ok(None);
            }
            let (run, tags) = self.plain_run()?;
            if run > 0 {
                if !self.core.flow.batch.is_empty() {
                    self.send_batch().await?;
                }
                let chunk = self.client_buf.split_to(run).freeze();
                self.core.send_plain(chunk, tags);
            }
            let Some(frame) = take_frame(self.client_buf, self.max_message)? else { return Ok(None) };
            match frame.tag() {
                // Terminate ends the client's session, not the pooled backend's.
                fe::TERMINATE => return Ok(Some(Ending::ClientLeft)),
                fe::QUERY | fe::FUNCTION_CALL => {
                    self.ctx.wait_while_paused().await;
                    if !self.core.flow.batch.is_empty() {
                        self.send_batch().await?;
                    }
                    if frame.tag() == fe::QUERY {
                        self.on_query(frame).await?;
                    } else {
                        self.throttle(1).await;
                        self.core.forward_request(frame.into_raw(), Expect::Query);
                    }
                }
                tag => {
                    let size = frame.raw().len();
                    self.core.flow.batch.push(frame);
                    // (The first message of a batch starts the count again.)
                    self.batch_held = if self.core.flow.batch.len() == 1 { size } else { self.batch_held + size };
                    let ends = tag == fe::SYNC || tag == fe::FLUSH;
                    if !ends && self.batch_held >= self.max_output {
                        // A long batch without its Sync is sent on as it is (Postgres takes
                        // it message by message anyway) rather than held in memory.
                        self.send_batch().await?;
                    }
                    if ends {
                        self.ctx.wait_while_paused().await;
                        let batch = std::mem::take(&mut self.core.flow.batch);
                        if !(tag == fe::SYNC && self.answered_batch(&batch).await) {
                            self.core.flow.batch = batch;
                            self.send_batch().await?;
                        }
                    }
                }
            }
            self.carry_out();
        }
    }

    /// Length of the complete frames at the front of the client buffer that pass through
    /// uninspected (COPY data and anything unknown), and their tags.
    fn plain_run(&mut self) -> Result<(usize, Vec<u8>), SessionError> {
        let (mut at, mut tags) = (0, Vec::new());
        while let Some(len) = frame_len(&self.client_buf[at..], self.max_message)? {
            if self.client_buf.len() - at < len {
                break;
            }
            let tag = self.client_buf[at];
            if matches!(
                tag,
                fe::TERMINATE
                    | fe::QUERY
                    | fe::FUNCTION_CALL
                    | fe::PARSE
                    | fe::BIND
                    | fe::DESCRIBE
                    | fe::EXECUTE
                    | fe::CLOSE
                    | fe::FLUSH
                    | fe::SYNC
            ) {
                break;
            }
            tags.push(tag);
            at += len;
        }
        Ok((at, tags))
    }

    /// Routes the backend frames read so far, then carries out what they call for — before
    /// any of them can reach the client.
    fn on_backend_data(&mut self) -> Result<(), SessionError> {
        self.core.on_backend(self.backend_buf, self.params)?;
        self.carry_out();
        Ok(())
    }

    /// Moves the shared L2's versions of what the writes just completed changed, before their
    /// completions reach the client (they are written on the loop's next turn): no read that
    /// starts after a client saw its write complete finds an entry the write made old, on any
    /// instance.
    async fn move_l2_versions(&mut self) {
        if self.l2_moves.is_empty() {
            return;
        }
        let moves = std::mem::take(&mut self.l2_moves);
        if let Some(l2) = &self.ctx.l2 {
            l2.bump(&moves).await;
        }
    }

    /// Carries out the core's actions, in order.
    pub(super) fn carry_out(&mut self) {
        let ctx = self.ctx;
        // (A session that keeps its backend has nothing to pin.)
        let pooling_transactions = self.core.flow.gives_backend_back();
        let (mut wrote, mut ddl) = (false, false);
        let (mut actions, backend_state) = self.core.take_actions();
        while let Some(action) = actions.next() {
            match action {
                Action::Committed { ddl: d } => {
                    wrote = true;
                    ddl |= d;
                }
                // (Covered by the committed invalidation of the same write, coming next.)
                Action::Invalidate { effects, committed: false } if superseded(&effects, actions.as_slice()) => {}
                Action::Invalidate { effects, committed } => {
                    effects::apply(ctx, &self.key.database, &effects, committed);
                    if ctx.l2.is_some() {
                        self.l2_moves.extend(effects::l2_versions(ctx, &self.key.database, &effects));
                    }
                }
                Action::Store(fill) => {
                    // What the backend's settings are, as read on it: a fill keyed otherwise is
                    // not stored. (Borrowed, not cloned: the bytes may be shared with other
                    // sessions, whose cores would contend for their count.)
                    if let (Some((entry, Some(key))), Some(l2)) = (fill.finish(&ctx.store, backend_state), &ctx.l2) {
                        l2.store(key, effects::l2_value(&entry), entry.rule.l2_ttl());
                    }
                }
                Action::Record { observation, served, error } => ctx.stats.record(&observation, served, error),
                Action::Pinned(held) if pooling_transactions => pin(ctx, self.key, held.label(), held.describe(), true),
                Action::Unpinned(held) if pooling_transactions => {
                    pin(ctx, self.key, held.label(), held.describe(), false)
                }
                Action::Pinned(_) | Action::Unpinned(_) => {}
            }
        }
        drop(actions);
        // (Nothing run on a replica writes: a standby refuses writes, so a read there that
        // might have written by its text — a function while the cache is not in use — did not.)
        if wrote && !ctx.replicas.is_empty() && self.core.flow.replica.is_none() {
            // The session's later reads wait for a replica that shows this write.
            self.core.flow.replica_need = ctx.replicas.note_write();
            if ddl {
                ctx.replicas.note_ddl();
            }
        }
    }
}

/// Transaction pooling: a session was pinned to its backend (or released) for `reason`:
/// logged, counted (pins only), and kept per pool for `SHOW POOLS`.
fn pin(ctx: &Context, key: &PoolKey, label: &'static str, reason: &'static str, pinned: bool) {
    let what = if pinned {
        "session pinned to its backend connection"
    } else {
        "session released from its backend connection"
    };
    tracing::info!(user = %key.user, database = %key.database, reason, "{what}");
    if pinned {
        ctx.stats.metrics.counter(metrics::PINS, &[("reason", label)]).increment(1);
    }
    ctx.pools.get(key).pinned(label, pinned);
}

/// Writes `queue` to `stream` (one slice: a plain write; more: a vectored write) until it is
/// empty (then flushes, which matters for TLS) or the socket is full.
fn poll_write_queue(stream: &mut Stream, queue: &mut OutQueue, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
    while !queue.is_empty() {
        let mut slices = [IoSlice::new(&[]); 64];
        let written = match queue.chunks_vectored(&mut slices) {
            // The common case (small chunks coalesce): a plain send, no iovec to import.
            1 => ready!(Pin::new(&mut *stream).poll_write(cx, &slices[0]))?,
            n => ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]))?,
        };
        if written == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        queue.advance(written);
    }
    Pin::new(stream).poll_flush(cx)
}

/// Makes room to read into `buf` without letting it grow unboundedly.
///
/// Frames already split off share the buffer's allocation while they wait to be written, and
/// `BytesMut::reserve` on such a buffer may double it, after which one read can pull far more
/// than the high-water mark. So sizing happens only here: room for the rest of a frame already
/// begun (growing at most geometrically with what has arrived, so a header claiming a huge
/// length allocates nothing up front) or for one read, reclaimed in place when possible,
/// otherwise a fresh buffer holding only the unconsumed tail.
fn reserve(buf: &mut BytesMut) {
    let pending = match buf.get(..5) {
        Some(h) => (i32::from_be_bytes([h[1], h[2], h[3], h[4]]).max(4) as usize + 1).saturating_sub(buf.len()),
        None => 0,
    };
    let want = pending.min(buf.len().max(READ_CHUNK)).max(READ_CHUNK / 4);
    if buf.capacity() - buf.len() >= want || buf.try_reclaim(want) {
        return;
    }
    let mut fresh = BytesMut::with_capacity(buf.len() + want.max(READ_CHUNK));
    fresh.extend_from_slice(buf);
    *buf = fresh;
}
