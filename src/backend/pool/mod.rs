//! The backend pool: connections to Postgres lent to client sessions.
//!
//! There is one [`Pool`] per (database, user). Within it, connections are interchangeable only
//! if they were started with the same startup parameters (`options`, `DateStyle`,
//! `application_name`, ...), because Postgres resets a session to its startup packet on
//! `RESET ALL`/`DISCARD ALL`; so a client is given an idle connection started exactly like its
//! own, or a new one. The pool caps connections per (database, user): a semaphore bounds the
//! connections lent out, and an idle connection with other parameters is closed to make room.
//!
//! A [`Lease`] is what a session holds. Giving it back says how to reset the connection; a
//! lease dropped without that (a client gone mid-query, a panic) closes the connection, so a
//! busy or dirty backend is never reused. The same acquire/release pair serves a session for
//! its whole life (session pooling) or for one transaction.

mod login;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::PoolConfig;
use crate::protocol::backend::TransactionStatus;

use super::connection::StartupParams;
use super::{ConnectError, Connection, Credentials, Endpoint, Secret};
use crate::metrics::Metrics;

/// A pool's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no backend connection available for {user}@{database} within {timeout:?} (pool size {max})")]
    Timeout { database: String, user: String, timeout: Duration, max: usize },
    #[error("pgcache is shutting down")]
    Closed,
    /// `pool.max_waiting` clients already wait for a backend of this pool.
    #[error("too many clients already waiting for a backend connection for {user}@{database} ({waiting})")]
    TooManyWaiting { database: String, user: String, waiting: usize },
    /// Opening a connection failed moments ago: rather than every client trying again (and
    /// waiting for the connect timeout), they are told at once until `pool.retry_delay` has
    /// passed.
    #[error("Postgres is not accepting connections (the last attempt failed {ago_ms} ms ago): {error}")]
    Unavailable { ago_ms: u128, error: String },
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// How a returned connection is made clean for its next user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    /// Nothing was sent on it: reuse as is.
    None,
    /// Run `DISCARD ALL` (drops prepared statements, temp tables, LISTENs, advisory locks,
    /// and runs `RESET ALL` back to the startup parameters).
    Discard,
    /// Close it.
    Close,
}

/// The most statements a pool remembers as prepared by Postgres ([`Pool::accept`]).
const ACCEPTED_MAX: usize = 10_000;

/// Counts a waiting client for as long as it lives (also when the wait is abandoned).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Idle {
    conn: Connection,
    since: Instant,
}

/// Connections for one (database, user).
pub struct Pool {
    pub key: PoolKey,
    settings: PoolConfig,
    endpoint: Arc<Endpoint>,
    slots: Arc<Semaphore>,
    idle: Mutex<VecDeque<Idle>>,
    /// Startup parameters most recently asked for: used to open `min_idle` connections.
    last_startup: Mutex<Option<StartupParams>>,
    /// When opening a connection last failed (Postgres unreachable or refusing), and why.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// Connections lent out, by backend pid: when they were opened.
    lent: Mutex<HashMap<i32, Instant>>,
    closed: AtomicBool,
    /// Clients waiting for a slot right now.
    waiting: AtomicUsize,
    /// Transaction pooling: clients pinned to their backend right now, by reason.
    pins: Mutex<std::collections::BTreeMap<&'static str, usize>>,
    /// Transaction pooling: server names of statements Postgres prepared on a connection of
    /// this pool, since the catalog epoch given (DDL may make one fail now).
    accepted: Mutex<(u64, std::collections::HashSet<bytes::Bytes>)>,
    /// `pool.max_statements_per_second`, if set.
    throttle: Option<super::throttle::Throttle>,
    /// Statements that waited for the throttle.
    throttled: AtomicU64,
    metrics: Arc<Metrics>,
    /// `pgcache_pool_wait_seconds` of this pool, registered once (recorded per acquire).
    wait: ::metrics::Histogram,
}

/// One backend connection, for `SHOW SERVERS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerInfo {
    pub pid: i32,
    pub active: bool,
    pub age: Duration,
}

/// Counts for `SHOW POOLS` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Clients waiting for a backend.
    pub waiting: usize,
    pub active: usize,
    pub idle: usize,
    pub max: usize,
}

