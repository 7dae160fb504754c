//! Single-flight: when many sessions miss on the same key at once, one sends the query and
//! the others wait (bounded) for its result instead of sending it too.

use foldhash::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::Key;

/// Fills in progress.
#[derive(Debug, Default)]
pub struct Flights {
    map: Mutex<HashMap<Key, watch::Receiver<()>>>,
}

/// The right to fill a key; others wait until it is dropped.
#[derive(Debug)]
pub struct Flight {
    flights: Arc<Flights>,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Dropping the sender wakes every waiter.
        self.flights.map.lock().remove(&self.key);
    }
}

/// The outcome of asking to fill a key.
pub enum Turn {
    /// Nobody else is filling it: go ahead.
    Lead(Flight),
    /// Somebody was; they finished (look again) or the wait timed out (go to Postgres).
    Waited { timed_out: bool },
}

impl Flights {
    pub async fn join(self: &Arc<Self>, key: &Key, wait: Duration) -> Turn {
        let mut rx = {
            let mut map = self.map.lock();
            match map.get(key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(());
                    map.insert(key.clone(), rx);
                    return Turn::Lead(Flight { flights: self.clone(), key: key.clone(), _done: tx });
                }
            }
        };
        // changed() fails once the sender is dropped, i.e. the leader finished.
        let timed_out = tokio::time::timeout(wait, async { while rx.changed().await.is_ok() {} }).await.is_err();
        Turn::Waited { timed_out }
    }

    pub fn in_flight(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::KeyBuilder;

    #[tokio::test]
    async fn one_leads_the_rest_wait() {
        let flights = Arc::new(Flights::default());
        let key = KeyBuilder::new(b'Q').str("select 1").finish();
        let Turn::Lead(lead) = flights.join(&key, Duration::from_secs(1)).await else { panic!("first leads") };
        let f2 = flights.clone();
        let k2 = key.clone();
        let waiter = tokio::spawn(async move { f2.join(&k2, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(lead);
        assert!(matches!(waiter.await.expect("join"), Turn::Waited { timed_out: false }));
        assert!(matches!(flights.join(&key, Duration::from_secs(1)).await, Turn::Lead(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let flights = Arc::new(Flights::default());
        let key = KeyBuilder::new(b'Q').str("slow").finish();
        let _lead = flights.join(&key, Duration::from_secs(1)).await;
        assert!(matches!(flights.join(&key, Duration::from_millis(100)).await, Turn::Waited { timed_out: true }));
    }
}
