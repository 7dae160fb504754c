//! The psql admin console: `psql -h 127.0.0.1 -p 6432 -U <admin> pgcache` connects to a
//! virtual database (`console.database`) served by pgcache itself.
//!
//! Only users listed in `console.users` may connect, and they authenticate as for any
//! database: in `passthrough` mode Postgres verifies the login (on a connection of its own to
//! the upstream URL's database, closed at once — the console shares no pool and no cache with
//! applications). Commands come in the simple query protocol (psql, `simple_query` in
//! drivers), several in one string separated by semicolons, or in the extended protocol, one
//! per statement ([`super::extended`]); within a transaction block if the client opens one
//! ([`super::block`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::backend::Secret;
use crate::backend::connection::Connection;
use crate::backend::{ConnectError, PoolError};
use crate::config::AuthMethod;
use crate::context::Context;
use crate::frontend::{Client, SessionError, ask_password, welcome};
use crate::protocol::backend::{self as be, PgError};
use crate::protocol::frontend as fe;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::{MAX_STARTUP_PACKET, Startup};

use super::block::Block;
use super::commands::{Command, ResultSet};

/// Serves an admin session from its StartupMessage to its end.
pub async fn serve(ctx: &Arc<Context>, client: &mut Client, startup: &Startup) -> Result<(), SessionError> {
    let config = ctx.config();
    let user = startup.param("user").unwrap_or(&config.upstream.user).to_owned();
    if !config.console.users.contains(&user) {
        return Err(SessionError::Refused(PgError::fatal(
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            format!("pgcache: user {user:?} may not use the admin console (console.users)"),
        )));
    }
    let server_version = authenticate(ctx, client, &user).await?;
    let handle = ctx.clients.register(None);
    let params: BTreeMap<String, String> = [
        ("server_version", server_version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
        ("application_name", startup.param("application_name").unwrap_or("")),
        ("is_superuser", "off"),
        ("session_authorization", user.as_str()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    client.send(&welcome(&params, handle.pid, handle.secret)).await?;
    tracing::info!(peer = %client.peer, %user, "admin console session started");
    run(ctx, client).await
}

/// Verifies the login like any other (`auth.method`: SCRAM against the role's verifier, or
/// Postgres judging a cleartext password), returning the server version to report.
async fn authenticate(ctx: &Arc<Context>, client: &mut Client, user: &str) -> Result<String, SessionError> {
    const VERSION: &str = "15.0 (pgcache console)";
    let config = ctx.config();
    match config.auth.method {
        AuthMethod::Trust => return Ok(VERSION.into()),
        AuthMethod::ScramSha256 => {
            crate::frontend::scram::authenticate(client, ctx, user).await?;
            return Ok(VERSION.into());
        }
        AuthMethod::Cleartext => {}
    }
    let params =
        Arc::new(vec![("user".to_owned(), user.to_owned()), ("database".to_owned(), config.upstream.dbname.clone())]);
    let endpoint = ctx.pools.endpoint();
    let mut secret = None;
    loop {
        match Connection::connect(endpoint, params.clone(), secret.as_ref()).await {
            Ok(conn) => {
                let version = conn.params.get("server_version").cloned().unwrap_or_else(|| "15.0".into());
                conn.terminate().await;
                return Ok(format!("{version} (pgcache console)"));
            }
            Err(ConnectError::PasswordRequired) if secret.is_none() => {
                secret = Some(Secret::Password(ask_password(client, config.auth.allow_plaintext_over_network).await?))
            }
            Err(e) => return Err(SessionError::Pool(PoolError::Connect(e))),
        }
    }
}

/// The command loop.
async fn run(ctx: &Arc<Context>, client: &mut Client) -> Result<(), SessionError> {
    let mut extended = super::extended::Extended::default();
    let mut block = Block::default();
    loop {
        let frame = tokio::select! {
            f = client.read_frame(MAX_STARTUP_PACKET.max(1 << 20)) => f,
            _ = ctx.shutdown.cancelled() => return Err(SessionError::Shutdown),
        };
        let frame = match frame {
            Ok(f) => f,
            Err(SessionError::ClientClosed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut out = BytesMut::new();
        match frame.tag() {
            fe::TERMINATE => return Ok(()),
            // After an error in the extended protocol everything up to the Sync is ignored.
            fe::QUERY if extended.skipping() => {}
            fe::QUERY => {
                extended.on_query();
                let sql = fe::query(frame.body()).ok().and_then(|q| std::str::from_utf8(q.sql).ok()).unwrap_or("");
                answer(ctx, &mut block, sql, &mut out).await;
                be::ready_for_query(block.status(), &mut out);
            }
            _ => extended.on_message(ctx, &mut block, &frame, &mut out).await,
        }
        if !out.is_empty() {
            client.send(&out).await?;
        }
    }
}

/// Runs every command in `sql` (semicolon-separated), stopping at the first error.
async fn answer(ctx: &Arc<Context>, block: &mut Block, sql: &str, out: &mut BytesMut) {
    let parts: Vec<&str> = split(sql).into_iter().map(str::trim).filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        be::empty_query_response(out);
        return;
    }
    for part in parts {
        let answered = match Command::parse(part) {
            Ok(command) => block.run(ctx, command, out).await,
            Err(e) => Err(e),
        };
        match answered {
            Ok(result) => encode(&result, out),
            Err(e) => {
                e.encode(out);
                block.failed();
                return;
            }
        }
    }
}

/// RowDescription (text columns; none for a command without any, `SET`), DataRows and
/// CommandComplete.
fn encode(r: &ResultSet, out: &mut BytesMut) {
    if !r.columns.is_empty() {
        be::row_description_text(&r.columns, out);
    }
    for row in &r.rows {
        be::data_row_text_msg(row, out);
    }
    be::command_complete(&tag_of(r), out);
}

/// The command tag of an answer: `SELECT n` for those that show rows, as psql expects.
fn tag_of(r: &ResultSet) -> String {
    command_tag(&r.tag, r.rows.len())
}

/// The CommandComplete tag of a command tagged `tag` that sent `rows` rows: `SELECT n` for
/// the commands that show rows (`SHOW`, `EXPLAIN`), else the command's own.
pub(super) fn command_tag(tag: &str, rows: usize) -> String {
    if tag == "SHOW" || tag == "EXPLAIN" { format!("SELECT {rows}") } else { tag.to_owned() }
}

/// Splits on semicolons outside quotes (`'...'`, `"..."`, `$tag$...$tag$`). pg_query's
/// splitters do not fit: console commands are not SQL, and its scanner drops statements it
/// does not recognise.
pub(super) fn split(sql: &str) -> Vec<&str> {
    let bytes = sql.as_bytes();
    let (mut parts, mut start, mut i) = (Vec::new(), 0, 0);
    while i < bytes.len() {
        match bytes[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() && bytes[i] != q {
                    i += 1;
                }
            }
            b'$' => {
                if let Some(len) = sql[i + 1..]
                    .find('$')
                    .filter(|l| sql[i + 1..i + 1 + l].chars().all(|c| c.is_alphanumeric() || c == '_'))
                {
                    let tag = &sql[i..i + len + 2];
                    match sql[i + tag.len()..].find(tag) {
                        Some(end) => i += tag.len() + end + tag.len() - 1,
                        None => i = bytes.len(),
                    }
                }
            }
            b';' => {
                parts.push(&sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&sql[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn splits_outside_quotes() {
        assert_eq!(split("RELOAD"), vec!["RELOAD"]);
        assert_eq!(split("SHOW STATS; SHOW POOLS;"), vec!["SHOW STATS", " SHOW POOLS", ""]);
        assert_eq!(split("EXPLAIN CACHE SELECT ';' FROM t; PAUSE"), vec!["EXPLAIN CACHE SELECT ';' FROM t", " PAUSE"]);
        assert_eq!(split("EXPLAIN CACHE SELECT $x$;$x$; RESUME"), vec!["EXPLAIN CACHE SELECT $x$;$x$", " RESUME"]);
        assert_eq!(split("SELECT $1; X"), vec!["SELECT $1", " X"]);
    }
}
