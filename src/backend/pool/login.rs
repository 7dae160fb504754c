//! Log-ins whose password Postgres must judge (`auth.method = "cleartext"`), each on a
//! connection opened for it — within the pool's bounds, and changing nothing of the pool for
//! good before Postgres has accepted it ([`Pools::log_in`], [`Pool::log_in`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::OwnedSemaphorePermit;

use super::{Idle, Lease, Pool, PoolError, PoolKey, Pools, permit};
use crate::backend::connection::StartupParams;
use crate::backend::{Connection, Endpoint, Secret};
use crate::metrics::Metrics;

/// An idle connection set aside while a log-in connects ([`Pool::log_in`]): back at the front
/// of the idle list unless taken (the log-in failed, or was abandoned).
struct Aside<'a> {
    pool: &'a Pool,
    idle: Option<Idle>,
}

impl Drop for Aside<'_> {
    fn drop(&mut self) {
        let Some(idle) = self.idle.take() else { return };
        if self.pool.closed.load(Ordering::Acquire) {
            tokio::spawn(idle.conn.terminate());
        } else {
            self.pool.idle.lock().push_front(idle);
        }
    }
}

impl Pool {
    /// A backend for a log-in whose password Postgres must judge, on a connection opened for
    /// it once a slot is free. Unlike [`Pool::acquire`], nothing of the pool is changed for
    /// good before Postgres has accepted the log-in: an idle connection the pool has no room
    /// beside is only set aside while connecting (so that the pool never has more connections
    /// open than it may hold) and taken back if the log-in fails; the startup parameters are
    /// not remembered; the wait is not counted against `pool.max_waiting`; and a failure (a
    /// wrong password, authentication slower than the connect timeout) is not taken for
    /// Postgres being unavailable, nor is a recent such failure a reason to refuse.
    pub async fn log_in(
        self: &Arc<Self>,
        startup: &StartupParams,
        secret: Option<&Secret>,
    ) -> Result<Lease, PoolError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PoolError::Closed);
        }
        let permit = self.slot().await?;
        let mut aside = Aside { pool: self, idle: self.room_for(&permit) };
        let conn = connect(&self.endpoint, &self.metrics, startup, secret).await?;
        // Postgres answers: whatever failed before is over.
        *self.last_failure.lock() = None;
        if let Some(old) = aside.idle.take() {
            tokio::spawn(old.conn.terminate());
        }
        Ok(self.admit(conn, permit))
    }

    /// `conn`, a log-in Postgres accepted, lent to its session in the slot `permit` holds.
    fn admit(self: &Arc<Self>, conn: Connection, permit: OwnedSemaphorePermit) -> Lease {
        *self.last_startup.lock() = Some(conn.startup.clone());
        self.make_room(&permit);
        Lease::new(conn, permit, self.clone())
    }
}

impl Pools {
    /// A backend for a log-in whose password Postgres must judge, on a connection opened for
    /// it, within the pools' bounds: through its pool's slots when the pool exists (a client of
    /// the same database and user logged in before; [`Pool::log_in`]), else as one of at most
    /// `max_size` first log-ins connecting at once. A crowd of clients arriving before the first
    /// of them has logged in so never opens a connection each (which could take every
    /// connection Postgres allows), and a pool is still made only for a log-in Postgres
    /// accepted. A place is held only while connecting: a flood of failing log-ins for unknown
    /// users delays other first log-ins by their turn in a fair queue, not longer.
    pub async fn log_in(
        &self,
        key: &PoolKey,
        startup: &StartupParams,
        secret: Option<&Secret>,
    ) -> Result<Lease, PoolError> {
        let existing = || self.pools.lock().get(key).cloned();
        if let Some(pool) = existing() {
            return pool.log_in(startup, secret).await;
        }
        let place = permit(&self.first_logins, key, &self.settings).await?;
        // Another client's log-in made the pool meanwhile: its slots bound this one.
        if let Some(pool) = existing() {
            drop(place);
            return pool.log_in(startup, secret).await;
        }
        let conn = connect(&self.endpoint, &self.metrics, startup, secret).await?;
        // Made before the place is given up, so the next in line goes through its slots. Made
        // since by another first log-in, its slots may all be taken: this connection, open
        // already, waits for one.
        let pool = self.get(key);
        drop(place);
        match pool.slot().await {
            Ok(permit) => Ok(pool.admit(conn, permit)),
            Err(e) => {
                tokio::spawn(conn.terminate());
                Err(e)
            }
        }
    }
}

/// Opens a connection for a log-in; a failure that says Postgres cannot be reached is counted
/// as a backend error (a wrong password is not).
async fn connect(
    endpoint: &Endpoint,
    metrics: &Metrics,
    startup: &StartupParams,
    secret: Option<&Secret>,
) -> Result<Connection, PoolError> {
    Connection::connect(endpoint, startup.clone(), secret).await.map_err(|e| {
        if e.is_refusal() {
            metrics.backend_error();
        }
        e.into()
    })
}
