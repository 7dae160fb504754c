//! The frontend (client → server) messages pgcache inspects, decoded without copying and without
//! trusting any count or length field (Postgres docs, "Message Formats").
//!
//! Everything else a client sends is forwarded as an opaque [`Frame`](super::Frame).

use bytes::Bytes;

use super::{Reader, Truncated};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const FLUSH: u8 = b'H';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const FUNCTION_CALL: u8 = b'F';
pub const PASSWORD: u8 = b'p';

/// Simple-protocol Query: SQL text as the client's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a [u8],
}

/// Parse: create a prepared statement (`name` empty for the unnamed one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub sql: &'a [u8],
    pub param_types: Vec<u32>,
}

/// Bind: create a portal from a statement and parameter values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<&'a [u8]>>,
    pub result_formats: Vec<i16>,
}

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// Describe or Close of a statement or portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Named<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

/// Execute a portal, returning at most `max_rows` rows (0 = all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a [u8],
    pub max_rows: i32,
}

fn finish<T>(r: &Reader<'_>, v: T) -> Result<T, Truncated> {
    if r.remaining() == 0 { Ok(v) } else { Err(Truncated) }
}

pub fn query(body: &[u8]) -> Result<Query<'_>, Truncated> {
    let mut r = Reader::new(body);
    let sql = r.cstr()?;
    finish(&r, Query { sql })
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, Truncated> {
    let mut r = Reader::new(body);
    let name = r.cstr()?;
    let sql = r.cstr()?;
    let n = r.count16()?;
    if r.remaining() < n * 4 {
        return Err(Truncated);
    }
    let param_types = (0..n).map(|_| r.i32().map(|t| t as u32)).collect::<Result<_, _>>()?;
    finish(&r, Parse { name, sql, param_types })
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, Truncated> {
    let (portal, statement, param_formats, params, result_formats) = bind_with(body, |v| v)?;
    Ok(Bind { portal, statement, param_formats, params, result_formats })
}

/// A Bind's portal, statement, parameter formats, parameters and result formats.
type BindOf<P> = (P, P, Vec<i16>, Vec<Option<P>>, Vec<i16>);

/// The parts of a Bind's `body`, each name and value passed through `part` as it is read.
fn bind_with<'a, P>(body: &'a [u8], part: impl Fn(&'a [u8]) -> P) -> Result<BindOf<P>, Truncated> {
    let mut r = Reader::new(body);
    let portal = part(r.cstr()?);
    let statement = part(r.cstr()?);
    let param_formats = formats(&mut r)?;
    let n = r.count16()?;
    if r.remaining() < n * 4 {
        return Err(Truncated);
    }
    let mut params = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.i32()?;
        params.push(if len < 0 { None } else { Some(part(r.bytes(len as usize)?)) });
    }
    let result_formats = formats(&mut r)?;
    finish(&r, (portal, statement, param_formats, params, result_formats))
}

/// A Bind whose parts are slices of its frame (no copies), for code that keeps it past the
/// frame's decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindParts {
    /// The whole frame the parts are slices of (empty when built otherwise): while it is held,
    /// its address names this one Bind.
    pub raw: Bytes,
    pub portal: Bytes,
    pub statement: Bytes,
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
}

impl BindParts {
    /// Decodes the Bind in `raw` (a whole frame, header included).
    pub fn decode(raw: &Bytes) -> Result<BindParts, Truncated> {
        // Each name and value sliced as it is read (no second vector).
        let body = raw.get(5..).ok_or(Truncated)?;
        let (portal, statement, param_formats, params, result_formats) = bind_with(body, |v| raw.slice_ref(v))?;
        Ok(BindParts { raw: raw.clone(), portal, statement, param_formats, params, result_formats })
    }

    /// The format of parameter `i` (Postgres docs, "Bind": none given means text, one given
    /// applies to all).
    pub fn param_format(&self, i: usize) -> i16 {
        match self.param_formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        }
    }
}

fn formats(r: &mut Reader<'_>) -> Result<Vec<i16>, Truncated> {
    let n = r.count16()?;
    if r.remaining() < n * 2 {
        return Err(Truncated);
    }
    (0..n).map(|_| r.i16()).collect()
}

/// Describe and Close share one layout: a target byte and a name.
pub fn named(body: &[u8]) -> Result<Named<'_>, Truncated> {
    let mut r = Reader::new(body);
    let target = match r.u8()? {
        b'S' => Target::Statement,
        b'P' => Target::Portal,
        _ => return Err(Truncated),
    };
    let name = r.cstr()?;
    finish(&r, Named { target, name })
}

pub fn execute(body: &[u8]) -> Result<Execute<'_>, Truncated> {
    let mut r = Reader::new(body);
    let portal = r.cstr()?;
    let max_rows = r.i32()?;
    finish(&r, Execute { portal, max_rows })
}

