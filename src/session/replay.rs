//! What pgcache sends on a pooled connection on a session's behalf — its settings
//! ([`super::adopt`]), a request to recompute an entry ([`super::refresh`]) — and how that
//! fails.

use std::io;

use bytes::{Bytes, BytesMut};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend::{self, BindError};

use crate::backend::PoolError;
use crate::backend::connection::ReadError;
use crate::protocol::backend::ErrorFields;

/// Why replaying a request (or a session's settings) on a pooled connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Only for what no client could have sent (a NUL in the SQL, over 65535 parameters).
    #[error("cannot encode the request: {0}")]
    Encode(#[from] io::Error),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("Postgres refused the settings: {0}")]
    Refused(ErrorFields),
    #[error("the query no longer runs cleanly")]
    NotClean,
    /// The settings read back on a connection given the session's differ from the
    /// session's: something about its state cannot be reproduced there.
    #[error("the session's settings read back differently on another backend connection")]
    Mismatch,
    /// Another session defined a custom setting on the connection that this session has not
    /// (Postgres cannot undefine it): another connection is needed.
    #[error("the backend connection has custom settings defined that the session has not")]
    Unsuitable,
}

/// The request to replay.
#[derive(Debug, Clone)]
pub enum Request {
    Simple {
        sql: String,
    },
    Extended {
        sql: String,
        param_types: Vec<u32>,
        param_formats: Vec<i16>,
        params: Vec<Option<Bytes>>,
        result_formats: Vec<i16>,
    },
}

/// The request as the client sent it: a Query, or Parse/Bind/Describe/Execute/Sync on the
/// unnamed statement and portal. Fails only for what no client could have sent (a NUL in
/// the SQL, more than 65535 parameters).
pub fn encode(request: &Request) -> io::Result<BytesMut> {
    let mut out = BytesMut::new();
    match request {
        Request::Simple { sql } => frontend::query(sql, &mut out)?,
        Request::Extended { sql, param_types, param_formats, params, result_formats } => {
            frontend::parse("", sql, param_types.iter().copied(), &mut out)?;
            let value = |v: &Option<Bytes>, buf: &mut BytesMut| {
                Ok(match v {
                    Some(v) => {
                        buf.extend_from_slice(v);
                        IsNull::No
                    }
                    None => IsNull::Yes,
                })
            };
            frontend::bind(
                "",
                "",
                param_formats.iter().copied(),
                params,
                value,
                result_formats.iter().copied(),
                &mut out,
            )
            .map_err(|e| match e {
                BindError::Serialization(e) => e,
                BindError::Conversion(e) => io::Error::other(e),
            })?;
            frontend::describe(b'P', "", &mut out)?;
            frontend::execute("", 0, &mut out)?;
            frontend::sync(&mut out);
        }
    }
    Ok(out)
}
