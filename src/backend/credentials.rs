//! What pgcache has learned about logging in to the upstream as a (database, user): that no
//! password is needed, a password the upstream accepted, or the SCRAM keys a client's proof
//! gave up (SCRAM pass-through: enough to log in as that role, without its password). Kept in memory only, never logged;
//! forgotten when the upstream rejects it, and trusted only for `auth.verify_interval` after
//! Postgres last confirmed it, so a password changed or a role locked in Postgres stops
//! working through pgcache within that interval.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::Password;
use crate::protocol::scram::Keys;

use super::PoolKey;

/// What a backend login presents if Postgres asks: a password, or SCRAM keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    Password(Password),
    /// The keys a client proved in its SCRAM exchange with pgcache: they log in with SCRAM
    /// only, to a server holding the same verifier.
    Keys(Box<Keys>),
}

/// A verified way to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// The upstream admitted this user without asking for a password.
    NoPassword,
    /// The upstream accepted this secret (or, for keys, a client proved them).
    Secret(Secret),
}

impl Known {
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            Known::NoPassword => None,
            Known::Secret(s) => Some(s),
        }
    }
}

/// Verified logins by pool key, with when Postgres confirmed them.
#[derive(Debug)]
pub struct Credentials {
    map: Mutex<HashMap<PoolKey, (Known, Instant)>>,
    max_age: Duration,
}

impl Credentials {
    pub fn new(max_age: Duration) -> Self {
        Credentials { map: Mutex::new(HashMap::new()), max_age }
    }

    /// The login confirmed for `key` within the verify interval, if any.
    pub fn get(&self, key: &PoolKey) -> Option<Known> {
        self.map.lock().get(key).filter(|(_, at)| at.elapsed() < self.max_age).map(|(k, _)| k.clone())
    }

    /// The login last confirmed for `key`, however old (for opening pool connections).
    pub fn last(&self, key: &PoolKey) -> Option<Known> {
        self.map.lock().get(key).map(|(k, _)| k.clone())
    }

    pub fn remember(&self, key: &PoolKey, secret: Option<&Secret>) {
        let known = match secret {
            Some(s) => Known::Secret(s.clone()),
            None => Known::NoPassword,
        };
        self.map.lock().insert(key.clone(), (known, Instant::now()));
    }

    /// Every login confirmed for `database`, newest first.
    pub fn known_for_database(&self, database: &str) -> Vec<(String, Known)> {
        let map = self.map.lock();
        let mut v: Vec<_> = map
            .iter()
            .filter(|(k, _)| k.database == database)
            .map(|(k, (kn, at))| (k.user.clone(), kn.clone(), *at))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.2));
        v.into_iter().map(|(u, k, _)| (u, k)).collect()
    }

    pub fn forget(&self, key: &PoolKey) {
        self.map.lock().remove(key);
    }
}
