//! What a statement does: the invalidations it causes ([`Effect`], looked up by the relay in
//! the catalog) and what it does to the session ([`Core::note`]: the settings the cache key is
//! built from, temporary objects, state that pins the session to its backend). What it does
//! to its transaction ([`Step`]) is applied when its answer arrives, in the backend's order
//! ([`Core::completed`]): a client may pipeline several transactions, and what one of them
//! wrote is committed or rolled back only when Postgres says so.

use crate::protocol::backend::TransactionStatus;
use crate::query::{Classified, Held, Hold, Kind, Relation, SessionChange, TxControl};

use super::{Action, Core};

/// One invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// These resolved relations changed.
    Relations(Vec<Relation>),
    /// Only the rows of this resolved relation whose key (`column`, its primary key, see
    /// [`crate::query::point`]) is one of `values` changed.
    Keys { relation: Relation, column: String, values: Vec<crate::query::point::KeyValue> },
    /// Every relation with this name, in any schema, changed.
    Name(String),
    /// Something unknown changed (subject to `cache.unknown_writes`).
    Unknown(&'static str),
    /// Anything cached may be wrong now (DDL on functions, types, roles, privileges).
    All,
}

/// How a statement ends or marks its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// COMMIT (a COMMIT of a failed transaction rolls it back: its tag says `ROLLBACK`).
    Commit,
    Rollback,
    /// SAVEPOINT, RELEASE, ROLLBACK TO: an error after it may not end the transaction.
    Savepoint,
}

/// One statement of a request, applied when its CommandComplete arrives: what it does to its
/// transaction and what it invalidates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub control: Option<Control>,
    pub effects: Vec<Effect>,
    /// It writes (a write or DDL, even one whose invalidations are empty).
    pub writes: bool,
    /// It is a statement pgcache cannot see into (DO, CALL, one it cannot parse): if it runs,
    /// custom settings it set could not be replayed on another backend. One that fails set
    /// nothing (its transaction, or subtransaction, undoes its `SET`s).
    pub unreplayable: bool,
}

impl Step {
    /// A statement pgcache could not see, which may write anything.
    pub fn unknown(why: &'static str) -> Step {
        Step { control: None, effects: vec![Effect::Unknown(why)], writes: true, unreplayable: false }
    }
}

/// Whether none of `steps` invalidates anything.
pub fn invalidates_nothing(steps: &[Step]) -> bool {
    steps.iter().all(|s| s.effects.is_empty())
}

/// Whether `c` may change session settings (so statements after it in the same batch cannot
/// be keyed before it has run): `SET`, `RESET`, `DISCARD`, `set_config`, transaction control
/// other than a plain `BEGIN` (which may end a transaction's `SET LOCAL`s), and anything whose
/// effects are unknown.
pub fn may_change_settings(c: &Classified) -> bool {
    c.settings.changes
        || match c.kind {
            Kind::Session(_) | Kind::Opaque | Kind::Unparseable => true,
            Kind::Transaction(TxControl::Begin { plain: true }) => false,
            Kind::Transaction(_) => true,
            _ => false,
        }
}

/// Why a session with temporary objects does not use the cache (they may shadow tables).
const TEMP_TAINT: &str = "the session created temporary objects";

impl Core {
    /// Applies what a statement about to be sent does to backend-bound state.
    fn hold(&mut self, hold: &Hold) {
        let before = self.flow.holds.clone();
        if let Some(held) = self.flow.holds.apply(hold) {
            self.act(Action::Pinned(held));
        }
        for held in Held::ALL {
            if before.holds(held) && !self.flow.holds.holds(held) {
                self.act(Action::Unpinned(held));
            }
        }
        if self.flow.taint == Some(TEMP_TAINT) && !self.flow.holds.holds(Held::Temp) {
            self.flow.taint = None;
        }
        let deallocates_all = matches!(hold, Hold::ReleaseAll | Hold::Release(Held::Prepared, None));
        if deallocates_all && let Some(server) = self.server.as_mut() {
            // The backend drops every prepared statement, pgcache's too.
            server.clear();
        }
    }

