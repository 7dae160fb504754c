//! What pgcache has learned about logging in to the upstream as a (database, user): that no
//! password is needed, or a password the upstream accepted. Kept in memory only, never logged;
//! forgotten when the upstream rejects it.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::config::Password;

use super::PoolKey;

/// A verified way to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// The upstream admitted this user without asking for a password.
    NoPassword,
    /// The upstream accepted this password.
    Password(Password),
}

/// Verified logins by pool key.
#[derive(Debug, Default)]
pub struct Credentials {
    map: Mutex<HashMap<PoolKey, Known>>,
}

impl Credentials {
    pub fn get(&self, key: &PoolKey) -> Option<Known> {
        self.lock().get(key).cloned()
    }

    pub fn remember(&self, key: &PoolKey, password: Option<&Password>) {
        let known = match password {
            Some(p) => Known::Password(p.clone()),
            None => Known::NoPassword,
        };
        self.lock().insert(key.clone(), known);
    }

    pub fn forget(&self, key: &PoolKey) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Known>> {
        // A poisoned map only means a panic elsewhere mid-insert; the data is still usable.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
