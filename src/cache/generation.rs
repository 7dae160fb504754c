//! Generation counters. Relations are identified as Postgres would resolve them when known
//! (`schema.name`), with a second counter per bare name for writes pgcache could not resolve
//! and for DDL, one per database (its epoch: moved when this instance may have missed another
//! instance's invalidations for it), and a global counter for writes whose targets are
//! unknown. Counters are interned `Arc<AtomicU64>`s, so checking an entry is a few atomic
//! loads, without locks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::query::Relation;

/// A counter an entry depends on, with the value it had when the entry's query was sent.
#[derive(Debug, Clone)]
pub struct Dependency {
    counter: Arc<AtomicU64>,
    seen: u64,
}

impl Dependency {
    pub fn moved(&self) -> bool {
        self.counter.load(Ordering::Acquire) != self.seen
    }
}

/// Every counter.
#[derive(Debug, Default)]
pub struct Generations {
    global: Arc<AtomicU64>,
    relations: Mutex<HashMap<Relation, Arc<AtomicU64>>>,
    names: Mutex<HashMap<String, Arc<AtomicU64>>>,
    databases: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

fn intern<K: std::hash::Hash + Eq + Clone>(map: &Mutex<HashMap<K, Arc<AtomicU64>>>, k: &K) -> Arc<AtomicU64> {
    map.lock().entry(k.clone()).or_default().clone()
}

fn snap(counter: Arc<AtomicU64>) -> Dependency {
    let seen = counter.load(Ordering::Acquire);
    Dependency { counter, seen }
}

impl Generations {
    /// The counters a read of `relations` in `database` depends on, as they are now.
    /// `relations` are the qualified relations the read resolved to (views expanded,
    /// partitions included).
    pub fn snapshot(&self, database: &str, relations: &[Relation]) -> Vec<Dependency> {
        let mut deps = Vec::with_capacity(relations.len() * 2 + 2);
        deps.push(snap(self.global.clone()));
        deps.push(snap(intern(&self.databases, &database.to_owned())));
        for r in relations {
            deps.push(snap(intern(&self.relations, r)));
            deps.push(snap(intern(&self.names, &r.name)));
        }
        deps
    }

    /// A write to these resolved relations.
    pub fn bump_relations(&self, relations: &[Relation]) {
        for r in relations {
            intern(&self.relations, r).fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A write to every relation called `name`, in any schema (unresolved writes and DDL).
    pub fn bump_name(&self, name: &str) {
        intern(&self.names, &name.to_owned()).fetch_add(1, Ordering::AcqRel);
    }

    /// Everything read in `database` may have changed (another instance's invalidations may
    /// have been missed).
    pub fn bump_database(&self, database: &str) {
        intern(&self.databases, &database.to_owned()).fetch_add(1, Ordering::AcqRel);
    }

    /// A write whose targets are unknown: every entry dies.
    pub fn bump_all(&self) {
        self.global.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str, n: &str) -> Relation {
        Relation::new(Some(s), n)
    }

    fn alive(deps: &[Dependency]) -> bool {
        !deps.iter().any(Dependency::moved)
    }

    #[test]
    fn writes_kill_exactly_the_dependent_reads() {
        let g = Generations::default();
        let a = g.snapshot("db", &[rel("public", "t")]);
        let b = g.snapshot("db", &[rel("other", "t")]);
        let c = g.snapshot("db", &[rel("public", "u")]);
        let elsewhere = g.snapshot("other_db", &[rel("public", "u")]);
        g.bump_relations(&[rel("public", "t")]);
        assert!(!alive(&a));
        assert!(alive(&b), "same name in another schema is unaffected by a resolved write");
        assert!(alive(&c));
        g.bump_name("t");
        assert!(!alive(&b), "an unresolved write to t reaches every schema");
        assert!(alive(&c));
        g.bump_database("db");
        assert!(!alive(&c), "everything read in a database");
        assert!(alive(&elsewhere), "but only in that database");
        let d = g.snapshot("db", &[]);
        g.bump_all();
        assert!(!alive(&elsewhere) && !alive(&d));
    }
}
