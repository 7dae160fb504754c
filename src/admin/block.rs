//! The console's transaction block. The console has no transactions, but drivers open a block
//! before every query unless told otherwise (psycopg's default, pgjdbc with autocommit off):
//! `BEGIN`/`START TRANSACTION`, `COMMIT`/`END` and `ROLLBACK`/`ABORT` are accepted and kept
//! the way Postgres keeps them — the status every ReadyForQuery reports, a block that fails at
//! an error and refuses everything but its end (25P02), a warning for a BEGIN inside one or an
//! end outside one. Reading commands run inside a block as outside; commands that change
//! something are refused inside one (25001, as Postgres refuses `VACUUM`), since no ROLLBACK
//! could undo them.

use std::sync::Arc;

use bytes::BytesMut;

use crate::context::Context;
use crate::protocol::backend::{PgError, TransactionStatus};
use crate::protocol::sqlstate::SqlState;

use super::commands::{self, Command, Control, ResultSet};

/// A console session's transaction status.
#[derive(Debug, Default)]
pub struct Block {
    status: TransactionStatus,
}

impl Block {
    /// What ReadyForQuery reports.
    pub fn status(&self) -> TransactionStatus {
        self.status
    }

    /// An error was sent: an open block fails, and stays failed until it ends.
    pub fn failed(&mut self) {
        if self.status == TransactionStatus::InBlock {
            self.status = TransactionStatus::Failed;
        }
    }

    /// Whether `command` may run now: not while the block is failed (except its end), and not
    /// if it changes something inside a block.
    pub fn allows(&self, command: &Command<'_>) -> Result<(), PgError> {
        match (self.status, command) {
            (TransactionStatus::Idle, _) | (_, Command::Control(Control::Commit | Control::Rollback)) => Ok(()),
            (TransactionStatus::Failed, _) => Err(PgError::error(
                SqlState::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            )),
            (TransactionStatus::InBlock, c) if c.changes_something() => Err(PgError::error(
                SqlState::ACTIVE_SQL_TRANSACTION,
                format!("{} cannot run inside a transaction block", c.name()),
            )
            .with_hint("the admin console has no transactions: run it with autocommit on")),
            (TransactionStatus::InBlock, _) => Ok(()),
        }
    }

    /// Runs `command` as the block allows, a warning (if any) into `out`.
    pub async fn run(
        &mut self,
        ctx: &Arc<Context>,
        command: Command<'_>,
        out: &mut BytesMut,
    ) -> Result<ResultSet, PgError> {
        self.allows(&command)?;
        let Command::Control(control) = command else {
            return commands::run(ctx, command).await;
        };
        let tag = match (control, self.status) {
            (Control::Begin, TransactionStatus::Idle) => "BEGIN",
            (Control::Begin, _) => {
                PgError::warning(SqlState::ACTIVE_SQL_TRANSACTION, "there is already a transaction in progress")
                    .encode_notice(out);
                return Ok(ResultSet::new(&[], "BEGIN"));
            }
            (Control::Commit | Control::Rollback, TransactionStatus::Idle) => {
                PgError::warning(SqlState::NO_ACTIVE_SQL_TRANSACTION, "there is no transaction in progress")
                    .encode_notice(out);
                command.name()
            }
            // As Postgres answers a COMMIT of a failed block.
            (_, TransactionStatus::Failed) => "ROLLBACK",
            (Control::Commit | Control::Rollback, TransactionStatus::InBlock) => command.name(),
        };
        self.status = if control == Control::Begin { TransactionStatus::InBlock } else { TransactionStatus::Idle };
        Ok(ResultSet::new(&[], tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_refuses_changes_and_fails_at_an_error() {
        let mut block = Block { status: TransactionStatus::InBlock };
        assert!(block.allows(&Command::Show(commands::Show::Stats)).is_ok());
        let e = block.allows(&Command::Reload).unwrap_err();
        assert_eq!(e.code, SqlState::ACTIVE_SQL_TRANSACTION);
        block.failed();
        assert_eq!(block.status(), TransactionStatus::Failed);
        let e = block.allows(&Command::Show(commands::Show::Stats)).unwrap_err();
        assert_eq!(e.code, SqlState::IN_FAILED_SQL_TRANSACTION);
        assert!(block.allows(&Command::Control(Control::Rollback)).is_ok());
        assert!(block.allows(&Command::Control(Control::Begin)).is_err(), "as in Postgres");
        let mut idle = Block::default();
        idle.failed();
        assert_eq!(idle.status(), TransactionStatus::Idle, "outside a block an error keeps nothing");
        assert!(idle.allows(&Command::Reload).is_ok());
    }
}
