//! The connected clients: who each is (`SHOW CLIENTS`, `SHOW POOLS`) and where a cancel of its
//! goes. Every client gets its own BackendKeyData from pgcache (a pid and secret that are not
//! a real backend's); a CancelRequest carrying that key is turned into a CancelRequest for the
//! backend the client is using at that moment, sent where that backend is (the primary, or
//! the replica running the client's read).
//!
//! One map, keyed by the pid handed out, holds both: an idle client costs one entry (it was
//! two maps, a shared counter and two handles in the session, about 60 bytes more per idle
//! client; `bench/idle.sh`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::backend::{BackendKey, Endpoint, PoolKey};
use crate::net::Peer;

/// A backend and where it is.
pub type At = (BackendKey, Arc<Endpoint>);

/// A session's client, as `SHOW CLIENTS` lists it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: Peer,
    /// Its database and user (shared by the clients of a pool).
    pub key: Arc<PoolKey>,
    pub since: SystemTime,
    /// The pid of the backend it is using, if any.
    pub backend_pid: Option<i32>,
}

/// Who a session's client is (the console's clients are registered for cancels only).
#[derive(Debug)]
struct Who {
    peer: Peer,
    key: Arc<PoolKey>,
    since: SystemTime,
}

#[derive(Debug)]
struct Slot {
    secret: i32,
    backend: Option<At>,
    who: Option<Who>,
}

/// The connected clients, by the pid of the key each was handed.
#[derive(Debug)]
pub struct Clients {
    map: Mutex<HashMap<i32, Slot>>,
    /// How many have registered or left, ever.
    churn: AtomicU64,
    /// The sessions' clients connected now, and `pgcache_client_connections` with it.
    sessions: AtomicUsize,
    connected: metrics::Gauge,
}

/// A client's registration; removed when dropped.
#[derive(Debug)]
pub struct ClientHandle {
    clients: Arc<Clients>,
    pub pid: i32,
    pub secret: i32,
}

impl Clients {
    /// `connected` is the gauge of sessions' clients connected.
    pub fn new(connected: metrics::Gauge) -> Clients {
        Clients { map: Mutex::new(HashMap::new()), churn: AtomicU64::new(0), sessions: AtomicUsize::new(0), connected }
    }

    /// Issues a fresh key for a new client of a session (`who`: its peer and pool key, listed
    /// by `SHOW CLIENTS`) or of the console (`None`: cancels only).
    pub fn register(self: &Arc<Self>, who: Option<(Peer, &Arc<PoolKey>)>) -> ClientHandle {
        let mut rng = rand::rng();
        let who = who.map(|(peer, key)| Who { peer, key: key.clone(), since: SystemTime::now() });
        if who.is_some() {
            self.sessions.fetch_add(1, Ordering::Relaxed);
            self.connected.increment(1.0);
        }
        self.churn.fetch_add(1, Ordering::Relaxed);
        let mut map = self.map.lock();
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        let secret = rng.random();
        map.insert(pid, Slot { secret, backend: None, who });
        ClientHandle { clients: self.clone(), pid, secret }
    }

    /// The backend currently serving the client with this key, if the key is valid.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<At> {
        let map = self.map.lock();
        let slot = map.get(&pid)?;
        // Compared in constant time with respect to the secret's content.
        let same: bool = slot.secret.to_be_bytes().ct_eq(secret).into();
        if same { slot.backend.clone() } else { None }
    }

    /// The sessions' clients, longest connected first.
    pub fn list(&self) -> Vec<ClientInfo> {
        let map = self.map.lock();
        let mut v: Vec<ClientInfo> = map
            .values()
            .filter_map(|s| {
                let who = s.who.as_ref()?;
                let backend_pid = s.backend.as_ref().map(|(key, _)| key.pid);
                Some(ClientInfo { peer: who.peer, key: who.key.clone(), since: who.since, backend_pid })
            })
            .collect();
        drop(map);
        v.sort_by_key(|c| c.since);
        v
    }

    /// How many sessions' clients are connected (what [`Clients::list`] would list).
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// How many clients (of sessions and the console) have come or gone, ever.
    pub fn churn(&self) -> u64 {
        self.churn.load(Ordering::Relaxed)
    }
}

impl ClientHandle {
    /// Records which backend (if any) the client is using now: where a cancel should go, and
    /// what `SHOW CLIENTS` shows.
    pub fn set_backend(&self, at: Option<At>) {
        if let Some(slot) = self.clients.map.lock().get_mut(&self.pid) {
            slot.backend = at;
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        let slot = self.clients.map.lock().remove(&self.pid);
        self.clients.churn.fetch_add(1, Ordering::Relaxed);
        if slot.is_some_and(|s| s.who.is_some()) {
            self.clients.sessions.fetch_sub(1, Ordering::Relaxed);
            self.clients.connected.decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Arc<Endpoint> {
        let up: crate::config::Upstream = "postgres://u@127.0.0.1:5432/db".parse().unwrap();
        Arc::new(Endpoint::new(&up, std::time::Duration::from_secs(1)).unwrap())
    }

    #[test]
    fn only_the_right_secret_finds_the_backend() {
        let reg = Arc::new(Clients::new(metrics::Gauge::noop()));
        let h = reg.register(None);
        let key = BackendKey { pid: 42, secret: 7 };
        h.set_backend(Some((key, endpoint())));
        assert_eq!(reg.lookup(h.pid, &h.secret.to_be_bytes()).map(|(k, _)| k), Some(key));
        assert!(reg.lookup(h.pid, &h.secret.wrapping_add(1).to_be_bytes()).is_none());
        assert!(reg.lookup(h.pid, &[0; 8]).is_none());
        let pid = h.pid;
        drop(h);
        assert!(reg.lookup(pid, &key.secret.to_be_bytes()).is_none());
    }

    #[test]
    fn sessions_clients_are_listed_with_their_backend_and_the_consoles_are_not() {
        let reg = Arc::new(Clients::new(metrics::Gauge::noop()));
        let key = Arc::new(PoolKey { database: "db".into(), user: "u".into() });
        let console = reg.register(None);
        let session = reg.register(Some((Peer::Unix, &key)));
        let listed = reg.list();
        assert_eq!((listed.len(), reg.sessions()), (1, 1));
        assert_eq!((listed[0].peer, listed[0].backend_pid), (Peer::Unix, None));
        session.set_backend(Some((BackendKey { pid: 42, secret: 7 }, endpoint())));
        assert_eq!(reg.list()[0].backend_pid, Some(42));
        assert_eq!(reg.churn(), 2, "two came");
        drop(session);
        assert!(reg.list().is_empty());
        assert_eq!(reg.sessions(), 0);
        drop(console);
        assert_eq!(reg.churn(), 4, "and left");
    }
}
