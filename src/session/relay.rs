//! The relay loop: once a client has its backend, frames flow both ways as raw bytes.
//!
//! One task, four directions: read client, write backend, read backend, write client. Each
//! read side is framed by header; frames that need no inspection are queued for the other
//! side as the very bytes read. Reading a side stops while the queue towards the other side is
//! above a high-water mark, so a large result streams with bounded memory and a slow client
//! slows the backend instead of filling pgcache. Reading the backend never waits for the client
//! to speak, so NOTIFY, notices and ParameterStatus reach an idle client at once.
//!
//! Queries and extended-protocol messages go through the cache logic ([`super::simple`],
//! [`super::extended`]); answers from the backend are routed through the
//! [`super::pipeline`] ([`Relay::on_backend_data`] here). A request that needs the session's
//! settings read first is parked until the probe's answer arrives; the client is still read
//! meanwhile, so a client that leaves is noticed whatever Postgres is doing.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::backend::connection::{BACKEND_MAX_FRAME, ReadError, StartupParams};
use crate::backend::{Connection, PoolKey};
use crate::context::Context;
use crate::net::Stream;
use crate::protocol::backend::{self as be, PgError};
use crate::protocol::frame::{Frame, frame_len, take_frame};
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;

use super::flow::{Flow, Parked, Probe};
use super::pipeline::{Expect, Forwarded, Item};
use super::queue::OutQueue;
use super::state::Tracker;
use crate::frontend::Client;
use crate::frontend::SessionError;

/// Stop reading a side while this much is queued for the other.
const HIGH_WATER: usize = 256 * 1024;
/// Room made in a read buffer before each read.
const READ_CHUNK: usize = 32 * 1024;

/// How a relay ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client sent Terminate or closed its socket.
    ClientLeft,
    /// pgcache is shutting down; the client was told so at a quiet moment.
    Drained,
    /// The backend went away while the session was idle and could move to another one.
    BackendLost,
}

/// Everything the relay works on, for the life of the session.
pub struct Relay<'a> {
    pub(super) ctx: &'a Arc<Context>,
    pub(super) key: &'a PoolKey,
    pub(super) startup: &'a StartupParams,
    client_rd: ReadHalf<&'a mut Stream>,
    client_wr: WriteHalf<&'a mut Stream>,
    backend_rd: ReadHalf<&'a mut Stream>,
    backend_wr: WriteHalf<&'a mut Stream>,
    client_buf: &'a mut BytesMut,
    backend_buf: &'a mut BytesMut,
    pub(super) params: &'a mut BTreeMap<String, String>,
    pub(super) to_client: OutQueue,
    pub(super) to_backend: OutQueue,
    pub(super) track: &'a mut Tracker,
    pub(super) flow: &'a mut Flow,
    upstream_said_fatal: bool,
    max_message: usize,
}

/// Relays between `client` and `conn` until one side ends. `track` holds the backend's
/// protocol state afterwards, which decides whether the connection can be reused.
pub async fn run(
    ctx: &Arc<Context>,
    key: &PoolKey,
    startup: &StartupParams,
    client: &mut Client,
    conn: &mut Connection,
    track: &mut Tracker,
    flow: &mut Flow,
) -> Result<Ending, SessionError> {
    let (client_rd, client_wr) = tokio::io::split(&mut client.stream);
    let (backend_rd, backend_wr) = tokio::io::split(&mut conn.stream);
    let mut relay = Relay {
        ctx,
        key,
        startup,
        client_rd,
        client_wr,
        backend_rd,
        backend_wr,
        client_buf: &mut client.rbuf,
        backend_buf: &mut conn.rbuf,
        params: &mut conn.params,
        to_client: OutQueue::default(),
        to_backend: OutQueue::default(),
        track,
        flow,
        upstream_said_fatal: false,
        max_message: ctx.config().client.max_message_bytes,
    };
    let result = relay.main_loop().await;
    relay.finish(&result).await;
    result
}

