//! The response pipeline: every request the client is owed an answer for, in order.
//!
//! An item is either a request forwarded to the backend (whose answer is routed to the client,
//! or hidden when pgcache injected the request itself), or an answer pgcache gives locally: a
//! cache hit, a synthesized ParseComplete/BindComplete, a ReadyForQuery. Local answers are
//! emitted only when every item before them has been answered, so the client sees exactly the
//! message order Postgres would produce. When the backend reports an error in the extended
//! protocol it skips everything up to the next Sync; the pipeline drops the local answers in
//! that span too (Postgres docs, "Extended Query").
//!
//! Answers are also where the cache learns ([`super::route`]): a cache fill tees the
//! RowDescription, DataRows and CommandComplete of its request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::cache::{Dependency, Entry, Flight, Key};
use crate::query::Relation;
use crate::rules::Rule;
use crate::stats::Observation;

use super::effect::Step;

/// Which answer a forwarded request gets (Postgres docs, "Message Flow").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Parse,
    Bind,
    Close,
    DescribeStatement,
    DescribePortal,
    /// DataRows and CommandComplete / EmptyQueryResponse / PortalSuspended (or a COPY).
    Execute,
    /// ReadyForQuery.
    Sync,
    /// Everything up to ReadyForQuery (simple Query and FunctionCall).
    Query,
}

/// A request forwarded to the backend.
#[derive(Debug)]
pub struct Forwarded {
    pub expect: Expect,
    /// Injected by pgcache: the client must not see the answer.
    pub hidden: bool,
    /// The answer feeds this cache fill.
    pub fill: Option<usize>,
    /// The request is the settings probe.
    pub probe: bool,
    /// Its statements, applied one per CommandComplete ([`super::Core::completed`]).
    pub steps: VecDeque<Step>,
    /// Recorded in the statistics when the request completes.
    pub observe: Option<Box<Observation>>,
    /// The backend reported an error for it.
    pub failed: bool,
    /// An Execute with a row limit that pgcache raised to fill the cache: the client sees
    /// only as many rows as it asked for, then the PortalSuspended Postgres would have sent.
    pub row_limit: Option<RowLimit>,
    /// A Parse of this server name (transaction pooling): if it fails or is skipped, the
    /// backend does not have the statement after all.
    pub prepares: Option<Bytes>,
    /// A Bind of this server name (transaction pooling): if Postgres says its cached plan
    /// changed result type, the backend's statement is stale.
    pub binds: Option<Bytes>,
    /// The request names a statement by its server name where the client used its own
    /// (server name, client name): an error about it names the client's, as Postgres would.
    pub renamed: Option<(Bytes, Bytes)>,
}

/// The client's row limit on an Execute sent with a higher one, and the rows seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowLimit {
    pub client: u64,
    pub seen: u64,
}

impl Forwarded {
    pub fn new(expect: Expect) -> Self {
        Forwarded {
            expect,
            hidden: false,
            fill: None,
            probe: false,
            steps: VecDeque::new(),
            observe: None,
            failed: false,
            row_limit: None,
            prepares: None,
            binds: None,
            renamed: None,
        }
    }

    pub fn hidden(expect: Expect) -> Self {
        Forwarded { hidden: true, ..Forwarded::new(expect) }
    }
}

/// One answer owed to the client.
#[derive(Debug)]
pub enum Item {
    Backend(Forwarded),
    /// Bytes pgcache sends itself (cache hit or synthesized message).
    Local(Bytes),
    /// A ReadyForQuery pgcache sends itself, with the transaction status current when it is
    /// emitted.
    LocalReady,
}

/// A result being teed into the cache.
#[derive(Debug)]
pub struct Fill {
    pub key: Key,
    pub rule: Arc<Rule>,
    pub deps: Vec<Dependency>,
    pub tables: Vec<Relation>,
    pub sql: Arc<str>,
    pub flight: Option<Flight>,
    pub limit: u64,
    pub row_description: Option<Bytes>,
    pub body: BytesMut,
    pub rows: u64,
    pub aborted: bool,
    /// The settings (key part with the role) the backend computing the result had, as a
    /// probe on it read them: the result is stored only if the key was built from exactly
    /// these ([`Fill::finish`]).
    pub computed_in: Option<Bytes>,
    /// The shared L2's key for it (the versions it depends on, read before its query was
    /// sent): stored there too once stored in L1.
    pub l2: Option<String>,
    /// How to compute it again at the next start (`cache.warm_file`).
    pub recipe: Option<Arc<crate::cache::warm::Recipe>>,
}

impl Fill {
    /// A fill for `rule`, keeping results up to its `max_entry_bytes` (else `default_limit`).
    pub fn new(
        key: Key,
        rule: Arc<Rule>,
        deps: Vec<Dependency>,
        tables: Vec<Relation>,
        sql: Arc<str>,
        flight: Option<Flight>,
        default_limit: u64,
    ) -> Self {
        Fill {
            key,
            limit: rule.max_entry_bytes.unwrap_or(default_limit),
            rule,
            deps,
            tables,
            sql,
            flight,
            row_description: None,
            body: BytesMut::new(),
            rows: 0,
            aborted: false,
            computed_in: None,
            l2: None,
            recipe: None,
        }
    }

