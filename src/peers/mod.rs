//! Invalidation shared between the pgcache instances in front of one Postgres — a fleet of
//! sidecars — over Postgres itself: `LISTEN`/`NOTIFY` on one channel, no other infrastructure.
//!
//! Each instance keeps one connection per database it caches for ([`link`]); on it, it
//! listens, and it publishes the relations (by OID, by name when only that is known, or
//! "everything") written by the transactions it saw commit. Publishing is coalesced (at most
//! one notification per `peers.coalesce`, deduplicated by relation, split below the 8000-byte
//! payload limit) so that `NOTIFY`, which serializes committing transactions, stays off the
//! clients' commits entirely. On receipt, the other instances bump the same generations.
//!
//! Why not notify inside the client's own transaction? That would make the notification atomic
//! with the commit, but every writing transaction would then take Postgres's notify lock at
//! commit — a commit storm under write load — and coalescing would be impossible. Instead the
//! window a crash could leave is closed by liveness: every instance sends a heartbeat at least
//! every `peers.heartbeat` on the same connection it publishes on, so an instance that dies (or
//! loses its connection) after a commit but before publishing falls silent, and after
//! `peers.dead_after` every other instance drops everything it cached for that database.
//!
//! Failing closed: while a database's link is not listening — not yet connected, lost, Postgres
//! restarting, or its own heartbeats no longer coming back — nothing is served from the cache
//! or filled into it for that database ([`Peers::coherent`]), and when it listens again the
//! database's epoch moves, so nothing filled before can ever be served.
//!
//! [`triggers`] adds the writes that bypass every instance (cron jobs, migrations, `psql`):
//! statement-level triggers that `pg_notify` the same channel in the writer's transaction.
//!
//! Owns the links to other instances. May use `stats`, `cache`, `query`, `backend` and below;
//! knows no session or client.

pub mod link;
pub mod message;
pub mod replay;
pub mod triggers;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::cache::Generations;
use crate::config::PeersConfig;
use crate::query::Relation;
use crate::query::catalog::Catalog;
use crate::query::point::KeyValue;
use crate::stats::Stats;

use message::Pending;

/// How long a session waits for a database's link to start listening, the first time.
const FIRST_LISTEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Invalidation shared with the other instances.
pub struct Peers {
    config: PeersConfig,
    /// Signs what this instance publishes and checks what it hears (the fleet's secret).
    seal: Option<message::Seal>,
    /// Sealed messages already heard ([`replay`]).
    replays: Mutex<replay::Replays>,
    /// The shared L2, whose versions what this instance hears moves too.
    l2: Option<Arc<crate::l2::L2>>,
    /// This instance's id in messages.
    instance: String,
    /// How this instance's own messages begin ([`message::own_prefix`]).
    own_prefix: String,
    catalog: Arc<Catalog>,
    generations: Arc<Generations>,
    stats: Arc<Stats>,
    /// The links by database: read by every request (a copy swapped in when a link is added,
    /// under `adding`), so looking one up takes no lock every session shares.
    links: arc_swap::ArcSwap<HashMap<String, Arc<Link>>>,
    adding: Mutex<()>,
    /// Links stop (saying goodbye) when this is cancelled.
    closing: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

/// Where a database's link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting for the first time.
    Starting,
    Listening,
    /// Lost, or never connected: reconnecting.
    Down,
}

/// One database's link: its state, what it has seen, and what waits to be published.
pub struct Link {
    pub database: String,
    /// Changed only by [`Link::set_state`].
    state: watch::Sender<LinkState>,
    /// Whether `state` is `Listening`, read without the channel's lock by every request.
    listening: AtomicBool,
    pending: Mutex<(Pending, u64)>,
    wake: Notify,
    seen: Mutex<Seen>,
}

impl Link {
    /// Moves the link to `state` (and its mirror with it, under the channel's lock).
    fn set_state(&self, state: LinkState) {
        self.state.send_modify(|s| {
            *s = state;
            self.listening.store(state == LinkState::Listening, Ordering::SeqCst);
        });
    }

    fn is_listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }
}

/// What a link has seen, for `SHOW PEERS`.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub listening_since: Option<SystemTime>,
    pub last_message: Option<SystemTime>,
    /// Other instances heard from, with when.
    pub instances: HashMap<String, Instant>,
    pub sent: u64,
    pub received: u64,
    /// Times everything cached for the database was dropped because messages may have been
    /// missed (reconnects, silent instances).
    pub resyncs: u64,
    pub last_error: Option<String>,
}

/// One row of `SHOW PEERS`.
#[derive(Debug, Clone)]
pub struct Status {
    pub database: String,
    pub state: LinkState,
    pub seen: Seen,
}

