//! What a session keeps of its cache decisions: the interned ids of its settings key parts
//! (see [`Interner`]), the short way's miss handed to the planner ([`Missed`]), and its pool's
//! [`Book`] of verdicts (shared with every session of its database and user; see
//! [`crate::context::verdicts`]).

use std::sync::Arc;

use bytes::Bytes;

use crate::cache::key::{Interner, Key};
use crate::context::verdicts::Book;
use crate::policy::Assessment;

use super::core::flow::Statement;

/// A session's memo.
pub struct Assessments {
    /// The verdicts of the session's pool key.
    pub book: Arc<Book>,
    /// The interned ids of the session's current settings key parts (with and without the
    /// role); the `Bytes` kept alive so their address identifies them.
    settings: Vec<(Bytes, u64)>,
    /// The short way's miss of the request being served, for the planner's decision of the
    /// same request ([`Missed`]); boxed, so that an idle session keeps room for a pointer.
    pub missed: Option<Box<Missed>>,
}

/// A Bind or a Query the short way ([`super::answer`]) looked up and found cacheable and
/// missing, handed to the planner, which decides the same request next, so that a miss is
/// looked up once (rule, settings, key, store) rather than twice. Taken by the next decision
/// whatever it is, and used only by the decision of this very frame (held, so its address
/// cannot be reused) — for a Bind, of the same statement text and parameter types — outside a
/// transaction (as the short way looked it up), under the same rule set and catalog facts (a
/// DDL or a reload meanwhile — the planner may wait on the catalog or a throttle first — and it
/// is looked up again): the look-up would give the same answer again.
pub struct Missed {
    /// The request's frame: the Bind, or the Query.
    pub frame: Bytes,
    /// The rule set's version and the catalog's epoch, read before the look-up.
    pub rules: u64,
    pub catalog: u64,
    /// The statement the Bind executes (`None`: a Query).
    pub statement: Option<Arc<Statement>>,
    pub key: Key,
    pub assessment: Arc<Assessment>,
    pub l2: Option<String>,
}

impl Missed {
    /// Whether this is the miss of `bind` of `sql` with `param_types`.
    pub fn is_for(&self, sql: &str, param_types: &[u32], bind: &crate::protocol::frontend::BindParts) -> bool {
        same_frame(&self.frame, &bind.raw)
            && self.statement.as_ref().is_some_and(|s| *s.sql == *sql && s.param_types == param_types)
    }

    /// Whether this is the miss of the Query frame `query`.
    pub fn is_for_query(&self, query: &Bytes) -> bool {
        self.statement.is_none() && same_frame(&self.frame, query)
    }
}

/// Whether `raw` is the frame `held` holds (not an equal copy of it: another Bind of the same
/// bytes is another request, to be looked up on its own).
fn same_frame(held: &Bytes, raw: &Bytes) -> bool {
    !held.is_empty() && held.as_ptr() == raw.as_ptr() && held.len() == raw.len()
}

impl Assessments {
    pub fn new(book: Arc<Book>) -> Self {
        Assessments { book, settings: Vec::new(), missed: None }
    }

    /// The interned id of a settings key part, asking the interner only when the settings
    /// changed since the last call.
    pub fn settings_id(&mut self, part: Bytes, interner: &Interner) -> u64 {
        let same = |b: &Bytes| b.as_ptr() == part.as_ptr() && b.len() == part.len();
        if let Some((_, id)) = self.settings.iter().find(|(b, _)| same(b)) {
            return *id;
        }
        let id = interner.id(&part);
        if self.settings.len() >= 2 {
            self.settings.remove(0);
        }
        // Room for the two kept, not the four a first push makes (idle sessions keep this).
        self.settings.reserve_exact(1);
        self.settings.push((part, id));
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_miss_is_handed_on_only_to_the_same_frame() {
        let frame = Bytes::from_static(b"B\0\0\0\x0e\0s1\0\0\0\0\0\0\0");
        let held = frame.clone();
        assert!(same_frame(&held, &frame));
        let copy = Bytes::copy_from_slice(&frame);
        assert!(!same_frame(&held, &copy), "an equal Bind elsewhere is another request");
        assert!(!same_frame(&held, &frame.slice(..5)), "a part of it");
        assert!(!same_frame(&Bytes::new(), &Bytes::new()), "a Bind made otherwise is never the same");
    }

    #[test]
    fn a_query_miss_is_handed_on_only_to_the_same_query() {
        let query = Bytes::from_static(b"Q\0\0\0\x0dSELECT 1\0");
        let missed = Missed {
            frame: query.clone(),
            rules: 1,
            catalog: 1,
            statement: None,
            key: crate::cache::key::KeyBuilder::new(b'Q').str("SELECT 1").finish(),
            assessment: Arc::new(Assessment {
                keyed: None,
                deps: Vec::new(),
                resolved: Vec::new(),
                row_security: false,
                reads_custom_settings: false,
                rule: Arc::new(crate::rules::Rule::cache("r", Duration::from_secs(60))),
            }),
            l2: None,
        };
        assert!(missed.is_for_query(&query));
        assert!(!missed.is_for_query(&Bytes::copy_from_slice(&query)), "the same text sent again");
        let bind = crate::protocol::frontend::BindParts::decode(&Bytes::from_static(b"B\0\0\0\x0e\0s1\0\0\0\0\0\0\0"));
        let bind = bind.expect("a Bind");
        assert!(!missed.is_for("SELECT 1", &[], &bind), "a Query's miss is no Bind's");
    }
}
