//! Statement names in transaction pooling. A client's named statements may land on any
//! backend, where other clients' statements already live, so they are never sent under the
//! client's name: each is sent as `pgcache_<hash of its SQL and parameter types>`, prepared on
//! a backend the first time that backend needs it, and kept there for whichever client sends
//! the same statement next. Each backend remembers what it has prepared, at most
//! `pool.max_prepared_statements`, closing the least recently used one to make room (the
//! [`crate::backend::Prepared`] the connection carries between clients). The unnamed
//! statement is not renamed: it lives only until the next unnamed Parse anyway.

use std::hash::{Hash, Hasher};

use bytes::Bytes;

/// The name a statement with this text and these parameter types has on every backend.
/// 128 bits of hash, and [`crate::backend::Prepared`] compares the text before it trusts a
/// name.
pub fn server_name(sql: &str, param_types: &[u32]) -> Bytes {
    let hash = |seed: u8| {
        let mut h = std::hash::DefaultHasher::new();
        (seed, sql, param_types).hash(&mut h);
        h.finish()
    };
    Bytes::from(format!("pgcache_{:016x}{:016x}", hash(1), hash(2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_depend_on_text_and_types_only() {
        assert_eq!(server_name("select $1", &[23]), server_name("select $1", &[23]));
        assert_ne!(server_name("select $1", &[23]), server_name("select $1", &[25]));
        assert_ne!(server_name("select $1", &[]), server_name("select $2", &[]));
        assert!(server_name("x", &[]).len() < 64, "fits NAMEDATALEN");
    }
}
