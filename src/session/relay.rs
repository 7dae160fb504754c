//! The relay loop: once a client has its backend, frames flow both ways as raw bytes.
//!
//! One task, four directions: read client, write backend, read backend, write client. Each
//! read side is framed by header and inspected only by tag (plus the few bodies the
//! [`Tracker`] needs), then queued for the other side as the very bytes read. Reading a side
//! stops while the queue towards the other side is above a high-water mark, so a large result
//! streams with bounded memory and a slow client slows the backend down instead of filling
//! pgcache. Reading the backend never waits for the client to speak, so NOTIFY, notices and
//! ParameterStatus reach an idle client at once.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::Connection;
use crate::backend::connection::{BACKEND_MAX_FRAME, ReadError};
use crate::protocol::backend::{self as be, PgError};
use crate::protocol::frame::frame_len;
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;
use crate::server::Shared;

use super::SessionError;
use super::client::Client;
use super::queue::OutQueue;
use super::state::Tracker;

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
}

/// Relays between `client` and `conn` until one side ends. `track` holds the backend's
/// protocol state afterwards, which decides whether the connection can be reused.
pub async fn run(
    shared: &Shared,
    client: &mut Client,
    conn: &mut Connection,
    track: &mut Tracker,
) -> Result<Ending, SessionError> {
    let max_message = shared.config.client.max_message_bytes;
    let (mut client_rd, mut client_wr) = tokio::io::split(&mut client.stream);
    let (mut backend_rd, mut backend_wr) = tokio::io::split(&mut conn.stream);
    let (client_buf, backend_buf) = (&mut client.rbuf, &mut conn.rbuf);
    let mut to_client = OutQueue::default();
    let mut to_backend = OutQueue::default();
    let mut draining = false;
    let mut upstream_said_fatal = false;

    // The client may have pipelined messages behind its startup packet.
    let mut result = from_client(client_buf, max_message, track, &mut to_backend).transpose();
    while result.is_none() {
        if draining && track.at_rest() {
            result = Some(Ok(Ending::Drained));
            break;
        }
        reserve(client_buf);
        reserve(backend_buf);
        tokio::select! {
            r = client_wr.write_buf(&mut to_client), if !to_client.is_empty() => {
                let r = match r {
                    Ok(_) if to_client.is_empty() => client_wr.flush().await,
                    other => other.map(|_| ()),
                };
                if let Err(e) = r {
                    result = Some(Err(e.into()));
                }
            }
            r = backend_wr.write_buf(&mut to_backend), if !to_backend.is_empty() => {
                if let Err(e) = r {
                    result = Some(Err(ReadError::Io(e).into()));
                }
            }
            r = client_rd.read_buf(client_buf), if to_backend.len() < HIGH_WATER => {
                result = match r {
                    Ok(0) => Some(Ok(Ending::ClientLeft)),
                    Ok(_) => from_client(client_buf, max_message, track, &mut to_backend).transpose(),
                    Err(e) => Some(Err(e.into())),
                };
            }
            r = backend_rd.read_buf(backend_buf), if to_client.len() < HIGH_WATER => {
                result = match r {
                    Ok(0) => Some(Err(ReadError::Closed.into())),
                    Ok(_) => from_backend(backend_buf, track, &mut conn.params, &mut to_client, &mut upstream_said_fatal)
                        .err()
                        .map(Err),
                    Err(e) => Some(Err(ReadError::Io(e).into())),
                };
            }
            _ = shared.shutdown.cancelled(), if !draining => draining = true,
            _ = shared.force_close.cancelled() => result = Some(Err(SessionError::Shutdown)),
        }
    }
    let result = result.expect("the loop ends with a result");

    // Tell the client why it is being closed, after whatever was already on its way.
    let mut tail = BytesMut::new();
    match &result {
        Ok(Ending::Drained) => {
            PgError::fatal(SqlState::ADMIN_SHUTDOWN, "terminating connection due to administrator command")
                .encode(&mut tail)
        }
        Err(SessionError::Upstream(_)) if upstream_said_fatal => {}
        Err(e) => e.encode(&mut tail),
        Ok(Ending::ClientLeft) => {}
    }
    to_client.push(tail.freeze());
    if !matches!(result, Err(SessionError::ClientIo(_)) | Ok(Ending::ClientLeft)) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            client_wr.write_all_buf(&mut to_client).await?;
            client_wr.flush().await
        })
        .await;
    }
    result
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

/// Takes the complete client frames at the front of `buf`, notes them, and queues them for
/// the backend as one chunk. Returns an ending if the client sent Terminate.
fn from_client(
    buf: &mut BytesMut,
    max_message: usize,
    track: &mut Tracker,
    out: &mut OutQueue,
) -> Result<Option<Ending>, SessionError> {
    let mut run = 0;
    let mut ending = None;
    while let Some(len) = frame_len(&buf[run..], max_message)? {
        if buf.len() - run < len {
            break;
        }
        let tag = buf[run];
        if tag == fe::TERMINATE {
            // Terminate ends the client's session, not the pooled backend's.
            ending = Some(Ending::ClientLeft);
            break;
        }
        track.client_sent(tag);
        run += len;
    }
    if run > 0 {
        out.push(buf.split_to(run).freeze());
    }
    if ending.is_some() {
        buf.clear();
    }
    Ok(ending)
}

/// Takes the complete backend frames at the front of `buf`, notes them, and queues them for
/// the client as one chunk.
fn from_backend(
    buf: &mut BytesMut,
    track: &mut Tracker,
    params: &mut BTreeMap<String, String>,
    out: &mut OutQueue,
    said_fatal: &mut bool,
) -> Result<(), SessionError> {
    let mut run = 0;
    while let Some(len) = frame_len(&buf[run..], BACKEND_MAX_FRAME).map_err(ReadError::Frame)? {
        if buf.len() - run < len {
            break;
        }
        let (tag, body) = (buf[run], &buf[run + 5..run + len]);
        track.backend_sent(tag, body).map_err(|_| ReadError::Malformed)?;
        match tag {
            be::PARAMETER_STATUS => {
                let (name, value) = be::parameter_status(body).map_err(|_| ReadError::Malformed)?;
                params.insert(name, value);
            }
            be::ERROR_RESPONSE => {
                let fields = be::error_fields(body).map_err(|_| ReadError::Malformed)?;
                *said_fatal |= fields.severity == "FATAL" || fields.severity == "PANIC";
            }
            _ => {}
        }
        run += len;
    }
    if run > 0 {
        out.push(buf.split_to(run).freeze());
    }
    Ok(())
}

/// Encodes the messages a client expects after authentication on a pooled connection:
/// AuthenticationOk, the backend's ParameterStatus values, pgcache's own cancel key, and
/// ReadyForQuery.
pub fn welcome(params: &BTreeMap<String, String>, pid: i32, secret: i32) -> Bytes {
    let mut out = BytesMut::with_capacity(512);
    be::authentication_ok(&mut out);
    for (name, value) in params {
        be::parameter_status_msg(name, value, &mut out);
    }
    be::backend_key_data(pid, secret, &mut out);
    be::ready_for_query(be::TransactionStatus::Idle, &mut out);
    out.freeze()
}