/// A PasswordMessage carrying a cleartext password (NUL-terminated).
/// `raw` (a whole Parse, Bind, Describe or Close frame) with the statement name it carries
/// replaced by `name`: the first string of a Parse, the second of a Bind, the string after the
/// target byte of a Describe or Close. `None` if the frame is too short to hold it.
pub fn rename_statement(raw: &[u8], name: &[u8]) -> Option<Bytes> {
    let body = raw.get(5..)?;
    let cstr_end = |from: usize| body.get(from..)?.iter().position(|&b| b == 0).map(|p| from + p);
    let start = match raw[0] {
        PARSE => 0,
        BIND => cstr_end(0)? + 1,
        DESCRIBE | CLOSE => 1,
        _ => return None,
    };
    let end = cstr_end(start)?;
    let mut out = Vec::with_capacity(raw.len() - (end - start) + name.len());
    out.push(raw[0]);
    out.extend_from_slice(&((body.len() - (end - start) + name.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(name);
    out.extend_from_slice(&body[end..]);
    Some(Bytes::from(out))
}

pub fn password(body: &[u8]) -> Result<&[u8], Truncated> {
    let mut r = Reader::new(body);
    let pw = r.cstr()?;
    finish(&r, pw)
}

/// A SASLInitialResponse body: the mechanism and the client's first message (empty when
/// absent, length -1).
pub fn sasl_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), Truncated> {
    let mut r = Reader::new(body);
    let mechanism = r.cstr()?;
    let len = r.i32()?;
    let data = if len < 0 { &[][..] } else { r.bytes(len as usize)? };
    finish(&r, (mechanism, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_body() -> Vec<u8> {
        let mut b = b"p1\0s1\0".to_vec();
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&42i32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    #[test]
    fn bind_decodes_params_and_formats() {
        let body = bind_body();
        let b = bind(&body).unwrap();
        assert_eq!(b.portal, b"p1");
        assert_eq!(b.statement, b"s1");
        assert_eq!(b.param_formats, vec![1]);
        assert_eq!(b.params, vec![Some(&42i32.to_be_bytes()[..]), None]);
        assert_eq!(b.result_formats, vec![0]);
    }

    #[test]
    fn every_truncation_of_bind_is_an_error_not_a_panic() {
        let body = bind_body();
        for cut in 0..body.len() {
            assert!(bind(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(bind(&long).is_err());
    }

    #[test]
    fn bind_parts_are_the_binds_slices_of_the_frame() {
        let frame = |body: &[u8]| {
            let mut f = vec![BIND];
            f.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
            f.extend_from_slice(body);
            Bytes::from(f)
        };
        let body = bind_body();
        let (raw, b) = (frame(&body), bind(&body).unwrap());
        let parts = BindParts::decode(&raw).unwrap();
        assert_eq!((&parts.portal[..], &parts.statement[..]), (b.portal, b.statement));
        assert_eq!((parts.param_formats, parts.result_formats), (b.param_formats, b.result_formats));
        assert_eq!(parts.params.iter().map(|p| p.as_deref()).collect::<Vec<_>>(), b.params);
        for cut in 0..body.len() {
            assert!(BindParts::decode(&frame(&body[..cut])).is_err(), "cut at {cut}");
        }
        assert!(BindParts::decode(&frame(&[body.as_slice(), &[0]].concat())).is_err());
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&i16::MAX.to_be_bytes());
        assert!(bind(&b).is_err());
        let mut p = b"\0select 1\0".to_vec();
        p.extend_from_slice(&(-5i16).to_be_bytes());
        assert!(parse(&p).is_err());
    }

    #[test]
    fn parse_describe_execute_query() {
        let mut p = b"s\0select $1\0".to_vec();
        p.extend_from_slice(&1i16.to_be_bytes());
        p.extend_from_slice(&23i32.to_be_bytes());
        let parsed = parse(&p).unwrap();
        assert_eq!((parsed.name, parsed.sql, parsed.param_types), (&b"s"[..], &b"select $1"[..], vec![23]));
        assert_eq!(named(b"Pabc\0").unwrap(), Named { target: Target::Portal, name: b"abc" });
        assert!(named(b"Xabc\0").is_err());
        let mut e = b"\0".to_vec();
        e.extend_from_slice(&10i32.to_be_bytes());
        assert_eq!(execute(&e).unwrap().max_rows, 10);
        assert_eq!(query(b"select 1\0").unwrap().sql, b"select 1");
        assert!(query(b"select 1").is_err());
    }

    #[test]
    fn statement_names_are_replaced_in_place() {
        let frame = |tag: u8, body: &[u8]| {
            let mut f = vec![tag];
            f.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            f.extend_from_slice(body);
            f
        };
        let mut tail = 1i16.to_be_bytes().to_vec();
        tail.extend_from_slice(&23i32.to_be_bytes());
        let parse = frame(PARSE, &[b"s1\0select $1\0".as_slice(), &tail].concat());
        let renamed = rename_statement(&parse, b"pgcache_x").unwrap();
        let p = super::parse(&renamed[5..]).unwrap();
        assert_eq!((p.name, p.sql, p.param_types), (&b"pgcache_x"[..], &b"select $1"[..], vec![23]));
        let body = bind_body();
        let renamed = rename_statement(&frame(BIND, &body), b"").unwrap();
        let b = bind(&renamed[5..]).unwrap();
        assert_eq!((b.portal, b.statement, b.params.len()), (&b"p1"[..], &b""[..], 2));
        let renamed = rename_statement(&frame(DESCRIBE, b"Ss1\0"), b"long_name").unwrap();
        assert_eq!(named(&renamed[5..]).unwrap(), Named { target: Target::Statement, name: b"long_name" });
        assert_eq!(&renamed[1..5], &((renamed.len() - 1) as i32).to_be_bytes());
        assert!(rename_statement(&frame(CLOSE, b"Ss1"), b"x").is_none(), "no terminator");
        assert!(rename_statement(&frame(EXECUTE, b"\0"), b"x").is_none());
    }
}