impl Relay<'_> {
    /// Every answer owed has been given and the backend is idle outside a transaction.
    pub(super) fn at_rest(&self) -> bool {
        self.flow.owes_nothing() && self.track.at_rest()
    }

    async fn main_loop(&mut self) -> Result<Ending, SessionError> {
        let mut draining = false;
        // The client may have pipelined messages behind its startup packet.
        if let Some(end) = self.on_client_data().await? {
            return Ok(end);
        }
        loop {
            if draining && self.at_rest() {
                return Ok(Ending::Drained);
            }
            reserve(self.client_buf);
            reserve(self.backend_buf);
            tokio::select! {
                r = self.client_wr.write_buf(&mut self.to_client), if !self.to_client.is_empty() => {
                    r?;
                    if self.to_client.is_empty() {
                        self.client_wr.flush().await?;
                    }
                }
                r = self.backend_wr.write_buf(&mut self.to_backend), if !self.to_backend.is_empty() => {
                    r.map_err(ReadError::Io)?;
                }
                r = self.client_rd.read_buf(self.client_buf), if self.reading_client() => {
                    if r? == 0 {
                        return Ok(Ending::ClientLeft);
                    }
                    if let Some(end) = self.on_client_data().await? {
                        return Ok(end);
                    }
                }
                r = self.backend_rd.read_buf(self.backend_buf), if self.to_client.len() < HIGH_WATER => {
                    match r {
                        Ok(n) if n > 0 => {
                            self.on_backend_data()?;
                            if let Some(end) = self.resume_parked().await? {
                                return Ok(end);
                            }
                        }
                        _ if self.track.at_rest() && self.flow.movable().is_ok() => return Ok(Ending::BackendLost),
                        Ok(_) => return Err(ReadError::Closed.into()),
                        Err(e) => return Err(ReadError::Io(e).into()),
                    }
                }
                _ = self.ctx.shutdown.cancelled(), if !draining => draining = true,
                _ = self.ctx.force_close.cancelled() => return Err(SessionError::Shutdown),
            }
        }
    }

    /// Whether to read the client now: not while too much waits for the backend, and while a
    /// request waits for the probe only until the read buffer holds a fair amount (it is still
    /// read, so a client that leaves meanwhile is noticed).
    fn reading_client(&self) -> bool {
        self.to_backend.len() < HIGH_WATER && (self.flow.parked.is_none() || self.client_buf.len() < HIGH_WATER)
    }

    /// After backend data: if a parked request's probe has been answered, decide it now and
    /// carry on with what the client sent meanwhile.
    async fn resume_parked(&mut self) -> Result<Option<Ending>, SessionError> {
        if self.flow.probe == Some(Probe::Running) {
            return Ok(None);
        }
        match self.flow.parked.take() {
            Some(Parked::Query { frame, classified, effects }) => self.query(frame, classified, effects).await?,
            Some(Parked::Batch) => self.run_batch().await?,
            None => return Ok(None),
        }
        self.on_client_data().await
    }

    /// Tells the client why it is being closed, after whatever was already on its way.
    async fn finish(&mut self, result: &Result<Ending, SessionError>) {
        let mut tail = BytesMut::new();
        match result {
            Ok(Ending::Drained) => {
                PgError::fatal(SqlState::ADMIN_SHUTDOWN, "terminating connection due to administrator command")
                    .encode(&mut tail)
            }
            Err(SessionError::Upstream(_)) if self.upstream_said_fatal => {}
            Err(e) => e.encode(&mut tail),
            Ok(Ending::ClientLeft | Ending::BackendLost) => {}
        }
        self.to_client.push(tail.freeze());
        if !matches!(result, Err(SessionError::ClientIo(_)) | Ok(Ending::ClientLeft)) {
            // Also flushes what was owed before a lost backend, so nothing is dropped.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                self.client_wr.write_all_buf(&mut self.to_client).await?;
                self.client_wr.flush().await
            })
            .await;
        }
    }

    /// Queues a frame for the backend and notes it.
    pub(super) fn send(&mut self, frame: Bytes) {
        if let Some(&tag) = frame.first() {
            self.track.client_sent(tag);
        }
        self.to_backend.push(frame);
    }

    /// Handles the complete client frames at the front of the read buffer. Frames that need
    /// no inspection pass as one chunk; queries and extended-protocol messages go to the cache
    /// logic. Returns an ending if the client sent Terminate.
    async fn on_client_data(&mut self) -> Result<Option<Ending>, SessionError> {
        loop {
            if self.flow.parked.is_some() {
                // The rest waits, in order, until the parked request is decided.
                return Ok(None);
            }
            let run = self.plain_run()?;
            if run > 0 {
                if !self.flow.batch.is_empty() {
                    self.run_batch().await?;
                }
                let chunk = self.client_buf.split_to(run).freeze();
                self.to_backend.push(chunk);
            }
            let Some(frame) = take_frame(self.client_buf, self.max_message)? else { return Ok(None) };
            match frame.tag() {
                // Terminate ends the client's session, not the pooled backend's.
                fe::TERMINATE => return Ok(Some(Ending::ClientLeft)),
                fe::QUERY | fe::FUNCTION_CALL => {
                    self.ctx.wait_while_paused().await;
                    if !self.flow.batch.is_empty() {
                        self.run_batch().await?;
                    }
                    if frame.tag() == fe::QUERY {
                        self.on_query(frame).await?;
                    } else {
                        self.forward_request(frame, Expect::Query);
                    }
                }
                _ => self.on_extended(frame).await?,
            }
        }
    }

    /// Length of the complete frames at the front of the client buffer that pass through
    /// uninspected (COPY data and anything unknown).
    fn plain_run(&mut self) -> Result<usize, SessionError> {
        let mut at = 0;
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
            self.track.client_sent(tag);
            at += len;
        }
        Ok(at)
    }

    /// Sends a request to the backend and queues the answer it is owed.
    pub(super) fn request(&mut self, bytes: Bytes, answer: Forwarded) {
        self.send(bytes);
        self.flow.pipeline.items.push_back(Item::Backend(answer));
    }

    /// Forwards a request as the client sent it, expecting `expect` as its answer.
    pub(super) fn forward_request(&mut self, frame: Frame, expect: Expect) {
        self.request(frame.into_raw(), Forwarded::new(expect));
    }

    /// Routes the complete backend frames at the front of the read buffer: through the
    /// pipeline, to the client (as slices of the bytes read, in order with pgcache's own
    /// answers) or nowhere (answers to pgcache's own requests).
    pub(super) fn on_backend_data(&mut self) -> Result<(), SessionError> {
        let mut out: Vec<Out> = Vec::new();
        self.flow.emit_locals(self.track.status, &mut out);
        let (mut at, mut run_start) = (0, 0);
        let buf: &BytesMut = self.backend_buf;
        while let Some(len) = frame_len(&buf[at..], BACKEND_MAX_FRAME).map_err(ReadError::Frame)? {
            if buf.len() - at < len {
                break;
            }
            let raw = &buf[at..at + len];
            let (tag, body) = (raw[0], &raw[5..]);
            self.track.backend_sent(tag, body).map_err(|_| ReadError::Malformed)?;
            if tag == be::ERROR_RESPONSE {
                let fields = be::error_fields(body).map_err(|_| ReadError::Malformed)?;
                self.upstream_said_fatal |= fields.severity == "FATAL" || fields.severity == "PANIC";
            }
            let routed =
                self.flow.route(self.ctx, self.params, self.track.status, raw).map_err(|_| ReadError::Malformed)?;
            if !routed.visible {
                out.push(Out::Range(run_start, at));
                run_start = at + len;
            }
            at += len;
            if routed.completed {
                out.push(Out::Range(run_start, at));
                run_start = at;
                self.flow.emit_locals(self.track.status, &mut out);
            }
        }
        out.push(Out::Range(run_start, at));
        let consumed = self.backend_buf.split_to(at).freeze();
        for o in out {
            match o {
                Out::Range(a, b) if b > a => self.to_client.push(consumed.slice(a..b)),
                Out::Range(..) => {}
                Out::Bytes(b) => self.to_client.push(b),
            }
        }
        Ok(())
    }

    /// Emits local answers now if nothing before them is pending (called after queuing them).
    pub(super) fn flush_locals(&mut self) {
        let mut out = Vec::new();
        self.flow.emit_locals(self.track.status, &mut out);
        for o in out {
            if let Out::Bytes(b) = o {
                self.to_client.push(b);
            }
        }
    }
}

/// A piece of output, in order: a range of the backend bytes just read, or pgcache's own.
pub(super) enum Out {
    Range(usize, usize),
    Bytes(Bytes),
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