impl Pool {
    fn new(key: PoolKey, settings: PoolConfig, endpoint: Arc<Endpoint>, metrics: Arc<Metrics>) -> Self {
        let throttle = (settings.max_statements_per_second > 0)
            .then(|| super::throttle::Throttle::new(settings.max_statements_per_second));
        Pool {
            wait: metrics.pool_wait(&key.database, &key.user),
            slots: Arc::new(Semaphore::new(settings.max_size)),
            key,
            settings,
            endpoint,
            idle: Mutex::new(VecDeque::new()),
            last_startup: Mutex::new(None),
            last_failure: Mutex::new(None),
            lent: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            pins: Mutex::new(std::collections::BTreeMap::new()),
            accepted: Mutex::new((0, Default::default())),
            throttle,
            throttled: AtomicU64::new(0),
            metrics,
        }
    }

    /// Every connection: lent out (active) or idle.
    /// Where its connections go.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    pub fn servers(&self) -> Vec<ServerInfo> {
        let mut v: Vec<ServerInfo> = self
            .lent
            .lock()
            .iter()
            .map(|(pid, created)| ServerInfo { pid: *pid, active: true, age: created.elapsed() })
            .collect();
        v.extend(self.idle.lock().iter().map(|i| ServerInfo {
            pid: i.conn.key.pid,
            active: false,
            age: i.conn.created.elapsed(),
        }));
        v
    }

    fn lend(&self, conn: &Connection) {
        self.lent.lock().insert(conn.key.pid, conn.created);
    }

    /// Waits for this pool's turn to send `n` statements to Postgres
    /// (`pool.max_statements_per_second`; at once when there is no limit).
    pub async fn throttle(&self, n: u32) {
        let Some(throttle) = &self.throttle else { return };
        let wait = throttle.reserve(n);
        if wait.is_zero() {
            return;
        }
        self.throttled.fetch_add(u64::from(n), Ordering::Relaxed);
        let labels = [("database", self.key.database.as_str()), ("user", self.key.user.as_str())];
        self.metrics.counter(crate::metrics::THROTTLED, &labels).increment(u64::from(n));
        tokio::time::sleep(wait).await;
    }

    /// Statements that waited for `pool.max_statements_per_second`.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    fn returned(&self, conn: &Connection) {
        self.lent.lock().remove(&conn.key.pid);
    }

    pub fn stats(&self) -> PoolStats {
        let max = self.settings.max_size;
        PoolStats {
            waiting: self.waiting.load(Ordering::Relaxed),
            // Lent connections, not taken slots: a returned connection is idle a moment
            // before its slot is free, and must not count twice.
            active: self.lent.lock().len(),
            idle: self.idle.lock().len(),
            max,
        }
    }

    /// A client of this pool was pinned to its backend (`true`) or released (`false`) for
    /// `reason`.
    pub fn pinned(&self, reason: &'static str, pinned: bool) {
        let mut pins = self.pins.lock();
        let n = pins.entry(reason).or_default();
        *n = if pinned { *n + 1 } else { n.saturating_sub(1) };
        if *n == 0 {
            pins.remove(reason);
        }
    }

    /// Notes statements Postgres prepared on a connection of this pool (`names`: their server
    /// names), at catalog `epoch`. At most [`ACCEPTED_MAX`] are kept.
    pub fn accept<'a>(&self, names: impl Iterator<Item = &'a bytes::Bytes>, epoch: u64) {
        let mut accepted = self.accepted.lock();
        let (at, set) = &mut *accepted;
        if *at != epoch {
            *at = epoch;
            set.clear();
        }
        for name in names {
            if set.len() >= ACCEPTED_MAX {
                set.clear();
            }
            if !set.contains(name) {
                set.insert(name.clone());
            }
        }
    }

    /// Whether Postgres prepared this statement (by server name) on a connection of this pool
    /// since catalog `epoch`: a Parse of it would succeed again, so it may be answered without
    /// a backend and sent when one needs it.
    pub fn accepted(&self, name: &[u8], epoch: u64) -> bool {
        let accepted = self.accepted.lock();
        accepted.0 == epoch && accepted.1.contains(name)
    }

    /// Clients pinned right now, by reason.
    pub fn pins(&self) -> Vec<(&'static str, usize)> {
        self.pins.lock().iter().map(|(r, n)| (*r, *n)).collect()
    }

    fn expired(&self, conn: &Connection) -> bool {
        conn.created.elapsed() >= self.settings.max_lifetime
    }

    /// Lends a connection started with `startup`, opening one with `secret` if none is idle
    /// (or always, with `fresh`: a login that must be verified by Postgres itself). Waits up
    /// to the acquire timeout for a free slot.
    pub async fn acquire(
        self: &Arc<Self>,
        startup: &StartupParams,
        secret: Option<&Secret>,
        fresh: bool,
    ) -> Result<Lease, PoolError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PoolError::Closed);
        }
        let waiting = self.waiting.load(Ordering::Relaxed);
        if self.settings.max_waiting > 0 && waiting >= self.settings.max_waiting {
            return Err(PoolError::TooManyWaiting {
                database: self.key.database.clone(),
                user: self.key.user.clone(),
                waiting,
            });
        }
        let asked = Instant::now();
        let counted = Waiting::new(&self.waiting);
        let waited = self.slot().await;
        drop(counted);
        let permit = waited?;
        self.wait.record(asked.elapsed().as_secs_f64());
        *self.last_startup.lock() = Some(startup.clone());
        while let Some(mut conn) = if fresh { None } else { self.take_idle(startup) } {
            if conn.is_alive() && !self.expired(&conn) {
                return Ok(Lease::new(conn, permit, self.clone()));
            }
            tokio::spawn(conn.terminate());
        }
        if let Some((at, error)) = self.last_failure.lock().clone()
            && at.elapsed() < self.settings.retry_delay
        {
            return Err(PoolError::Unavailable { ago_ms: at.elapsed().as_millis(), error });
        }
        self.make_room(&permit);
        match Connection::connect(&self.endpoint, startup.clone(), secret).await {
            Ok(conn) => {
                *self.last_failure.lock() = None;
                Ok(Lease::new(conn, permit, self.clone()))
            }
            Err(e) => {
                if e.is_refusal() {
                    self.metrics.backend_error();
                    *self.last_failure.lock() = Some((Instant::now(), e.to_string()));
                }
                Err(e.into())
            }
        }
    }

    /// The oldest idle connection, taken out if opening one more would exceed the pool size.
    fn room_for(&self, _held: &OwnedSemaphorePermit) -> Option<Idle> {
        let lent = self.settings.max_size - self.slots.available_permits();
        let mut idle = self.idle.lock();
        if idle.len() + lent > self.settings.max_size { idle.pop_front() } else { None }
    }

    /// A slot, waited for up to the acquire timeout.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, PoolError> {
        permit(&self.slots, &self.key, &self.settings).await
    }

    /// Whether opening a connection failed within `within` (to avoid hammering a server that
    /// is down).
    pub fn failed_within(&self, within: Duration) -> bool {
        self.last_failure.lock().as_ref().is_some_and(|(t, _)| t.elapsed() < within)
    }

    /// The server answers again (a health check got through): connect without waiting out
    /// `retry_delay`.
    pub fn forget_failure(&self) {
        *self.last_failure.lock() = None;
    }

    /// The most recently used idle connection with these startup parameters.
    fn take_idle(&self, startup: &StartupParams) -> Option<Connection> {
        let mut idle = self.idle.lock();
        let pos = idle.iter().rposition(|i| Arc::ptr_eq(&i.conn.startup, startup) || i.conn.startup == *startup)?;
        idle.remove(pos).map(|i| i.conn)
    }

    /// Closes the oldest idle connection if opening one more would exceed the pool size.
    fn make_room(&self, held: &OwnedSemaphorePermit) {
        if let Some(old) = self.room_for(held) {
            tokio::spawn(old.conn.terminate());
        }
    }

    fn put_idle(&self, conn: Connection) {
        if self.closed.load(Ordering::Acquire) || self.expired(&conn) {
            tokio::spawn(conn.terminate());
            return;
        }
        self.idle.lock().push_back(Idle { conn, since: Instant::now() });
    }

    /// Closes idle connections past the idle timeout or max lifetime, then opens connections
    /// up to `min_idle` when a verified login is known.
    async fn maintain(self: &Arc<Self>, credentials: &Credentials) {
        let now = Instant::now();
        let stale: Vec<Connection> = {
            let mut idle = self.idle.lock();
            let (keep, drop): (VecDeque<Idle>, VecDeque<Idle>) =
                idle.drain(..).partition(|i| now - i.since < self.settings.idle_timeout && !self.expired(&i.conn));
            *idle = keep;
            drop.into_iter().map(|i| i.conn).collect()
        };
        for conn in stale {
            conn.terminate().await;
        }
        let startup = self.last_startup.lock().clone();
        let (Some(startup), Some(known)) = (startup, credentials.last(&self.key)) else {
            return;
        };
        let secret = known.secret();
        while self.idle.lock().len() < self.settings.min_idle && !self.closed.load(Ordering::Acquire) {
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                return;
            };
            self.make_room(&permit);
            match Connection::connect(&self.endpoint, startup.clone(), secret).await {
                Ok(conn) => self.put_idle(conn),
                Err(e) => {
                    if e.is_bad_password() {
                        credentials.forget(&self.key);
                    }
                    tracing::warn!(pool = %self.key.user, database = %self.key.database, error = %e, "could not open min_idle connection");
                    return;
                }
            }
            drop(permit);
        }
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let conns: Vec<Idle> = self.idle.lock().drain(..).collect();
        for i in conns {
            i.conn.terminate().await;
        }
    }
}

