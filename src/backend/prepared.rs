//! The statements pgcache prepared on one backend connection in transaction pooling, under
//! their server names: kept with the connection between the clients that use it, bounded by
//! `pool.max_prepared_statements` (least recently used closed first).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// What a statement was prepared from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    sql: Arc<str>,
    param_types: Vec<u32>,
    /// Postgres refused to run it since ("cached plan must not change result type" after
    /// DDL): it exists on the backend but must be closed and prepared again before use.
    stale: bool,
}

/// The statements pgcache prepared on one backend connection, by server name, with when each
/// was last used (a counter, not a clock).
#[derive(Debug)]
pub struct Prepared {
    by_name: HashMap<Bytes, (Source, u64)>,
    tick: u64,
    max: usize,
}

impl Prepared {
    pub fn new(max: usize) -> Prepared {
        Prepared { by_name: HashMap::new(), tick: 0, max: max.max(1) }
    }

    /// Whether the backend has `name` prepared from this text and these types (and notes the
    /// use). A name prepared from other text (a hash collision) counts as absent.
    pub fn has(&mut self, name: &[u8], sql: &str, param_types: &[u32]) -> bool {
        self.tick += 1;
        match self.by_name.get_mut(name) {
            Some((src, used)) if !src.stale && *src.sql == *sql && src.param_types == param_types => {
                *used = self.tick;
                true
            }
            _ => false,
        }
    }

    /// Whether a statement under `name` exists at all (whatever its text).
    pub fn exists(&self, name: &[u8]) -> bool {
        self.by_name.contains_key(name)
    }

    /// Notes that `name` is being prepared; returns the least recently used name to close
    /// first if the backend is at its bound.
    pub fn add(&mut self, name: Bytes, sql: Arc<str>, param_types: Vec<u32>) -> Option<Bytes> {
        self.tick += 1;
        let evict = if self.by_name.len() >= self.max && !self.by_name.contains_key(&name) {
            let oldest = self.by_name.iter().min_by_key(|(_, (_, used))| *used).map(|(n, _)| n.clone());
            oldest.inspect(|n| {
                self.by_name.remove(n);
            })
        } else {
            None
        };
        self.by_name.insert(name, (Source { sql, param_types, stale: false }, self.tick));
        evict
    }

    /// Notes that the backend's `name` no longer runs (its result type changed after DDL): the
    /// next Parse of it closes it and prepares it again.
    pub fn mark_stale(&mut self, name: &[u8]) {
        if let Some((src, _)) = self.by_name.get_mut(name) {
            src.stale = true;
        }
    }

    /// Forgets `name` (its Parse failed or was skipped).
    pub fn remove(&mut self, name: &[u8]) {
        self.by_name.remove(name);
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
    }

    /// The names of the statements prepared here (and not marked stale).
    pub fn names(&self) -> impl Iterator<Item = &Bytes> {
        self.by_name.iter().filter(|(_, (src, _))| !src.stale).map(|(n, _)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_statement_is_evicted() {
        let mut p = Prepared::new(2);
        let sql = |s: &str| Arc::from(s);
        assert_eq!(p.add("a".into(), sql("A"), vec![]), None);
        assert_eq!(p.add("b".into(), sql("B"), vec![]), None);
        assert!(p.has(b"a", "A", &[]), "a used: b is now the oldest");
        assert_eq!(p.add("c".into(), sql("C"), vec![]), Some(Bytes::from("b")));
        assert!(!p.has(b"b", "B", &[]));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_name_from_other_text_is_not_trusted() {
        let mut p = Prepared::new(4);
        p.add("n".into(), Arc::from("select 1"), vec![]);
        assert!(!p.has(b"n", "select 2", &[]));
        assert!(!p.has(b"n", "select 1", &[23]));
        assert!(p.exists(b"n"));
        assert!(p.has(b"n", "select 1", &[]));
        p.mark_stale(b"n");
        assert!(!p.has(b"n", "select 1", &[]) && p.exists(b"n"), "stale: closed and prepared again");
        p.remove(b"n");
        assert!(p.is_empty());
    }
}
