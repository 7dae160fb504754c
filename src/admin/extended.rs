//! The console's extended query protocol, for drivers that speak nothing else (asyncpg,
//! pgjdbc, pgx — Grafana's Postgres data source —, psycopg once it prepares): Parse, Bind,
//! Describe, Execute (with its row limit: the rest waits in the portal), Close, Flush and Sync,
//! with Postgres's rules — after an error every message is skipped up to the Sync, and the Sync
//! closes every portal.
//!
//! A statement holds one command, checked when it is parsed, and no parameters. Every
//! command's columns are known without running it ([`Command::columns`]), so a Describe runs
//! nothing; a portal runs its command at its first Execute and keeps the answer for the next
//! ones. Transaction blocks are the session's ([`super::block`]): the Sync reports their
//! status.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::context::Context;
use crate::protocol::Frame;
use crate::protocol::backend::{self as be, PgError};
use crate::protocol::frontend::{self as fe, Target};
use crate::protocol::sqlstate::SqlState;

use super::block::Block;
use super::commands::Command;

/// Named statements (and named portals) a console session may hold at once.
const MAX_STATEMENTS: usize = 256;

/// A session's statements and portals.
#[derive(Default)]
pub struct Extended {
    statements: HashMap<Bytes, Statement>,
    portals: HashMap<Bytes, Portal>,
    /// An error was sent: skip to the Sync.
    skipping: bool,
}

struct Statement {
    /// The command, trimmed (empty: an empty query).
    command: Arc<str>,
    param_types: Vec<u32>,
}

struct Portal {
    /// The statement it was bound from: closing that statement closes it too.
    statement: Bytes,
    command: Arc<str>,
    formats: Vec<i16>,
    /// The command's answer, once it ran.
    answer: Option<Answer>,
}

/// A command's answer, kept in its portal: the rows not yet sent, and its tag.
struct Answer {
    rows: VecDeque<Vec<Option<String>>>,
    tag: String,
}

impl Extended {
    /// Answers one extended-protocol message (anything but a Query or a Terminate) into `out`.
    pub async fn on_message(&mut self, ctx: &Arc<Context>, block: &mut Block, frame: &Frame, out: &mut BytesMut) {
        if frame.tag() == fe::SYNC {
            self.skipping = false;
            self.portals.clear();
            be::ready_for_query(block.status(), out);
            return;
        }
        if self.skipping {
            return;
        }
        if let Err(e) = self.step(ctx, block, frame, out).await {
            self.skipping = true;
            e.encode(out);
            block.failed();
        }
    }

    /// Whether an error was sent and everything up to the Sync is skipped.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// A simple Query drops the unnamed statement and portal, as in Postgres.
    pub fn on_query(&mut self) {
        self.statements.remove(&Bytes::new());
        self.portals.remove(&Bytes::new());
    }

    async fn step(
        &mut self,
        ctx: &Arc<Context>,
        block: &mut Block,
        frame: &Frame,
        out: &mut BytesMut,
    ) -> Result<(), PgError> {
        let body = frame.body();
        let malformed = || PgError::error(SqlState::PROTOCOL_VIOLATION, "malformed message");
        match frame.tag() {
            fe::PARSE => {
                let p = fe::parse(body).map_err(|_| malformed())?;
                let sql = std::str::from_utf8(p.sql).map_err(|_| malformed())?;
                let name = Bytes::copy_from_slice(p.name);
                // As in Postgres, a Parse into the unnamed statement drops the old one first,
                // whether or not the new one is refused.
                if name.is_empty() {
                    self.statements.remove(&name);
                }
                may_add(&self.statements, &name, "prepared statement", SqlState::DUPLICATE_PREPARED_STATEMENT)?;
                let mut parts = super::console::split(sql).into_iter().map(str::trim).filter(|p| !p.is_empty());
                let command: Arc<str> = parts.next().unwrap_or("").into();
                if parts.next().is_some() {
                    return Err(PgError::error(
                        SqlState::SYNTAX_ERROR,
                        "cannot insert multiple commands into a prepared statement",
                    ));
                }
                // An unknown command is refused here, as Postgres refuses a syntax error; so is
                // any but the end of a failed block.
                admitted(&command, block)?;
                self.statements.insert(name, Statement { command, param_types: p.param_types });
                be::parse_complete(out);
            }
            fe::BIND => {
                let b = fe::bind(body).map_err(|_| malformed())?;
                let statement = self.statement(b.statement)?;
                if b.params.len() != statement.param_types.len() {
                    return Err(PgError::error(
                        SqlState::PROTOCOL_VIOLATION,
                        format!(
                            "bind message supplies {} parameters, but prepared statement \"{}\" requires {}",
                            b.params.len(),
                            String::from_utf8_lossy(b.statement),
                            statement.param_types.len()
                        ),
                    ));
                }
                // (Formats for a command with no columns are not looked at, as in Postgres.)
                let width = admitted(&statement.command, block)?.len();
                if width > 0 && b.result_formats.len() > 1 && b.result_formats.len() != width {
                    return Err(PgError::error(
                        SqlState::PROTOCOL_VIOLATION,
                        format!(
                            "bind message has {} result formats but query has {width} columns",
                            b.result_formats.len()
                        ),
                    ));
                }
                let portal = Portal {
                    statement: Bytes::copy_from_slice(b.statement),
                    command: statement.command.clone(),
                    formats: b.result_formats,
                    answer: None,
                };
                let name = Bytes::copy_from_slice(b.portal);
                may_add(&self.portals, &name, "portal", SqlState::DUPLICATE_CURSOR)?;
                self.portals.insert(name, portal);
                be::bind_complete(out);
            }
            fe::DESCRIBE => {
                let d = fe::named(body).map_err(|_| malformed())?;
                match d.target {
                    Target::Statement => {
                        let statement = self.statement(d.name)?;
                        // (A type left to the server is text, as Postgres would infer it here.)
                        let types: Vec<u32> =
                            statement.param_types.iter().map(|&t| if t == 0 { be::TEXT_OID } else { t }).collect();
                        let columns = columns(&statement.command)?;
                        block.describes(columns)?;
                        be::parameter_description(&types, out);
                        describe(columns, &[], out);
                    }
                    Target::Portal => {
                        let portal = self.portal(d.name)?;
                        let columns = columns(&portal.command)?;
                        block.describes(columns)?;
                        describe(columns, &portal.formats, out);
                    }
                }
            }
            fe::EXECUTE => {
                let e = fe::execute(body).map_err(|_| malformed())?;
                let portal = self.portal(e.portal)?;
                if portal.command.is_empty() {
                    be::empty_query_response(out);
                    return Ok(());
                }
                let answer = portal.answer(ctx, block, out).await?;
                let rows = &mut answer.rows;
                let n = if e.max_rows > 0 { (e.max_rows as usize).min(rows.len()) } else { rows.len() };
                rows.drain(..n).for_each(|row| be::data_row_text_msg(&row, out));
                if rows.is_empty() {
                    // As Postgres counts them: the rows this Execute sent.
                    be::command_complete(&super::console::command_tag(&answer.tag, n), out);
                } else {
                    be::portal_suspended(out);
                }
            }
            fe::CLOSE => {
                let c = fe::named(body).map_err(|_| malformed())?;
                match c.target {
                    Target::Statement => {
                        self.statements.remove(c.name);
                        // As in Postgres: the portals bound from it go with it.
                        self.portals.retain(|_, p| p.statement != c.name);
                    }
                    Target::Portal => drop(self.portals.remove(c.name)),
                }
                be::close_complete(out);
            }
            // Everything is sent as it is answered.
            fe::FLUSH => {}
            other => {
                return Err(PgError::error(
                    SqlState::PROTOCOL_VIOLATION,
                    format!("unexpected message type {:?} on the admin console", other as char),
                ));
            }
        }
        Ok(())
    }

