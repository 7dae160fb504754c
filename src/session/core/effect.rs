//! What a statement does: the invalidations it causes ([`Effect`], looked up by the relay in
//! the catalog) and what it does to the session ([`Core::note`]: the transaction, the
//! settings the cache key is built from, temporary objects, state that pins the session to its
//! backend).

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
    /// invalidations, `caching` whether the cache is in use. (While it is not, the functions a
    /// statement calls are not looked up, and any of them may have set custom settings.)
    /// `unseen`: it may change settings out of sight (a volatile user function, a trigger),
    /// found without the cache's effects.
    pub fn note(&mut self, c: &Classified, effects: &[Effect], caching: bool, unseen: bool) {
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
            // What the transaction wrote is undone: its invalidations are not needed (the
            // entries filled before it stay valid). Statements after the ROLLBACK start anew.
            // Settings it changed are undone too, and SET LOCAL ends with any transaction:
            // forget them now, so a statement pipelined behind this one is not keyed on them.
            Kind::Transaction(TxControl::Rollback) => {
                f.tx_effects.clear();
                f.forget_if_changed_in_tx();
            }
            // What a COMMIT ends is invalidated even if a later statement of the same request
            // fails or rolls back another transaction.
            // (A COMMIT of a transaction that already failed rolls it back.)
            Kind::Transaction(TxControl::Commit) => {
                if !f.rolled_back() {
                    let committed = std::mem::take(&mut f.tx_effects);
                    f.committed_effects.extend(committed);
                }
                f.forget_if_changed_in_tx();
            }
            Kind::Transaction(TxControl::Savepoint) => {
                f.tx_savepoints = true;
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
            Kind::Opaque | Kind::Unparseable => {
                f.settings_may_change();
                if c.settings.unseen {
                    f.settings.mark_unreplayable();
                } else {
                    f.settings.mark_unknowable();
                }
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
        if !effects.is_empty() || matches!(c.kind, Kind::Write | Kind::Ddl) {
            f.wrote = true;
            if effects.iter().any(|e| matches!(e, Effect::Unknown(_))) {
                // Whatever ran may also have changed settings (set_config, SET in a function),
                // under names pgcache cannot know.
                f.settings_may_change();
                f.settings.mark_unknowable();
            }
        }
        f.tx_effects.extend(effects.iter().cloned());
    }
}
