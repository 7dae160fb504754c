//! What a session remembers for caching between messages: its settings, its transaction's
//! writes, the prepared statements the client created, and the answers it is owed.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::policy::Reason;
use crate::protocol::Frame;
use crate::protocol::backend::TransactionStatus;
use crate::query::Classified;

use super::effect::{Effect, Step};
use super::pipeline::Pipeline;
use super::settings::Settings;

/// A prepared statement as the client created it (Parse).
#[derive(Debug)]
pub struct Statement {
    pub sql: Arc<str>,
    pub param_types: Vec<u32>,
    /// The Parse message, to re-send when the backend must (re)learn the statement.
    pub parse: Frame,
    pub classified: Arc<Vec<Classified>>,
    /// Its name on backends in transaction pooling ([`super::names`]), made when first needed.
    pub server_name: std::sync::OnceLock<Bytes>,
}

impl Statement {
    pub fn new(sql: Arc<str>, param_types: Vec<u32>, parse: Frame, classified: Arc<Vec<Classified>>) -> Statement {
        Statement { sql, param_types, parse, classified, server_name: Default::default() }
    }

    /// The name this statement has on backends in transaction pooling.
    pub fn server_name(&self) -> &Bytes {
        self.server_name.get_or_init(|| super::names::server_name(&self.sql, &self.param_types))
    }

    /// The statement's classification if it is a single SELECT.
    pub fn select(&self) -> Option<&Classified> {
        match self.classified.as_slice() {
            [c] if c.kind == crate::query::Kind::Select => Some(c),
            _ => None,
        }
    }
}

/// The state of the settings probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Running,
    Done,
    Failed,
}

/// A request whose decision waits for the settings probe.
#[derive(Debug)]
pub enum Parked {
    /// A simple Query, already classified and noted.
    Query { frame: Frame, classified: Arc<Vec<Classified>>, steps: Vec<Step> },
    /// The extended-protocol batch in [`Flow::batch`], up to its Sync.
    Batch,
}

/// Session state the cache depends on.
#[derive(Debug, Default)]
pub struct Flow {
    /// The session's database.
    pub database: Arc<str>,
    /// The session leaves its backend between transactions: it is pooled by transaction
    /// (`pool.mode` or its override for this database and user), or it is pooled by session
    /// with replicas configured ([`Flow::keeps_backend`]). Either way its statements go to
    /// backends under server names and its settings are replayed where it goes next.
    pub transaction_pooling: bool,
    /// Session pooling with replicas: between transactions the session keeps its backend on
    /// the primary (its home, which no other session gets) and leaves it only for a read a
    /// replica takes; nothing is pinned, as it never gives its backend back.
    pub keeps_backend: bool,
    pub pipeline: Pipeline,
    pub settings: Settings,
    pub probe: Option<Probe>,
    /// The probe's rows, until its ReadyForQuery.
    pub probe_rows: Vec<Vec<Option<String>>>,
    /// The settings' [`Settings::epoch`] when the running probe was sent.
    pub probe_epoch: u64,
    /// A request waiting for the probe's answer before it is decided; client messages after
    /// it wait in the read buffer meanwhile.
    pub parked: Option<Parked>,
    /// A write was sent in the current (explicit or implicit) transaction.
    pub wrote: bool,
    /// ... or something that may write whether or not the cache knows what (a function call
    /// while the cache is not in use), or a schema change: what a replica must have replayed
    /// before this session reads there.
    pub may_have_written: bool,
    pub changed_schema: bool,
    /// Settings may have changed in the current transaction (a rollback would undo that).
    pub settings_changed_in_tx: bool,
    /// Invalidations of the statements of the current transaction that have completed,
    /// applied again when it commits — unless it failed and nothing of it can have committed
    /// ([`Flow::rolled_back`]).
    pub tx_effects: Vec<Effect>,
    /// A statement that begins a transaction block was sent and its answer is still awaited.
    pub begins_in_flight: bool,
    /// Postgres reported an error in the current transaction: it rolls back...
    pub tx_failed: bool,
    /// ... unless a savepoint was taken, to which it may have rolled back and carried on.
    pub tx_savepoints: bool,
    /// Why this session may never use the cache (e.g. it created temporary tables).
    pub taint: Option<&'static str>,
    /// State that lives only in the current backend connection (LISTEN, WITH HOLD cursors,
    /// SQL PREPARE, advisory locks, temporary objects): while any is held the session cannot
    /// move to another connection.
    pub holds: crate::query::Holds,
    /// The session changed settings at some point (so moving it needs them replayed).
    pub settings_touched: bool,
    /// Transaction pooling: the session was pinned to its backend because its settings cannot
    /// be replayed (logged and counted once).
    pub settings_pinned: bool,
    /// Prepared statements by name (the unnamed one under the empty name), as the client
    /// sees them.
    pub statements: HashMap<Bytes, Arc<Statement>>,
    /// Portals by name, as the client bound them (dropped when the transaction ends).
    pub portals: HashMap<Bytes, Arc<Statement>>,
    /// Client statements the backend does not have (an unnamed Parse pgcache answered itself,
    /// or every statement after the session moved to a new backend): re-sent before the
    /// backend needs them.
    pub unprepared: std::collections::HashSet<Bytes>,
    /// The client's unnamed portal exists only in pgcache (its Bind was answered from the
    /// cache); this Bind re-creates it if the backend needs it.
    pub virtual_portal: Option<Frame>,
    /// Extended-protocol messages waiting for their Sync or Flush.
    pub batch: Vec<Frame>,
    /// The replica the session's backend is on (`None`: the primary).
    pub replica: Option<usize>,
    /// The replica monitor's sample a read of this session must see: the first taken after
    /// its last committed write (0: none).
    pub replica_need: u64,
    /// The short way's record.
    pub short_way: ShortWay,
}

