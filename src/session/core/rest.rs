//! A core at rest, kept small: a session waiting between transactions without a backend
//! (transaction pooling) keeps only what outlives a transaction — its settings, its prepared
//! statements, what it holds — not the buffers, queues and per-request state of a [`Core`] at
//! work, which are empty then. Ten thousand idle clients are ten thousand of these (see
//! `bench/idle.sh`).
//!
//! Safe by construction: [`Core::rest`] names every field (a field added later does not compile
//! until it is placed), keeps a core whole when anything transient is not empty, and
//! [`Rest::wake`] gives back the same core with its transient parts new.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use super::Core;
use super::flow::{Flow, Probe, Statement};
use super::settings::Settings;
use super::tracker::Tracker;

/// A core between transactions.
#[derive(Debug)]
pub enum Rest {
    /// Everything transient was empty: only what outlives a transaction.
    Compact(Kept),
    /// Something transient was not (never expected at rest): the core as it was.
    Whole(Box<Core>),
}

/// What of a core outlives a transaction ([`Flow`]'s fields of the same names).
#[derive(Debug)]
pub struct Kept {
    database: Arc<str>,
    settings: Settings,
    taint: Option<&'static str>,
    holds: crate::query::Holds,
    /// The client's prepared statements and those the backend lacks, when it has any.
    statements: Option<Box<Statements>>,
    replica: Option<usize>,
    replica_need: u64,
    probe_epoch: u64,
    tracker: Tracker,
    probe: Option<Probe>,
    flags: Flags,
}

/// [`Flow`]'s fields of the same names.
type Statements = (HashMap<Bytes, Arc<Statement>>, HashSet<Bytes>);

/// [`Flow`]'s and [`Core`]'s flags.
#[derive(Debug, Clone, Copy)]
struct Flags {
    transaction_pooling: bool,
    keeps_backend: bool,
    wrote: bool,
    may_have_written: bool,
    changed_schema: bool,
    settings_changed_in_tx: bool,
    begins_in_flight: bool,
    tx_failed: bool,
    tx_savepoints: bool,
    settings_touched: bool,
    settings_pinned: bool,
    upstream_said_fatal: bool,
    short_way: super::flow::ShortWay,
}

impl Core {
    /// This core, at rest (see the module's doc).
    pub fn rest(self) -> Rest {
        let f = &self.flow;
        let transient_empty = f.pipeline.is_empty()
            && f.probe_rows.is_empty()
            && f.parked.is_none()
            && f.tx_effects.is_empty()
            && f.portals.is_empty()
            && f.virtual_portal.is_none()
            && f.batch.is_empty()
            && self.to_backend.is_empty()
            && self.to_client.is_empty()
            && self.actions.is_empty()
            && self.server.is_none();
        if !transient_empty {
            return Rest::Whole(Box::new(self));
        }
        let Core { flow, tracker, to_backend: _, to_client: _, actions: _, upstream_said_fatal, server: _ } = self;
        let Flow {
            database,
            transaction_pooling,
            keeps_backend,
            pipeline: _,
            settings,
            probe,
            probe_rows: _,
            probe_epoch,
            parked: _,
            wrote,
            may_have_written,
            changed_schema,
            settings_changed_in_tx,
            tx_effects: _,
            begins_in_flight,
            tx_failed,
            tx_savepoints,
            taint,
            holds,
            settings_touched,
            settings_pinned,
            statements,
            portals: _,
            unprepared,
            virtual_portal: _,
            batch: _,
            replica,
            replica_need,
            short_way,
        } = flow;
        let flags = Flags {
            transaction_pooling,
            keeps_backend,
            wrote,
            may_have_written,
            changed_schema,
            settings_changed_in_tx,
            begins_in_flight,
            tx_failed,
            tx_savepoints,
            settings_touched,
            settings_pinned,
            upstream_said_fatal,
            short_way,
        };
        let statements = (!statements.is_empty() || !unprepared.is_empty()).then(|| Box::new((statements, unprepared)));
        Rest::Compact(Kept {
            database,
            settings,
            taint,
            holds,
            statements,
            replica,
            replica_need,
            probe_epoch,
            tracker,
            probe,
            flags,
        })
    }
}

impl Rest {
    /// The core again, as it was when it came to rest.
    pub fn wake(self) -> Core {
        let k = match self {
            Rest::Whole(core) => return *core,
            Rest::Compact(k) => k,
        };
        let f = k.flags;
        let (statements, unprepared) = k.statements.map(|s| *s).unwrap_or_default();
        Core {
            flow: Flow {
                database: k.database,
                transaction_pooling: f.transaction_pooling,
                keeps_backend: f.keeps_backend,
                settings: k.settings,
                probe: k.probe,
                probe_epoch: k.probe_epoch,
                wrote: f.wrote,
                may_have_written: f.may_have_written,
                changed_schema: f.changed_schema,
                settings_changed_in_tx: f.settings_changed_in_tx,
                begins_in_flight: f.begins_in_flight,
                tx_failed: f.tx_failed,
                tx_savepoints: f.tx_savepoints,
                taint: k.taint,
                holds: k.holds,
                settings_touched: f.settings_touched,
                settings_pinned: f.settings_pinned,
                statements,
                unprepared,
                replica: k.replica,
                replica_need: k.replica_need,
                short_way: f.short_way,
                ..Flow::default()
            },
            tracker: k.tracker,
            upstream_said_fatal: f.upstream_said_fatal,
            ..Core::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Frame;

    fn busy_between_transactions() -> Core {
        let mut core = Core::default();
        core.flow.database = Arc::from("app");
        core.flow.transaction_pooling = true;
        core.flow.settings_touched = true;
        core.flow.taint = Some("temporary table");
        core.flow.replica_need = 7;
        let parse = Frame::from_raw(Bytes::from_static(b"P\0\0\0\x0cs1\0x\0\0\0"));
        let statement = Statement::new(Arc::from("x"), vec![], parse, Arc::new(vec![]));
        core.flow.statements.insert(Bytes::from_static(b"s1"), Arc::new(statement));
        core.flow.unprepared.insert(Bytes::from_static(b"s1"));
        core.tracker.used = true;
        core
    }

    #[test]
    fn a_core_at_rest_wakes_as_it_was() {
        let core = busy_between_transactions();
        let before = format!("{core:?}");
        let rest = core.rest();
        assert!(matches!(rest, Rest::Compact(_)), "nothing transient: compact");
        assert_eq!(format!("{:?}", rest.wake()), before);
    }

    #[test]
    fn a_core_with_anything_transient_is_kept_whole() {
        let mut core = busy_between_transactions();
        core.flow.batch.push(Frame::from_raw(Bytes::from_static(b"S\0\0\0\x04")));
        let before = format!("{core:?}");
        let rest = core.rest();
        assert!(matches!(rest, Rest::Whole(_)));
        assert_eq!(format!("{:?}", rest.wake()), before);
    }
}