    /// The settings the backend computing it has (see [`Fill::computed_in`]).
    pub fn computed_in(mut self, settings: Bytes) -> Self {
        self.computed_in = Some(settings);
        self
    }

    /// A DataRow.
    pub fn add_row(&mut self, frame: &[u8]) {
        self.rows += 1;
        self.add_body(frame);
    }

    /// A DataRow or the CommandComplete.
    pub fn add_body(&mut self, frame: &[u8]) {
        if self.aborted {
            return;
        }
        if (self.body.len() + frame.len()) as u64 > self.limit {
            // Too large to keep: it streams through untouched and is not cached.
            self.aborted = true;
            self.body = BytesMut::new();
            return;
        }
        self.body.extend_from_slice(frame);
    }

    /// Stores the result (unless aborted, too large, or raced by a write); only then are the
    /// sessions waiting on this key's flight woken, so they find the entry. `backend` is the
    /// state the backend that computed it has now, as read there: unless it is the one the
    /// key was built from, nothing is stored — whatever session tracking concluded, a result
    /// is cached only under the state it was computed in.
    pub fn finish(
        mut self,
        store: &crate::cache::Store,
        backend: Option<&Bytes>,
    ) -> Option<(Arc<Entry>, Option<String>)> {
        let flight = self.flight.take();
        let computed_here = self.computed_in.is_some() && self.computed_in.as_ref() == backend;
        if !computed_here {
            tracing::debug!(sql = %self.sql, "fill not stored: the backend's settings are not the key's");
        }
        let l2 = self.l2.clone();
        let stored = match self.into_entry().filter(|_| computed_here) {
            Some((key, entry)) => store.insert(key.clone(), entry).then(|| store.get(&key)).flatten(),
            None => None,
        };
        drop(flight);
        stored.map(|(entry, _)| (entry, l2))
    }

    fn into_entry(self) -> Option<(Key, Entry)> {
        if self.aborted {
            return None;
        }
        // Stored in allocations of their own, sized exactly: the RowDescription is a slice of
        // the backend's read buffer (which it would keep alive), and the body grew by doubling.
        // What the cache holds is then what it weighs (see `Entry::weight`).
        let exact = |b: &[u8]| Bytes::copy_from_slice(b);
        let entry = Entry {
            rule: self.rule,
            row_description: self.row_description.as_deref().map(exact).unwrap_or_default(),
            body: if self.body.capacity() > self.body.len() + self.body.len() / 16 {
                exact(&self.body)
            } else {
                self.body.freeze()
            },
            rows: self.rows,
            created: Instant::now(),
            deps: self.deps,
            tables: self.tables,
            sql: self.sql,
            refreshing: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            l2_key: self.l2.map(Into::into),
            recipe: self.recipe,
        };
        Some((self.key.copied(), entry))
    }
}

/// The items owed, and the fills their answers feed.
#[derive(Debug, Default)]
pub struct Pipeline {
    pub items: VecDeque<Item>,
    fills: Vec<Option<Fill>>,
}

impl Pipeline {
    pub fn add_fill(&mut self, fill: Fill) -> usize {
        self.fills.push(Some(fill));
        self.fills.len() - 1
    }

    pub fn fill_mut(&mut self, id: usize) -> Option<&mut Fill> {
        self.fills.get_mut(id).and_then(Option::as_mut)
    }

    pub fn take_fill(&mut self, id: usize) -> Option<Fill> {
        let f = self.fills.get_mut(id).and_then(Option::take);
        if self.fills.iter().all(Option::is_none) {
            self.fills.clear();
        }
        f
    }

    /// Whether any answer from the backend is still expected.
    pub fn awaits_backend(&self) -> bool {
        self.items.iter().any(|i| matches!(i, Item::Backend(_)))
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// After an error in the extended protocol: drops every item up to (not including) the
    /// next Sync, as the backend skips those messages. Returns the fills they held, to abort.
    pub fn skip_to_sync(&mut self) -> Vec<Forwarded> {
        let mut skipped = Vec::new();
        while let Some(item) = self.items.front() {
            match item {
                Item::Backend(f) if f.expect == Expect::Sync || f.expect == Expect::Query => break,
                Item::LocalReady => break,
                _ => {
                    if let Some(Item::Backend(f)) = self.items.pop_front() {
                        skipped.push(f);
                    }
                }
            }
        }
        skipped
    }
}

/// What happened to one backend frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// Pass it to the client.
    pub visible: bool,
    /// It completed the item at the head of the pipeline (local answers may follow now).
    pub completed: bool,
    /// Pass this instead of the frame (an error naming a server name, renamed).
    pub rewritten: Option<Bytes>,
}