/// Requests in a row the short way ([`crate::session::answer`]) did not answer whole. Trying
/// it costs a miss about half a microsecond beyond the look-up the planner would make anyway
/// (the Bind decoded twice, the miss handed over): after [`ShortWay::TRIES`] in a row it is
/// tried on one request in that many, until it answers one, or the planner serves a hit.
/// Skipping it changes no answer: the planner serves the same hits, only by a longer way. (A
/// session that misses nearly always — random keys — pays it rarely; one with hits among its
/// requests keeps trying. Under a statement throttle it is always tried: see
/// `Relay::answered_whole`.)
#[derive(Debug, Default, Clone, Copy)]
pub struct ShortWay(u8);

impl ShortWay {
    pub const TRIES: u8 = 8;

    /// Whether to try the short way for this request.
    pub fn worth_trying(&mut self) -> bool {
        if self.0 < Self::TRIES {
            return true;
        }
        self.0 = if self.0 >= 2 * Self::TRIES - 1 { Self::TRIES } else { self.0 + 1 };
        self.0 == Self::TRIES
    }

    /// Notes whether the short way, tried, answered.
    pub fn answered(&mut self, yes: bool) {
        match yes {
            true => self.0 = 0,
            false => self.0 = (self.0 + 1).min(Self::TRIES),
        }
    }
}

impl Flow {
    /// Notes a statement that changes session settings (key parts or isolation).
    pub fn settings_may_change(&mut self) {
        self.settings.forget();
        if self.probe == Some(Probe::Failed) {
            // These are new settings: the probe may succeed on them.
            self.probe = None;
        }
        self.settings_changed_in_tx = true;
        self.settings_touched = true;
    }

    /// The probe's ReadyForQuery: learn what it read — unless something may have changed the
    /// settings since it was sent (then the next request that needs them probes again).
    pub(super) fn finish_probe(&mut self) {
        let rows = std::mem::take(&mut self.probe_rows);
        if self.settings.epoch() != self.probe_epoch {
            self.probe = None;
            return;
        }
        if !rows.is_empty() {
            self.settings.learn(rows);
        }
        self.probe = Some(if self.settings.known() { Probe::Done } else { Probe::Failed });
    }

    /// The transaction is ending: settings it changed revert.
    pub fn forget_if_changed_in_tx(&mut self) {
        if self.settings_changed_in_tx {
            self.settings.forget();
        }
    }

    /// Why this session cannot use the cache right now, if it cannot, where its backend is at
    /// `status` with messages sent that still await their Sync (`unsynced`). A session
    /// without a backend is idle, with nothing unsynced: the one rule for both
    /// ([`crate::session`]'s planner and its whole answers).
    pub fn refuses(&self, status: TransactionStatus, unsynced: bool, in_flight: bool) -> Option<Reason> {
        if let Some(why) = self.taint {
            return Some(Reason::Session(why));
        }
        if self.wrote {
            return Some(Reason::TransactionWrote);
        }
        if status == TransactionStatus::Failed {
            return Some(Reason::TransactionFailed);
        }
        // Postgres may be skipping to the Sync of messages already sent (after an error): a
        // request of pgcache's own would be skipped too, and never answered.
        if unsynced {
            return Some(Reason::Unsynced);
        }
        // Clients pipeline (tokio-postgres sends the next query once it has read an error,
        // before its ReadyForQuery): while an earlier request of a transaction block runs, the
        // block may fail, and Postgres would then refuse this one (25P02).
        if in_flight && (status != TransactionStatus::Idle || self.begins_in_flight) {
            return Some(Reason::InFlight);
        }
        None
    }

    /// Whether the transaction that just ended changed nothing: it failed (an error rolls back
    /// the whole transaction, implicit or explicit) with no savepoint it could have carried on
    /// from. What its statements would have invalidated then did not happen.
    pub fn rolled_back(&self) -> bool {
        self.tx_failed && !self.tx_savepoints
    }

    /// No answer is owed to the client and no message waits for its Sync.
    pub fn owes_nothing(&self) -> bool {
        self.pipeline.is_empty() && self.batch.is_empty()
    }

    /// Whether the session gives its backend back to the pool between transactions
    /// (transaction pooling; not a session that keeps its own, [`Flow::keeps_backend`]).
    pub fn gives_backend_back(&self) -> bool {
        self.transaction_pooling && !self.keeps_backend
    }

    /// Why the session could not continue on another backend connection, if it could not.
    pub fn movable(&self) -> Result<(), &'static str> {
        if let Some(why) = self.holds.first().map(|h| h.describe()).or(self.taint) {
            return Err(why);
        }
        if self.settings_touched && !self.settings.known() {
            return Err("settings changed and not yet read back");
        }
        if !self.owes_nothing() {
            return Err("a request was in flight");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_way_is_tried_less_after_misses_in_a_row_and_fully_again_after_a_hit() {
        let mut w = ShortWay::default();
        let tried = |w: &mut ShortWay, n: usize, answers: bool| {
            let mut count = 0;
            for _ in 0..n {
                if w.worth_trying() {
                    count += 1;
                    w.answered(answers);
                }
            }
            count
        };
        assert_eq!(tried(&mut w, 8, false), 8, "the first misses are all tried");
        assert_eq!(tried(&mut w, 80, false), 10, "then one in eight");
        let first = (0..8).position(|_| w.worth_trying()).expect("tried within eight");
        w.answered(true);
        assert!(first < 8);
        assert_eq!(tried(&mut w, 20, true), 20, "after a hit, every request again");
    }
}
