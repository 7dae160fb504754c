//! Session state that lives only in one backend connection and cannot be rebuilt on another:
//! what a statement takes ([`Hold::Take`]) and gives back ([`Hold::Release`]). A session that
//! holds any of it stays on its backend (in transaction pooling, and when its backend is lost,
//! it cannot move) until it is released.

use std::sync::Arc;

use pg_query::NodeRef;
use pg_query::protobuf::DiscardMode;

use super::relation::Relation;

/// A kind of backend-bound session state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Held {
    /// `LISTEN channel`; released by `UNLISTEN channel` or `UNLISTEN *`.
    Listen,
    /// `DECLARE ... WITH HOLD` (other cursors end with their transaction); released by `CLOSE`.
    Cursor,
    /// SQL `PREPARE name`; released by `DEALLOCATE name` or `DEALLOCATE ALL`.
    Prepared,
    /// `pg_advisory_lock` and friends at session level; released only by
    /// `pg_advisory_unlock_all()` (single unlocks cannot be counted safely: an unlock of a
    /// lock not held, or a `pg_try_` that failed, would make a count lie).
    AdvisoryLock,
    /// A temporary table, view or sequence; released by `DISCARD TEMP`.
    Temp,
    /// `LOAD`: never released.
    Library,
}

impl Held {
    /// Why a session holding this cannot move, for logs and errors.
    pub fn describe(self) -> &'static str {
        match self {
            Held::Listen => "LISTEN",
            Held::Cursor => "an open WITH HOLD cursor",
            Held::Prepared => "a SQL-level prepared statement",
            Held::AdvisoryLock => "a session advisory lock",
            Held::Temp => "temporary objects",
            Held::Library => "a loaded library",
        }
    }

    /// A short label for metrics and the console.
    pub fn label(self) -> &'static str {
        match self {
            Held::Listen => "listen",
            Held::Cursor => "cursor",
            Held::Prepared => "prepare",
            Held::AdvisoryLock => "advisory_lock",
            Held::Temp => "temp",
            Held::Library => "load",
        }
    }

    pub const ALL: [Held; 6] =
        [Held::Listen, Held::Cursor, Held::Prepared, Held::AdvisoryLock, Held::Temp, Held::Library];
}

/// What one statement does to backend-bound state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// Takes the named thing (the empty name where there is none to tell apart).
    Take(Held, Arc<str>),
    /// Gives back the named thing, or every thing of its kind (`None`).
    Release(Held, Option<Arc<str>>),
    /// `DISCARD ALL`: everything but loaded libraries.
    ReleaseAll,
}

/// `DECLARE` option bit for `WITH HOLD` (Postgres's `CURSOR_OPT_HOLD`).
const CURSOR_OPT_HOLD: i32 = 0x0020;

/// What the statement `node` (calling `functions`) does to backend-bound state.
pub fn hold_of(node: NodeRef<'_>, functions: &[Relation], creates_temp: bool) -> Option<Hold> {
    let named = |name: &str| (!name.is_empty()).then(|| Arc::from(name));
    let take = |held, name: &str| Some(Hold::Take(held, name_or_empty(named(name))));
    match node {
        NodeRef::ListenStmt(s) => take(Held::Listen, &s.conditionname),
        NodeRef::UnlistenStmt(s) => Some(Hold::Release(Held::Listen, named(&s.conditionname))),
        NodeRef::DeclareCursorStmt(s) if s.options & CURSOR_OPT_HOLD != 0 => take(Held::Cursor, &s.portalname),
        NodeRef::ClosePortalStmt(s) => Some(Hold::Release(Held::Cursor, named(&s.portalname))),
        NodeRef::PrepareStmt(s) => take(Held::Prepared, &s.name),
        NodeRef::DeallocateStmt(s) if s.isall => Some(Hold::Release(Held::Prepared, None)),
        NodeRef::DeallocateStmt(s) => Some(Hold::Release(Held::Prepared, named(&s.name))),
        NodeRef::LoadStmt(_) => Some(Hold::Take(Held::Library, Arc::from(""))),
        NodeRef::DiscardStmt(s) if s.target == DiscardMode::DiscardAll as i32 => Some(Hold::ReleaseAll),
        NodeRef::DiscardStmt(s) if s.target == DiscardMode::DiscardTemp as i32 => Some(Hold::Release(Held::Temp, None)),
        _ if creates_temp => Some(Hold::Take(Held::Temp, Arc::from(""))),
        _ if functions.iter().any(|f| f.name == "pg_advisory_unlock_all") => {
            Some(Hold::Release(Held::AdvisoryLock, None))
        }
        _ if functions
            .iter()
            .any(|f| f.name.starts_with("pg_advisory_lock") || f.name.starts_with("pg_try_advisory_lock")) =>
        {
            Some(Hold::Take(Held::AdvisoryLock, Arc::from("")))
        }
        _ => None,
    }
}

fn name_or_empty(name: Option<Arc<str>>) -> Arc<str> {
    name.unwrap_or_else(|| Arc::from(""))
}

/// The backend-bound state a session holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holds(Vec<(Held, Arc<str>)>);

impl Holds {
    /// Applies what a statement does; returns the kind newly held, if it takes one.
    pub fn apply(&mut self, hold: &Hold) -> Option<Held> {
        match hold {
            Hold::Take(held, name) => {
                let new = !self.0.iter().any(|(h, _)| h == held);
                if !self.0.iter().any(|(h, n)| h == held && n == name) {
                    self.0.push((*held, name.clone()));
                }
                new.then_some(*held)
            }
            Hold::Release(held, None) => {
                self.0.retain(|(h, _)| h != held);
                None
            }
            Hold::Release(held, Some(name)) => {
                self.0.retain(|(h, n)| !(h == held && n == name));
                None
            }
            Hold::ReleaseAll => {
                self.0.retain(|(h, _)| *h == Held::Library);
                None
            }
        }
    }

    /// The first kind held, if any.
    pub fn first(&self) -> Option<Held> {
        self.0.first().map(|(h, _)| *h)
    }

    pub fn holds(&self, held: Held) -> bool {
        self.0.iter().any(|(h, _)| *h == held)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_and_releases_by_name_and_by_kind() {
        let mut h = Holds::default();
        let n = |s: &str| Arc::from(s);
        assert_eq!(h.apply(&Hold::Take(Held::Listen, n("a"))), Some(Held::Listen));
        assert_eq!(h.apply(&Hold::Take(Held::Listen, n("b"))), None, "already held");
        h.apply(&Hold::Release(Held::Listen, Some(n("a"))));
        assert!(h.holds(Held::Listen), "b is still listened to");
        h.apply(&Hold::Release(Held::Listen, None));
        assert!(h.is_empty());
        h.apply(&Hold::Take(Held::Library, n("")));
        h.apply(&Hold::Take(Held::Temp, n("")));
        h.apply(&Hold::ReleaseAll);
        assert_eq!(h.first(), Some(Held::Library), "DISCARD ALL does not unload libraries");
    }
}
