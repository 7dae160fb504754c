//! The console's transaction block. The console has no transactions, but drivers open a block
//! before every query unless told otherwise (psycopg's default, pgjdbc with autocommit off),
//! and some set savepoints in it (psycopg's nested transactions, psql's `ON_ERROR_ROLLBACK`,
//! pgjdbc's `autosave`): the statements of [`super::control`] are kept the way Postgres keeps
//! them — the status every ReadyForQuery reports; a block that fails at an error and refuses
//! everything but its end or a `ROLLBACK TO` one of its savepoints (25P02); savepoints by name
//! (3B001 for one that does not exist; 25P01 outside a block); a warning for a `BEGIN` inside a
//! block or an end outside one. Reading commands run inside a block as outside; commands that
//! change something are refused inside one (25001, as Postgres refuses `VACUUM`), since no
//! ROLLBACK could undo them.

use std::sync::Arc;

use bytes::BytesMut;

use crate::context::Context;
use crate::protocol::backend::{PgError, TransactionStatus};
use crate::protocol::sqlstate::SqlState;

use super::commands::{self, Command, ResultSet};
use super::control::{Control, folded};

/// Savepoints a block may hold at once.
const MAX_SAVEPOINTS: usize = 1024;

/// A console session's transaction status, and its block's savepoints.
#[derive(Debug, Default)]
pub struct Block {
    status: TransactionStatus,
    savepoints: Vec<String>,
}

impl Block {
    /// What ReadyForQuery reports.
    pub fn status(&self) -> TransactionStatus {
        self.status
    }

    /// An error was sent: an open block fails, and stays failed until it ends (or returns to
    /// a savepoint).
    pub fn failed(&mut self) {
        if self.status == TransactionStatus::InBlock {
            self.status = TransactionStatus::Failed;
        }
    }

    /// Whether `command` may be parsed or bound now: in a failed block, only what ends the
    /// failure is (as Postgres refuses a Parse or Bind there).
    pub fn admits(&self, command: &Command<'_>) -> Result<(), PgError> {
        match command {
            _ if self.status != TransactionStatus::Failed => Ok(()),
            Command::Control(c) if c.ends_a_failure() => Ok(()),
            _ => Err(aborted()),
        }
    }

    /// Whether a Describe of a statement or portal whose command has `columns` may be
    /// answered: in a failed block only one without columns is (as Postgres describes no rows
    /// there, and answers a Describe of `COMMIT`).
    pub fn describes(&self, columns: &[&str]) -> Result<(), PgError> {
        if self.status == TransactionStatus::Failed && !columns.is_empty() {
            return Err(aborted());
        }
        Ok(())
    }

    /// Whether `command` may run now: as [`Block::admits`], and not if it changes something
    /// inside a block.
    pub fn allows(&self, command: &Command<'_>) -> Result<(), PgError> {
        self.admits(command)?;
        if self.status == TransactionStatus::InBlock && command.changes_something() {
            return Err(PgError::error(
                SqlState::ACTIVE_SQL_TRANSACTION,
                format!("{} cannot run inside a transaction block", command.name()),
            )
            .with_hint("the admin console has no transactions: run it with autocommit on"));
        }
        Ok(())
    }

    /// Runs `command` as the block allows, a warning (if any) into `out`.
    pub async fn run(
        &mut self,
        ctx: &Arc<Context>,
        command: Command<'_>,
        out: &mut BytesMut,
    ) -> Result<ResultSet, PgError> {
        self.allows(&command)?;
        match command {
            Command::Control(control) => {
                let tag = self.control(control, out)?;
                Ok(ResultSet::new(&[], tag))
            }
            command => commands::run(ctx, command).await,
        }
    }

