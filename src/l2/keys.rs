//! The version keys an entry depends on and a write moves, mirroring L1's generation counters
//! ([`crate::cache::generation`]): per relation (every write), per relation for writes not
//! pinned to keys, per relation name (writes whose schema is not known), per key slot of a
//! relation read by key, and one for everything.

use crate::cache::generation::key_slot;
use crate::query::Relation;
use crate::query::point::KeyValue;

/// One version key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// Everything, in every database (writes with unknown targets).
    All,
    /// Everything in one database (another instance's "everything", a relation it could not
    /// name).
    Database { database: String },
    /// Every write to a relation.
    Relation { database: String, relation: Relation },
    /// Writes to a relation not pinned to key values.
    Wide { database: String, relation: Relation },
    /// Writes to any relation of this name.
    Name { database: String, name: String },
    /// Writes to these key values' slot of a relation.
    Slot { database: String, relation: Relation, slot: usize },
}

impl Version {
    /// Its Redis key (names are length-prefixed, so no two versions share a key).
    pub fn key(&self, prefix: &str) -> String {
        let rel = |r: &Relation| {
            let schema = r.schema.as_deref().unwrap_or("");
            format!("{}:{schema}{}:{}", schema.len(), r.name.len(), r.name)
        };
        match self {
            Version::All => format!("{prefix}v:all"),
            Version::Database { database } => format!("{prefix}v:d:{}:{database}", database.len()),
            Version::Relation { database, relation } => {
                format!("{prefix}v:r:{}:{database}{}", database.len(), rel(relation))
            }
            Version::Wide { database, relation } => {
                format!("{prefix}v:w:{}:{database}{}", database.len(), rel(relation))
            }
            Version::Name { database, name } => {
                format!("{prefix}v:n:{}:{database}{}:{name}", database.len(), name.len())
            }
            Version::Slot { database, relation, slot } => {
                format!("{prefix}v:k:{}:{database}{}:{slot}", database.len(), rel(relation))
            }
        }
    }
}

/// The versions a read of `relations` in `database` depends on; `keyed`: it sees only these
/// key values' rows of that relation.
pub fn versions_of_read(
    database: &str,
    relations: &[Relation],
    keyed: Option<(&Relation, &[KeyValue])>,
) -> Vec<Version> {
    let db = || database.to_owned();
    let mut out = vec![Version::All, Version::Database { database: db() }];
    for r in relations {
        match keyed {
            Some((k, values)) if k == r => {
                out.push(Version::Wide { database: db(), relation: r.clone() });
                let mut slots: Vec<usize> = values.iter().map(|v| key_slot(r, v)).collect();
                slots.sort_unstable();
                slots.dedup();
                out.extend(slots.into_iter().map(|slot| Version::Slot { database: db(), relation: r.clone(), slot }));
            }
            _ => out.push(Version::Relation { database: db(), relation: r.clone() }),
        }
        out.push(Version::Name { database: db(), name: r.name.clone() });
    }
    out
}

/// What a write moves, by kind of invalidation (see [`crate::cache::Generations`]'s bumps).
#[derive(Debug, Clone)]
pub enum Moved<'a> {
    Relations(&'a [Relation]),
    Keys { relation: &'a Relation, values: &'a [KeyValue] },
    Name(&'a str),
    Database,
    All,
}

/// The versions the invalidations `moved` in `database` move.
pub fn versions_of_effects<'a>(database: &str, moved: impl IntoIterator<Item = Moved<'a>>) -> Vec<Version> {
    let db = || database.to_owned();
    let mut out = Vec::new();
    for m in moved {
        match m {
            Moved::Relations(rs) => {
                for r in rs {
                    out.push(Version::Relation { database: db(), relation: r.clone() });
                    out.push(Version::Wide { database: db(), relation: r.clone() });
                }
            }
            Moved::Keys { relation, values } => {
                out.push(Version::Relation { database: db(), relation: relation.clone() });
                out.extend(values.iter().map(|v| Version::Slot {
                    database: db(),
                    relation: relation.clone(),
                    slot: key_slot(relation, v),
                }));
            }
            Moved::Name(n) => out.push(Version::Name { database: db(), name: n.to_owned() }),
            Moved::Database => out.push(Version::Database { database: db() }),
            Moved::All => out.push(Version::All),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// SHA-256 of an entry's identity (its fleet-wide key).
pub fn digest(base: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, base).as_ref());
    out
}
