//! Transaction-control statements as the console reads them — `BEGIN`/`START TRANSACTION`
//! (with any isolation level or access mode), `COMMIT`/`END` and `ROLLBACK`/`ABORT` (with
//! `AND [NO] CHAIN`), `SAVEPOINT`, `RELEASE [SAVEPOINT]`, `ROLLBACK TO [SAVEPOINT]` — in the
//! forms drivers send (psycopg's nested transactions and psql's `ON_ERROR_ROLLBACK` use
//! savepoints). What they do to the session is [`super::block`]'s.

use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;

/// A transaction-control statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control<'a> {
    /// `BEGIN` (`start`: written `START TRANSACTION`, which is also its tag).
    Begin {
        start: bool,
    },
    /// `COMMIT`/`END`; `chain`: `AND CHAIN` (a new block begins at once).
    Commit {
        chain: bool,
    },
    /// `ROLLBACK`/`ABORT`; `chain`: `AND CHAIN`.
    Rollback {
        chain: bool,
    },
    /// (Each with its savepoint's name as written: see [`folded`].)
    Savepoint(&'a str),
    Release(&'a str),
    RollbackTo(&'a str),
}

/// The words a `BEGIN` or `START TRANSACTION` may be followed by (isolation levels, access
/// modes); nothing here is isolated, so they change nothing.
const MODES: &[&str] = &[
    "WORK",
    "TRANSACTION",
    "ISOLATION",
    "LEVEL",
    "SERIALIZABLE",
    "REPEATABLE",
    "READ",
    "COMMITTED",
    "UNCOMMITTED",
    "WRITE",
    "ONLY",
    "NOT",
    "DEFERRABLE",
];

impl<'a> Control<'a> {
    /// Reads `words` (`up`: the same in upper case) as a transaction-control statement:
    /// `None` if they are not one, an error if they are one Postgres would refuse.
    pub fn parse(words: &[&'a str], up: &[&str]) -> Option<Result<Self, PgError>> {
        let syntax =
            || Some(Err(PgError::error(SqlState::SYNTAX_ERROR, format!("syntax error in {}", words.join(" ")))));
        let modes = |rest: &[&str]| rest.iter().flat_map(|w| w.split(',')).all(|w| w.is_empty() || MODES.contains(&w));
        let control = match up {
            ["BEGIN", rest @ ..] if modes(rest) => Control::Begin { start: false },
            ["START", "TRANSACTION", rest @ ..] if modes(rest) => Control::Begin { start: true },
            ["BEGIN", ..] | ["START", "TRANSACTION", ..] => return syntax(),
            ["SAVEPOINT", _] => Control::Savepoint(words[1]),
            ["RELEASE", "SAVEPOINT", _] => Control::Release(words[2]),
            ["RELEASE", _] => Control::Release(words[1]),
            ["ROLLBACK", "TO", "SAVEPOINT", _]
            | ["ROLLBACK", "WORK" | "TRANSACTION", "TO", "SAVEPOINT", _]
            | ["ROLLBACK", "TO", _]
            | ["ROLLBACK", "WORK" | "TRANSACTION", "TO", _] => Control::RollbackTo(words[words.len() - 1]),
            [verb @ ("COMMIT" | "END" | "ROLLBACK" | "ABORT"), rest @ ..] => {
                let rest = match rest {
                    ["WORK" | "TRANSACTION", rest @ ..] => rest,
                    rest => rest,
                };
                let chain = match rest {
                    [] | ["AND", "NO", "CHAIN"] => false,
                    ["AND", "CHAIN"] => true,
                    _ => return syntax(),
                };
                match *verb {
                    "COMMIT" | "END" => Control::Commit { chain },
                    _ => Control::Rollback { chain },
                }
            }
            ["SAVEPOINT" | "RELEASE", ..] => return syntax(),
            _ => return None,
        };
        Some(Ok(control))
    }

    /// The statement's name, as its tag and errors give it.
    pub fn name(&self) -> &'static str {
        match self {
            Control::Begin { start: false } => "BEGIN",
            Control::Begin { start: true } => "START TRANSACTION",
            Control::Commit { .. } => "COMMIT",
            Control::Rollback { .. } | Control::RollbackTo(_) => "ROLLBACK",
            Control::Savepoint(_) => "SAVEPOINT",
            Control::Release(_) => "RELEASE",
        }
    }

    /// Whether it ends a block (or returns a failed one to a savepoint): what a failed block
    /// still accepts.
    pub fn ends_a_failure(&self) -> bool {
        matches!(self, Control::Commit { .. } | Control::Rollback { .. } | Control::RollbackTo(_))
    }
}

/// A savepoint's name as Postgres folds it: as written when quoted, else in lower case.
pub fn folded(word: &str) -> String {
    match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => word.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<Result<Control<'_>, PgError>> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let up: Vec<&str> = upper.iter().map(String::as_str).collect();
        Control::parse(&words, &up)
    }

    #[test]
    fn reads_what_drivers_send() {
        fn ok(t: &str) -> Option<Control<'_>> {
            parse(t).and_then(Result::ok)
        }
        assert_eq!(ok("BEGIN"), Some(Control::Begin { start: false }));
        assert_eq!(ok("begin isolation level repeatable read, read only"), Some(Control::Begin { start: false }));
        assert_eq!(ok("START TRANSACTION READ WRITE"), Some(Control::Begin { start: true }));
        assert_eq!(ok("END"), Some(Control::Commit { chain: false }));
        assert_eq!(ok("COMMIT AND CHAIN"), Some(Control::Commit { chain: true }));
        assert_eq!(ok("ROLLBACK WORK AND NO CHAIN"), Some(Control::Rollback { chain: false }));
        assert_eq!(ok("SAVEPOINT \"_pg3_1\""), Some(Control::Savepoint("\"_pg3_1\"")));
        assert_eq!(ok("RELEASE SAVEPOINT sp"), Some(Control::Release("sp")));
        assert_eq!(ok("RELEASE sp"), Some(Control::Release("sp")));
        assert_eq!(ok("ROLLBACK TO SAVEPOINT \"_pg3_1\""), Some(Control::RollbackTo("\"_pg3_1\"")));
        assert_eq!(ok("ROLLBACK TRANSACTION TO sp"), Some(Control::RollbackTo("sp")));
        assert!(matches!(parse("BEGIN garbage"), Some(Err(_))));
        assert!(matches!(parse("COMMIT PREPARED 'x'"), Some(Err(_))));
        assert!(parse("SHOW STATS").is_none());
        assert_eq!(folded("\"_pg3_1\""), "_pg3_1");
        assert_eq!(folded("Sp"), "sp");
    }
}