/// A connection lent to a session. Give it back with [`Lease::release`]; dropping it closes
/// the connection.
pub struct Lease {
    conn: Option<Connection>,
    permit: Option<OwnedSemaphorePermit>,
    pool: Arc<Pool>,
}

impl Lease {
    fn new(conn: Connection, permit: OwnedSemaphorePermit, pool: Arc<Pool>) -> Self {
        pool.lend(&conn);
        Lease { conn: Some(conn), permit: Some(permit), pool }
    }

    pub fn conn(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("a lease holds its connection until released")
    }

    pub fn conn_ref(&self) -> &Connection {
        self.conn.as_ref().expect("a lease holds its connection until released")
    }

    /// The pool it was lent from.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns the connection to the pool. It is reused only when it is at rest: idle
    /// transaction status, nothing unread. The reset runs in the background; the slot stays
    /// taken until it is done.
    pub fn release(mut self, reset: Reset) {
        let (Some(mut conn), Some(permit)) = (self.conn.take(), self.permit.take()) else {
            return;
        };
        self.pool.returned(&conn);
        let pool = self.pool.clone();
        let reusable = reset != Reset::Close && conn.status == TransactionStatus::Idle && conn.rbuf.is_empty();
        if !reusable {
            tokio::spawn(conn.terminate());
            return;
        }
        if reset == Reset::None {
            pool.put_idle(conn);
            return;
        }
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(5), conn.run_internal("DISCARD ALL")).await {
                Ok(Ok(())) if conn.status == TransactionStatus::Idle => {
                    // DISCARD ALL reset the settings and dropped every prepared statement.
                    conn.state = super::connection::SessionState::startup();
                    conn.verified = None;
                    conn.prepared = None;
                    pool.put_idle(conn)
                }
                Ok(Ok(())) => conn.terminate().await,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "reset failed, closing backend connection");
                    conn.terminate().await;
                }
                Err(_) => tracing::debug!("reset timed out, closing backend connection"),
            }
            drop(permit);
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.returned(&conn);
            // Not released: the session ended abnormally. Never reuse it.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(conn.terminate());
            }
        }
    }
}