    fn statement(&self, name: &[u8]) -> Result<&Statement, PgError> {
        self.statements.get(name).ok_or_else(|| {
            PgError::error(
                SqlState::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{}\" does not exist", String::from_utf8_lossy(name)),
            )
        })
    }

    fn portal(&mut self, name: &[u8]) -> Result<&mut Portal, PgError> {
        self.portals.get_mut(name).ok_or_else(|| {
            PgError::error(
                SqlState::INVALID_CURSOR_NAME,
                format!("portal \"{}\" does not exist", String::from_utf8_lossy(name)),
            )
        })
    }
}

impl Portal {
    /// The command's answer: run (as `block` allows, a warning into `out`) the first time it
    /// is asked for, then kept.
    async fn answer(
        &mut self,
        ctx: &Arc<Context>,
        block: &mut Block,
        out: &mut BytesMut,
    ) -> Result<&mut Answer, PgError> {
        if self.answer.is_none() {
            let r = block.run(ctx, Command::parse(&self.command)?, out).await?;
            self.answer = Some(Answer { rows: r.rows.into(), tag: r.tag });
        }
        Ok(self.answer.as_mut().expect("just kept"))
    }
}

/// Whether `map` (of statements or portals, each called `what`) may take a new one named `name`:
/// a named one must be new (else `duplicate`), and at most [`MAX_STATEMENTS`] named ones are
/// held (the unnamed one is replaced, never refused).
fn may_add<V>(map: &HashMap<Bytes, V>, name: &Bytes, what: &str, duplicate: SqlState) -> Result<(), PgError> {
    if name.is_empty() {
        return Ok(());
    }
    if map.contains_key(name) {
        return Err(PgError::error(duplicate, format!("{what} \"{}\" already exists", String::from_utf8_lossy(name))));
    }
    let named = map.len() - usize::from(map.contains_key(&Bytes::new()));
    if named >= MAX_STATEMENTS {
        return Err(PgError::error(
            SqlState::PROGRAM_LIMIT_EXCEEDED,
            format!("the pgcache admin console holds at most {MAX_STATEMENTS} {what}s"),
        ));
    }
    Ok(())
}

/// The columns `command`'s answer has (none for an empty query), or why it is no command.
fn columns(command: &str) -> Result<&'static [&'static str], PgError> {
    if command.is_empty() {
        return Ok(&[]);
    }
    Ok(Command::parse(command)?.columns())
}

/// [`columns`], once `block` has admitted the command (a Parse or a Bind of it).
fn admitted(command: &str, block: &Block) -> Result<&'static [&'static str], PgError> {
    if command.is_empty() {
        return Ok(&[]);
    }
    let command = Command::parse(command)?;
    block.admits(&command)?;
    Ok(command.columns())
}

/// The answer to a Describe of a command with these columns, sent in these formats: its
/// RowDescription, or NoData for a command without columns.
fn describe(columns: &[&str], formats: &[i16], out: &mut BytesMut) {
    if columns.is_empty() {
        be::no_data(out);
    } else {
        be::row_description_text_as(columns, formats, out);
    }
}