    /// Carries out a transaction-control statement; its tag.
    fn control(&mut self, control: Control<'_>, out: &mut BytesMut) -> Result<&'static str, PgError> {
        use TransactionStatus::{Failed, Idle, InBlock};
        let outside = |what: &str| {
            PgError::error(
                SqlState::NO_ACTIVE_SQL_TRANSACTION,
                format!("{what} can only be used in transaction blocks"),
            )
        };
        let tag = control.name();
        match (control, self.status) {
            (Control::Begin { .. }, Idle) => self.status = InBlock,
            (Control::Begin { .. }, _) => {
                PgError::warning(SqlState::ACTIVE_SQL_TRANSACTION, "there is already a transaction in progress")
                    .encode_notice(out)
            }
            (Control::Commit { chain: true }, Idle) => return Err(outside("COMMIT AND CHAIN")),
            (Control::Rollback { chain: true }, Idle) => return Err(outside("ROLLBACK AND CHAIN")),
            (Control::Commit { .. } | Control::Rollback { .. }, Idle) => {
                PgError::warning(SqlState::NO_ACTIVE_SQL_TRANSACTION, "there is no transaction in progress")
                    .encode_notice(out)
            }
            (Control::Commit { chain } | Control::Rollback { chain }, status) => {
                self.savepoints.clear();
                self.status = if chain { InBlock } else { Idle };
                // As Postgres answers a COMMIT of a failed block.
                return Ok(if status == Failed { "ROLLBACK" } else { tag });
            }
            (Control::Savepoint(_), Idle) => return Err(outside("SAVEPOINT")),
            (Control::Release(_), Idle) => return Err(outside("RELEASE SAVEPOINT")),
            (Control::RollbackTo(_), Idle) => return Err(outside("ROLLBACK TO SAVEPOINT")),
            (Control::Savepoint(name), _) => {
                if self.savepoints.len() >= MAX_SAVEPOINTS {
                    return Err(PgError::error(
                        SqlState::PROGRAM_LIMIT_EXCEEDED,
                        format!("the pgcache admin console holds at most {MAX_SAVEPOINTS} savepoints"),
                    ));
                }
                self.savepoints.push(folded(name));
            }
            // A savepoint and those set after it go; rolling back to one keeps it.
            (Control::Release(name), _) => self.savepoints.truncate(self.find(name)?),
            (Control::RollbackTo(name), _) => {
                self.savepoints.truncate(self.find(name)? + 1);
                self.status = InBlock;
            }
        }
        Ok(tag)
    }

    /// Where the savepoint `name` (as written) is: the last set under that name.
    fn find(&self, name: &str) -> Result<usize, PgError> {
        let name = folded(name);
        self.savepoints.iter().rposition(|s| *s == name).ok_or_else(|| {
            PgError::error(SqlState::INVALID_SAVEPOINT_SPECIFICATION, format!("savepoint \"{name}\" does not exist"))
        })
    }
}

/// The error of a command refused in a failed block.
fn aborted() -> PgError {
    PgError::error(
        SqlState::IN_FAILED_SQL_TRANSACTION,
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(block: &mut Block, c: Control<'_>) -> Result<&'static str, PgError> {
        block.control(c, &mut BytesMut::new())
    }

    #[test]
    fn a_block_refuses_changes_and_fails_at_an_error() {
        let mut block = Block { status: TransactionStatus::InBlock, ..Block::default() };
        assert!(block.allows(&Command::Show(commands::Show::Stats)).is_ok());
        assert!(block.describes(&["name"]).is_ok());
        let e = block.allows(&Command::Reload).unwrap_err();
        assert_eq!(e.code, SqlState::ACTIVE_SQL_TRANSACTION);
        assert!(block.admits(&Command::Reload).is_ok(), "parsed and bound, refused when run");
        block.failed();
        assert_eq!(block.status(), TransactionStatus::Failed);
        let e = block.allows(&Command::Show(commands::Show::Stats)).unwrap_err();
        assert_eq!(e.code, SqlState::IN_FAILED_SQL_TRANSACTION);
        assert!(block.admits(&Command::Show(commands::Show::Stats)).is_err());
        assert!(block.describes(&["name"]).is_err(), "no rows described in a failed block");
        assert!(block.describes(&[]).is_ok(), "a command without rows is (COMMIT, say)");
        assert!(block.allows(&Command::Control(Control::Rollback { chain: false })).is_ok());
        assert!(block.allows(&Command::Control(Control::Begin { start: false })).is_err(), "as in Postgres");
        assert!(block.allows(&Command::Control(Control::Savepoint("s"))).is_err());
        let mut idle = Block::default();
        idle.failed();
        assert_eq!(idle.status(), TransactionStatus::Idle, "outside a block an error keeps nothing");
        assert!(idle.allows(&Command::Reload).is_ok());
    }

    #[test]
    fn savepoints_are_kept_by_name_and_return_a_failed_block_to_work() {
        let mut block = Block::default();
        let e = control(&mut block, Control::Savepoint("a")).unwrap_err();
        assert_eq!(e.code, SqlState::NO_ACTIVE_SQL_TRANSACTION);
        assert_eq!(control(&mut block, Control::Begin { start: true }).unwrap(), "START TRANSACTION");
        for name in ["a", "\"B\"", "c"] {
            assert_eq!(control(&mut block, Control::Savepoint(name)).unwrap(), "SAVEPOINT");
        }
        let e = control(&mut block, Control::Release("b")).unwrap_err();
        assert_eq!(e.code, SqlState::INVALID_SAVEPOINT_SPECIFICATION, "\"B\" is not b");
        block.failed();
        assert_eq!(control(&mut block, Control::RollbackTo("\"B\"")).unwrap(), "ROLLBACK");
        assert_eq!(block.status(), TransactionStatus::InBlock);
        assert_eq!(block.savepoints, ["a", "B"], "c went, B stays");
        assert_eq!(control(&mut block, Control::Release("A")).unwrap(), "RELEASE");
        assert!(block.savepoints.is_empty());
        block.failed();
        assert_eq!(control(&mut block, Control::Commit { chain: true }).unwrap(), "ROLLBACK");
        assert_eq!(block.status(), TransactionStatus::InBlock, "and chained");
        assert_eq!(control(&mut block, Control::Commit { chain: false }).unwrap(), "COMMIT");
        assert_eq!(block.status(), TransactionStatus::Idle);
        let e = control(&mut block, Control::Rollback { chain: true }).unwrap_err();
        assert_eq!(e.code, SqlState::NO_ACTIVE_SQL_TRANSACTION);
    }
}
