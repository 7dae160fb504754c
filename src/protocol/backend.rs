//! Backend (server → client) messages: the few fields pgcache reads from what Postgres sends,
//! and the messages pgcache originates itself (errors, authentication requests, the startup
//! sequence for a pooled connection, ReadyForQuery after a cache hit).
//!
//! Generated messages are encoded with pgwire's message types; reads use our own checked
//! [`Reader`] so a malformed backend message is an error, never a panic.

use bytes::{Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, NoticeResponse, ReadyForQuery};
use pgwire::messages::startup::{Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey};

use super::sqlstate::SqlState;
use super::{Reader, Truncated};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NO_DATA: u8 = b'n';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransactionStatus {
    #[default]
    Idle,
    InBlock,
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InBlock),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }

    fn wire(self) -> pgwire::messages::response::TransactionStatus {
        use pgwire::messages::response::TransactionStatus as W;
        match self {
            Self::Idle => W::Idle,
            Self::InBlock => W::Transaction,
            Self::Failed => W::Error,
        }
    }
}

/// Reads the status byte of a ReadyForQuery body.
pub fn ready_status(body: &[u8]) -> Result<TransactionStatus, Truncated> {
    match body {
        [b] => TransactionStatus::from_byte(*b).ok_or(Truncated),
        _ => Err(Truncated),
    }
}

/// Reads a ParameterStatus body: name and value.
pub fn parameter_status(body: &[u8]) -> Result<(String, String), Truncated> {
    let mut r = Reader::new(body);
    let name = String::from_utf8_lossy(r.cstr()?).into_owned();
    let value = String::from_utf8_lossy(r.cstr()?).into_owned();
    Ok((name, value))
}

/// Reads a CommandComplete tag.
pub fn command_tag(body: &[u8]) -> Result<&[u8], Truncated> {
    Reader::new(body).cstr()
}

/// Reads a DataRow's values as text (for pgcache's own queries, which use the text format).
pub fn data_row_text(body: &[u8]) -> Result<Vec<Option<String>>, Truncated> {
    let mut r = Reader::new(body);
    let n = r.count16()?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        values.push(if len < 0 { None } else { Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned()) });
    }
    Ok(values)
}

/// The fields of an ErrorResponse or NoticeResponse that pgcache looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)
    }
}

/// Reads the severity, code and message fields of an ErrorResponse/NoticeResponse body.
pub fn error_fields(body: &[u8]) -> Result<ErrorFields, Truncated> {
    let mut r = Reader::new(body);
    let mut fields = ErrorFields::default();
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            return Ok(fields);
        }
        let value = String::from_utf8_lossy(r.cstr()?).into_owned();
        match kind {
            // 'V' is the non-localized severity; prefer it over 'S'.
            b'V' => fields.severity = value,
            b'S' if fields.severity.is_empty() => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
}

/// Severity of an error pgcache reports itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    /// In a NoticeResponse only.
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Warning => "WARNING",
        }
    }
}

/// An error pgcache originates, as a client will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity.as_str(), self.message, self.code)
    }
}

impl PgError {
    pub fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        PgError { severity, code, message: message.into(), detail: None, hint: None }
    }

    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    /// A warning, sent with [`PgError::encode_notice`].
    pub fn warning(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, message)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn fields(&self) -> Vec<(u8, String)> {
        let sev = self.severity.as_str().to_owned();
        let mut f =
            vec![(b'S', sev.clone()), (b'V', sev), (b'C', self.code.code().to_owned()), (b'M', self.message.clone())];
        if let Some(d) = &self.detail {
            f.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            f.push((b'H', h.clone()));
        }
        f
    }

    pub fn encode(&self, out: &mut BytesMut) {
        put(out, &ErrorResponse::new(self.fields()));
    }

    /// Encodes the same fields as a NoticeResponse (used for warnings pgcache emits).
    pub fn encode_notice(&self, out: &mut BytesMut) {
        put(out, &NoticeResponse::new(self.fields()));
    }
}

fn put(out: &mut BytesMut, msg: &impl Message) {
    // Encoding only fails for out-of-range secret keys, which pgcache never builds.
    msg.encode(out).expect("encoding a well-formed message cannot fail");
}

pub fn ready_for_query(status: TransactionStatus, out: &mut BytesMut) {
    put(out, &ReadyForQuery::new(status.wire()));
}

pub fn authentication_ok(out: &mut BytesMut) {
    put(out, &Authentication::Ok);
}

pub fn authentication_cleartext(out: &mut BytesMut) {
    put(out, &Authentication::CleartextPassword);
}

/// AuthenticationSASL with these mechanisms, in order of preference.
pub fn authentication_sasl(mechanisms: &[&str], out: &mut BytesMut) {
    put(out, &Authentication::SASL(mechanisms.iter().map(|m| (*m).to_owned()).collect()));
}

