//! Cancel routing. Every client gets its own BackendKeyData from pgcache (a pid and secret
//! that are not a real backend's); a CancelRequest carrying that key is turned into a
//! CancelRequest for the backend the client is using at that moment, sent where that
//! backend is (the primary, or the replica running the client's read).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::backend::{BackendKey, Endpoint};

/// A backend and where it is.
pub type At = (BackendKey, Arc<Endpoint>);

#[derive(Debug, Default)]
struct Slot {
    secret: i32,
    backend: Option<At>,
}

/// The keys handed to clients, by pid.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<i32, Slot>>,
}

/// A client's registration; removed when dropped.
#[derive(Debug)]
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
}

impl CancelRegistry {
    /// Issues a fresh key for a new client.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::rng();
        let mut map = self.map.lock();
        let pid = loop {
            let pid = rng.random_range(1..i32::MAX);
            if !map.contains_key(&pid) {
                break pid;
            }
        };
        let secret = rng.random();
        map.insert(pid, Slot { secret, backend: None });
        CancelHandle { registry: self.clone(), pid, secret }
    }

    /// The backend currently serving the client with this key, if the key is valid.
    pub fn lookup(&self, pid: i32, secret: &[u8]) -> Option<At> {
        let map = self.map.lock();
        let slot = map.get(&pid)?;
        // Compared in constant time with respect to the secret's content.
        let same: bool = slot.secret.to_be_bytes().ct_eq(secret).into();
        if same { slot.backend.clone() } else { None }
    }
}

impl CancelHandle {
    /// Records which backend (if any) a cancel should reach now.
    pub fn set_backend(&self, key: Option<At>) {
        if let Some(slot) = self.registry.map.lock().get_mut(&self.pid) {
            slot.backend = key;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.map.lock().remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_finds_the_backend() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        let key = BackendKey { pid: 42, secret: 7 };
        let up: crate::config::Upstream = "postgres://u@127.0.0.1:5432/db".parse().unwrap();
        let endpoint = Arc::new(Endpoint::new(&up, std::time::Duration::from_secs(1)).unwrap());
        h.set_backend(Some((key, endpoint)));
        assert_eq!(reg.lookup(h.pid, &h.secret.to_be_bytes()).map(|(k, _)| k), Some(key));
        assert!(reg.lookup(h.pid, &h.secret.wrapping_add(1).to_be_bytes()).is_none());
        assert!(reg.lookup(h.pid, &[0; 8]).is_none());
        let pid = h.pid;
        drop(h);
        assert!(reg.lookup(pid, &key.secret.to_be_bytes()).is_none());
    }
}