impl Peers {
    pub fn new(
        config: PeersConfig,
        catalog: Arc<Catalog>,
        generations: Arc<Generations>,
        stats: Arc<Stats>,
        l2: Option<Arc<crate::l2::L2>>,
    ) -> Self {
        let instance = format!("{:016x}", rand::random::<u64>());
        let seal = config.secret.as_ref().map(|s| message::Seal::new(s.bytes()));
        if seal.is_none() && config.enabled {
            tracing::warn!(
                "peers.secret is not set and the upstream URL has no password: messages on the invalidation channel cannot be authenticated, so any role that can NOTIFY it can invalidate this instance's cache"
            );
        }
        Peers {
            seal,
            replays: Mutex::default(),
            l2,
            config,
            own_prefix: message::own_prefix(&instance),
            instance,
            catalog,
            generations,
            stats,
            links: Default::default(),
            adding: Mutex::new(()),
            closing: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    pub fn channel(&self) -> &str {
        &self.config.channel
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The key the bypass triggers sign with, if the fleet has a secret.
    pub fn trigger_key(&self) -> Option<[u8; 32]> {
        self.seal.as_ref().map(|s| *s.key())
    }

    /// The link for `database`, started on first use.
    fn link(self: &Arc<Self>, database: &str) -> Arc<Link> {
        if let Some(l) = self.links.load().get(database) {
            return l.clone();
        }
        let _adding = self.adding.lock();
        if let Some(l) = self.links.load().get(database) {
            return l.clone();
        }
        let link = Arc::new(Link {
            database: database.to_owned(),
            state: watch::channel(LinkState::Starting).0,
            listening: AtomicBool::new(false),
            pending: Mutex::new((Pending::default(), 0)),
            wake: Notify::new(),
            seen: Mutex::new(Seen::default()),
        });
        let mut links = HashMap::clone(&self.links.load());
        links.insert(database.to_owned(), link.clone());
        self.links.store(Arc::new(links));
        if !self.closing.is_cancelled() {
            self.tasks.spawn(link::run(self.clone(), link.clone()));
        }
        link
    }

    /// Whether entries for `database` may be served and filled: always when peers are off;
    /// otherwise only while its link listens (the first time, waiting briefly for it).
    pub async fn coherent(self: &Arc<Self>, database: &str) -> bool {
        if !self.config.enabled || self.listening(database) {
            return true;
        }
        let link = self.link(database);
        match *link.state.borrow() {
            LinkState::Listening => return true,
            LinkState::Starting => {}
            _ => return false,
        }
        let mut state = link.state.subscribe();
        if *state.borrow() == LinkState::Starting {
            let _ = tokio::time::timeout(FIRST_LISTEN_WAIT, state.wait_for(|s| *s != LinkState::Starting)).await;
        }
        *link.state.borrow() == LinkState::Listening
    }

    /// Whether `database`'s link listens now, starting it if it was never started (no
    /// waiting: for routing, where the primary is always a correct answer).
    pub fn listening_or_start(self: &Arc<Self>, database: &str) -> bool {
        !self.config.enabled || self.link(database).is_listening()
    }

    /// Whether `database`'s link listens now (no waiting; for detached sessions).
    pub fn listening(&self, database: &str) -> bool {
        !self.config.enabled || self.links.load().get(database).is_some_and(|l| l.is_listening())
    }

    /// Queues what a committed transaction wrote in `database` for the other instances.
    pub fn publish(
        self: &Arc<Self>,
        database: &str,
        relations: &[Relation],
        keyed: &[(&Relation, &str, &[KeyValue])],
        names: &[String],
        all: bool,
    ) {
        if !self.config.enabled || (relations.is_empty() && keyed.is_empty() && names.is_empty() && !all) {
            return;
        }
        let link = self.link(database);
        {
            let mut pending = link.pending.lock();
            let (p, calls) = &mut *pending;
            *calls += 1;
            p.all |= all;
            p.names.extend(names.iter().cloned());
            for r in relations {
                match self.catalog.oid_of(database, r) {
                    Some(oid) => p.relation(oid),
                    None => drop(p.names.insert(r.name.clone())),
                };
            }
            for (r, column, values) in keyed {
                match self.catalog.oid_of(database, r) {
                    Some(oid) => p.keyed(oid, column, values.iter().copied()),
                    None => drop(p.names.insert(r.name.clone())),
                };
            }
        }
        link.wake.notify_one();
    }

    /// Publishes to every database's link (an operator's `INVALIDATE`).
    pub fn publish_everywhere(self: &Arc<Self>, names: &[String], all: bool) {
        let databases: Vec<String> = self.links.load().keys().cloned().collect();
        for db in databases {
            self.publish(&db, &[], &[], names, all);
        }
    }

    /// Databases whose link is not listening (for `/readyz`).
    pub fn not_listening(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.links.load().values().filter(|l| !l.is_listening()).map(|l| l.database.clone()).collect();
        v.sort();
        v
    }

    /// Every link's state, for `SHOW PEERS`.
    pub fn status(&self) -> Vec<Status> {
        let mut v: Vec<Status> = self
            .links
            .load()
            .values()
            .map(|l| Status { database: l.database.clone(), state: *l.state.borrow(), seen: l.seen.lock().clone() })
            .collect();
        v.sort_by(|a, b| a.database.cmp(&b.database));
        v
    }

    /// Publishes what is pending, says goodbye on every link, and stops them (shutdown, after
    /// the sessions have drained).
    pub async fn close(&self) {
        self.closing.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.tasks.wait()).await;
    }
}