pub fn authentication_sasl_continue(data: &[u8], out: &mut BytesMut) {
    put(out, &Authentication::SASLContinue(Bytes::copy_from_slice(data)));
}

pub fn authentication_sasl_final(data: &[u8], out: &mut BytesMut) {
    put(out, &Authentication::SASLFinal(Bytes::copy_from_slice(data)));
}

pub fn parameter_status_msg(name: &str, value: &str, out: &mut BytesMut) {
    put(out, &ParameterStatus::new(name.to_owned(), value.to_owned()));
}

pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    put(out, &BackendKeyData::new(pid, SecretKey::I32(secret)));
}

/// The type oid of `text`, the type of every column pgcache answers itself.
pub const TEXT_OID: u32 = 25;

/// A RowDescription of text columns (for pgcache's own result sets).
pub fn row_description_text(columns: &[&str], out: &mut BytesMut) {
    row_description_text_as(columns, &[], out);
}

/// A RowDescription of text columns sent in the result formats a Bind asked for (none: all
/// text; one: all in that one; else one per column). A text value's binary form is its text.
pub fn row_description_text_as(columns: &[&str], formats: &[i16], out: &mut BytesMut) {
    use pgwire::messages::data::{FieldDescription, RowDescription};
    let format = |i: usize| match formats {
        [] => 0,
        [one] => *one,
        all => all.get(i).copied().unwrap_or(0),
    };
    let fields = columns
        .iter()
        .enumerate()
        .map(|(i, c)| FieldDescription::new((*c).to_owned(), 0, 0, TEXT_OID, -1, -1, format(i)))
        .collect();
    put(out, &RowDescription::new(fields));
}

/// A ParameterDescription of these parameter types.
pub fn parameter_description(types: &[u32], out: &mut BytesMut) {
    put(out, &pgwire::messages::data::ParameterDescription::new(types.to_vec()));
}

/// NoData: a described statement returns no rows.
pub fn no_data(out: &mut BytesMut) {
    put(out, &pgwire::messages::data::NoData::new());
}

/// A DataRow of text values (`None` is NULL).
pub fn data_row_text_msg(values: &[Option<String>], out: &mut BytesMut) {
    use bytes::BufMut;
    let mut data = BytesMut::new();
    for v in values {
        match v {
            Some(s) => {
                data.put_i32(s.len() as i32);
                data.put_slice(s.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    put(out, &pgwire::messages::data::DataRow::new(data, values.len() as i16));
}

pub fn command_complete(tag: &str, out: &mut BytesMut) {
    put(out, &pgwire::messages::response::CommandComplete::new(tag.to_owned()));
}

pub fn parse_complete(out: &mut BytesMut) {
    put(out, &pgwire::messages::extendedquery::ParseComplete::new());
}

pub fn bind_complete(out: &mut BytesMut) {
    put(out, &pgwire::messages::extendedquery::BindComplete::new());
}

pub fn close_complete(out: &mut BytesMut) {
    put(out, &pgwire::messages::extendedquery::CloseComplete::new());
}

pub fn portal_suspended(out: &mut BytesMut) {
    put(out, &pgwire::messages::extendedquery::PortalSuspended::new());
}

pub fn empty_query_response(out: &mut BytesMut) {
    put(out, &pgwire::messages::response::EmptyQueryResponse::new());
}

/// Tells a client that asked for a newer 3.x minor version or `_pq_.` options that this
/// server speaks 3.0 (Postgres docs, "Protocol versions").
pub fn negotiate_protocol_version(unsupported: Vec<String>, out: &mut BytesMut) {
    put(out, &NegotiateProtocolVersion::new(0, unsupported));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::take_frame;

    #[test]
    fn generated_error_reads_back() {
        let mut out = BytesMut::new();
        PgError::fatal(SqlState::ADMIN_SHUTDOWN, "bye").with_hint("later").encode(&mut out);
        let f = take_frame(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), ERROR_RESPONSE);
        let e = error_fields(f.body()).unwrap();
        assert_eq!((e.severity.as_str(), e.code.as_str(), e.message.as_str()), ("FATAL", "57P01", "bye"));
    }

    #[test]
    fn ready_for_query_round_trip() {
        for s in [TransactionStatus::Idle, TransactionStatus::InBlock, TransactionStatus::Failed] {
            let mut out = BytesMut::new();
            ready_for_query(s, &mut out);
            let f = take_frame(&mut out, 1 << 20).unwrap().unwrap();
            assert_eq!(ready_status(f.body()).unwrap(), s);
        }
        assert!(ready_status(b"").is_err());
        assert!(ready_status(b"X").is_err());
    }

    #[test]
    fn truncated_error_is_an_error() {
        assert!(error_fields(b"SERROR\0Cxx").is_err());
        assert!(parameter_status(b"a\0b").is_err());
    }
}