    /// Records what a statement about to be sent does to the session; `effects` are its
    /// invalidations, `caching` whether the cache is in use. Returns the step to apply when
    /// its answer arrives. (While it is not, the functions a
    /// statement calls are not looked up, and any of them may have set custom settings.)
    /// `unseen`: it may change settings out of sight (a volatile user function, a trigger),
    /// found without the cache's effects.
    pub fn note(&mut self, c: &Classified, effects: Vec<Effect>, caching: bool, unseen: bool) -> Step {
        if let Some(hold) = &c.holds {
            self.hold(hold);
        }
        let f = &mut self.flow;
        f.settings.track(&c.settings);
        if c.settings.changes {
            f.settings_may_change();
        }
        match &c.kind {
            Kind::Transaction(TxControl::Begin { plain }) => {
                f.begins_in_flight = true;
                if !plain {
                    f.settings_may_change();
                }
            }
            Kind::Transaction(TxControl::SetTransaction) => f.settings_may_change(),
            // Settings a transaction changed are undone by its rollback, and SET LOCAL ends
            // with any transaction: forget them now, so a statement pipelined behind this one
            // is not keyed on them.
            Kind::Transaction(TxControl::Rollback | TxControl::Commit | TxControl::Savepoint) => {
                f.forget_if_changed_in_tx();
            }
            Kind::Session(SessionChange::Setting) => f.settings_may_change(),
            Kind::Session(SessionChange::Discard) => {
                f.settings_may_change();
                // DISCARD ALL deallocates every prepared statement, in the client's view too.
                f.statements.clear();
                f.unprepared.clear();
                f.virtual_portal = None;
            }
            Kind::Session(SessionChange::CreatesTemp) => f.taint = Some(TEMP_TAINT),
            // Unknowable at once (statements pipelined behind it are not keyed on what it may
            // set); unreplayable only once it has run (`Step::unreplayable`).
            Kind::Opaque | Kind::Unparseable => {
                f.settings_may_change();
                f.settings.mark_unknowable();
            }
            _ => {}
        }
        // (In transaction pooling the functions are looked up instead: `unseen`.)
        if !caching && !f.transaction_pooling && !c.functions.is_empty() {
            f.settings.mark_unknowable();
        }
        if unseen {
            f.settings_may_change();
            f.settings.mark_unknowable();
        }
        let writes = !effects.is_empty() || matches!(c.kind, Kind::Write | Kind::Ddl);
        // (Without the cache in use a function's effects are not looked up: any may write.)
        f.may_have_written |= writes
            || matches!(c.kind, Kind::Opaque | Kind::Unparseable)
            || (c.kind == Kind::Select && !c.functions.is_empty() && !caching);
        f.changed_schema |= c.kind == Kind::Ddl;
        if writes {
            f.wrote = true;
            if effects.iter().any(|e| matches!(e, Effect::Unknown(_))) {
                // Whatever ran may also have changed settings (set_config, SET in a function),
                // under names pgcache cannot know.
                f.settings_may_change();
                f.settings.mark_unknowable();
            }
        }
        let control = match c.kind {
            Kind::Transaction(TxControl::Commit) => Some(Control::Commit),
            Kind::Transaction(TxControl::Rollback) => Some(Control::Rollback),
            Kind::Transaction(TxControl::Savepoint) => Some(Control::Savepoint),
            _ => None,
        };
        let unreplayable = matches!(c.kind, Kind::Opaque | Kind::Unparseable) && c.settings.unseen;
        Step { control, effects, writes, unreplayable }
    }

    /// A statement's CommandComplete (with its `tag`) arrived: it ran, and did this to its
    /// transaction (and, if pgcache could not see into it, to the session's settings). Outside
    /// a transaction block its write has committed (it is invalidated here, and again when the
    /// implicit transaction ends: once if both answers came in together,
    /// [`super::superseded`]); inside one, its invalidations wait for the transaction's end. A
    /// COMMIT invalidates what its transaction wrote now, before its CommandComplete reaches
    /// the client, whatever follows it in the same request; a rollback discards it (the
    /// entries filled before it stay valid).
    pub(super) fn completed(&mut self, step: Step, tag: &[u8]) {
        self.flow.wrote |= step.writes;
        if step.unreplayable {
            self.flow.settings.mark_unreplayable();
        }
        if !step.effects.is_empty() && self.tracker.status == TransactionStatus::Idle {
            self.act(Action::Invalidate { effects: step.effects.clone(), committed: false });
        }
        let f = &mut self.flow;
        f.tx_effects.extend(step.effects);
        let committed = match step.control {
            Some(Control::Commit) if tag != b"ROLLBACK" && !f.rolled_back() => std::mem::take(&mut f.tx_effects),
            Some(Control::Commit | Control::Rollback) => {
                f.tx_effects.clear();
                Vec::new()
            }
            Some(Control::Savepoint) => {
                f.tx_savepoints = true;
                return;
            }
            None => return,
        };
        f.tx_failed = false;
        f.tx_savepoints = false;
        if !committed.is_empty() {
            self.act(Action::Invalidate { effects: committed, committed: true });
        }
    }
}
