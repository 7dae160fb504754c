//! Giving a session a backend: the one place a backend connection is made to show a
//! session's state — at log-in, when a session takes a backend again (transaction pooling,
//! or after its backend was lost), and for a background refresh on the session's behalf.
//!
//! A connection carries what pgcache knows of its session state
//! ([`SessionState`]): as started, started plus settings pgcache applied, or unknown. When
//! that is exactly the session's, nothing is sent. Otherwise, in one round trip, the
//! connection is reset to its startup state (`SET SESSION AUTHORIZATION DEFAULT` — which
//! also resets the role — `RESET ALL` and `DISCARD SEQUENCES`), the session's settings are applied with
//! `set_config`, and, while the cache is in use, the settings probe reads back what the
//! connection now has: that reading becomes the session's key (so a result filled on this
//! connection is stored under the state it was computed in), and it must equal what the
//! session had, or the session is ended — pgcache never guesses a session's state.

use bytes::{Bytes, BytesMut};

use crate::backend::Connection;
use crate::backend::connection::{ReadError, SessionState};
use crate::context::Context;
use crate::protocol::backend as be;

use super::core::settings::Settings;
use super::replay::{self, ReplayError};

/// Resets a connection to its startup state: the session authorization and role (which
/// `RESET ALL` leaves alone), every setting, and the sequence values `currval`/`lastval`
/// would show.
const RESET: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DISCARD SEQUENCES";

/// When to read the settings back with the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBack {
    /// Never (the cache is not in use: nothing is keyed by them).
    No,
    /// When the connection had to be reset or given settings.
    IfChanged,
    /// Unless the connection was read already and has exactly the session's (a fill follows).
    Always,
}

/// What the session's state must be made of: the settings to apply (see
/// [`Settings::replay`]; none for a session that never changed any), the session's own
/// settings (what the probe must read back), and when to read them back.
pub struct Wanted<'a> {
    pub settings: Vec<(String, String)>,
    pub session: &'a mut Settings,
    pub read_back: ReadBack,
    /// Off only in tests (`pool.isolate_sessions`): the connection is taken as it is.
    pub isolate: bool,
}

impl<'a> Wanted<'a> {
    /// A session's state, read back when changed while the cache is in use.
    pub fn session(ctx: &Context, settings: Vec<(String, String)>, session: &'a mut Settings) -> Wanted<'a> {
        let read_back = if ctx.caching() { ReadBack::IfChanged } else { ReadBack::No };
        Wanted { settings, session, read_back, isolate: ctx.config().pool.isolate_sessions }
    }
}

/// Makes `conn` show the session's state. Returns whether anything had to be sent. On an
/// error the connection's state is unknown: the caller closes it.
pub async fn adopt(conn: &mut Connection, wanted: Wanted<'_>) -> Result<bool, ReplayError> {
    let Wanted { settings, session, read_back, isolate } = wanted;
    if isolate && session.undefined().any(|name| conn.defined.contains(name)) {
        return Err(ReplayError::Unsuitable);
    }
    let same = !isolate || conn.state == SessionState::Known(settings.clone());
    if same {
        session.attach(conn.verified.as_ref());
        if read_back != ReadBack::Always || session.verified().is_some() {
            return Ok(false);
        }
    }
    let verify = read_back == ReadBack::Always || (read_back == ReadBack::IfChanged && !same);
    let mut request = BytesMut::new();
    let mut requests = 0;
    if !same && conn.state != SessionState::startup() {
        postgres_protocol::message::frontend::query(RESET, &mut request)?;
        requests += 1;
    }
    if !same && !settings.is_empty() {
        request.extend_from_slice(&set_config(&settings)?);
        requests += 1;
    }
    let before = session.known().then(|| session.key_part(true));
    if verify {
        postgres_protocol::message::frontend::query(&session.probe_sql(), &mut request)?;
        requests += 1;
    }
    // Until it is known to have worked, the connection's state is unknown.
    conn.state = SessionState::Unknown;
    conn.verified = None;
    let answer = conn.exchange_many(&request, requests).await?;
    if let Some(e) = answer.iter().find(|f| f.tag() == be::ERROR_RESPONSE) {
        return Err(ReplayError::Refused(be::error_fields(e.body()).unwrap_or_default()));
    }
    if verify {
        // The probe is the last request: its rows follow the last RowDescription.
        let start = answer.iter().rposition(|f| f.tag() == be::ROW_DESCRIPTION).unwrap_or(0);
        let rows = answer[start..]
            .iter()
            .filter(|f| f.tag() == be::DATA_ROW)
            .map(|f| be::data_row_text(f.body()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ReadError::Malformed)?;
        let mut read = session.clone();
        read.forget();
        read.learn(rows);
        if !read.known() || before.as_ref().is_some_and(|b| *b != read.key_part(true)) {
            return Err(ReplayError::Mismatch);
        }
        conn.verified = Some(read.key_part(true));
        *session = read;
    } else {
        session.attach(None);
    }
    conn.state = SessionState::Known(settings);
    Ok(true)
}

/// `SELECT set_config($1, $2, false), ...` with the values as parameters (no quoting).
fn set_config(settings: &[(String, String)]) -> Result<BytesMut, ReplayError> {
    let calls: Vec<String> =
        (0..settings.len()).map(|i| format!("set_config(${}, ${}, false)", 2 * i + 1, 2 * i + 2)).collect();
    let sql = format!("SELECT {}", calls.join(", "));
    let params: Vec<Option<Bytes>> =
        settings.iter().flat_map(|(k, v)| [Some(Bytes::from(k.clone())), Some(Bytes::from(v.clone()))]).collect();
    Ok(replay::encode(&replay::Request::Extended {
        sql,
        param_types: Vec::new(),
        param_formats: Vec::new(),
        params,
        result_formats: Vec::new(),
    })?)
}