/// A permit of `semaphore` (a pool's slots, or the places of first log-ins), waited for up to
/// `settings.acquire_timeout`: past it, the timeout error for `key`'s pool.
async fn permit(
    semaphore: &Arc<Semaphore>,
    key: &PoolKey,
    settings: &PoolConfig,
) -> Result<OwnedSemaphorePermit, PoolError> {
    match tokio::time::timeout(settings.acquire_timeout, semaphore.clone().acquire_owned()).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(_)) => Err(PoolError::Closed),
        Err(_) => Err(PoolError::Timeout {
            database: key.database.clone(),
            user: key.user.clone(),
            timeout: settings.acquire_timeout,
            max: settings.max_size,
        }),
    }
}

/// Every pool, created on first use.
pub struct Pools {
    settings: PoolConfig,
    endpoint: Arc<Endpoint>,
    pub credentials: Arc<Credentials>,
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Log-ins on connections of their own for keys without a pool yet ([`Pools::log_in`]).
    first_logins: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(
        settings: PoolConfig,
        endpoint: Arc<Endpoint>,
        verify_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Pools {
            endpoint,
            credentials: Arc::new(Credentials::new(verify_interval)),
            pools: Mutex::new(HashMap::new()),
            first_logins: Arc::new(Semaphore::new(settings.max_size.max(1))),
            settings,
            metrics,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    pub fn get(&self, key: &PoolKey) -> Arc<Pool> {
        self.pools
            .lock()
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool::new(key.clone(), self.settings.clone(), self.endpoint.clone(), self.metrics.clone()))
            })
            .clone()
    }

    /// Every pool, sorted by key.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.pools.lock().values().cloned().collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Periodic upkeep of every pool.
    pub async fn maintain(&self) {
        for pool in self.all() {
            pool.maintain(&self.credentials).await;
        }
    }

    /// Closes idle connections and refuses new leases (shutdown).
    pub async fn close(&self) {
        for pool in self.all() {
            pool.close().await;
        }
    }
}
