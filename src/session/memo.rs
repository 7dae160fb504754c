//! A session's memo of the session-free half of its cache decisions ([`policy::assess`]: rule,
//! statement, catalog facts), per classified statement, so that a prepared statement executed
//! again — or a simple-protocol query of a shape seen before — costs a map look-up instead of
//! rule matching and catalog look-ups.
//!
//! A verdict is reused only while nothing it was drawn from can have changed: the same rule set
//! (its version), the same catalog facts (the catalog's epoch, which moves on DDL and
//! `INVALIDATE`; and no longer than `cache.catalog_ttl`, the facts' own lifetime), and the same
//! role and `search_path` (which resolve unqualified names), and — when a rule matches by
//! `pattern`, which reads literal values — the same SQL text. Verdicts that depend on a passing
//! condition (the catalog unreachable, the search path not yet known) are not kept.
//!
//! It also remembers the interned id of the session's settings key part (see [`Interner`]).
//!
//! [`policy::assess`]: crate::policy::assess

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::cache::key::Interner;
use crate::policy::{Assessed, Assessment, Reason};
use crate::query::Classified;

/// Above this many statements the memo starts over (sessions that generate SQL endlessly).
const MAX_ENTRIES: usize = 1024;

/// What [`policy::assess`](crate::policy::assess) concluded, shareable.
#[derive(Debug, Clone)]
pub enum Verdict {
    Cacheable(Arc<Assessment>),
    Forward(Reason),
    NeedsSearchPath,
}

impl From<Assessed> for Verdict {
    fn from(a: Assessed) -> Self {
        match a {
            Assessed::Cacheable(a) => Verdict::Cacheable(Arc::new(a)),
            Assessed::Forward(r) => Verdict::Forward(r),
            Assessed::NeedsSearchPath => Verdict::NeedsSearchPath,
        }
    }
}

/// Everything a verdict was drawn from, besides the statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub rules: u64,
    pub catalog: u64,
    pub role: Option<Box<str>>,
    pub search_path: Option<Box<str>>,
    /// The SQL text, when the rule set matches patterns on it (statements of one shape may
    /// then be decided differently).
    pub sql: Option<Box<str>>,
}

/// What a verdict is looked up under, besides the statement.
#[derive(Debug, Clone, Copy)]
pub struct Conditions<'a> {
    pub rules: u64,
    pub catalog: u64,
    pub role: Option<&'a str>,
    pub search_path: Option<&'a str>,
    pub sql: &'a str,
}

impl Stamp {
    fn matches(&self, now: &Conditions<'_>) -> bool {
        self.rules == now.rules
            && self.catalog == now.catalog
            && self.role.as_deref() == now.role
            && self.search_path.as_deref() == now.search_path
            && self.sql.as_deref().is_none_or(|sql| sql == now.sql)
    }
}

struct Memo {
    /// Keeps the classification alive, so its address (the key) is not reused.
    _statements: Arc<Vec<Classified>>,
    stamp: Stamp,
    until: Instant,
    verdict: Verdict,
}

/// The memo. Keyed by the address of the classified statement, which lives in an
/// `Arc<Vec<Classified>>` shared by every use of the same statement text or shape (a statement
/// pinning key values with literals has one per text: see [`crate::query::classifier`]).
#[derive(Default)]
pub struct Assessments {
    entries: HashMap<usize, Memo>,
    /// The interned ids of the session's current settings key parts (with and without the
    /// role); the `Bytes` kept alive so their address identifies them.
    settings: Vec<(Bytes, u64)>,
}

impl Assessments {
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
        self.settings.push((part, id));
        id
    }

    /// The verdict for `c` (one of `statements`), if one was kept under the same conditions
    /// and is still within the catalog's TTL — or of any age with `any_age` (while Postgres
    /// cannot be reached, the facts cannot be looked up again, nor changed).
    pub fn get(&self, c: &Classified, now: &Conditions<'_>, any_age: bool) -> Option<&Verdict> {
        let m = self.entries.get(&(c as *const Classified as usize))?;
        (m.stamp.matches(now) && (any_age || Instant::now() < m.until)).then_some(&m.verdict)
    }

    /// Keeps `verdict` for `c` until `until`, unless it depends on a passing condition.
    pub fn keep(
        &mut self,
        statements: &Arc<Vec<Classified>>,
        c: &Classified,
        stamp: Stamp,
        until: Instant,
        verdict: &Verdict,
    ) {
        let passing = matches!(verdict, Verdict::NeedsSearchPath | Verdict::Forward(Reason::CatalogUnavailable(_)));
        debug_assert!(statements.iter().any(|s| std::ptr::eq(s, c)), "c is one of statements");
        if passing {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.clear();
        }
        let memo = Memo { _statements: statements.clone(), stamp, until, verdict: verdict.clone() };
        self.entries.insert(c as *const Classified as usize, memo);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stamp(rules: u64, path: &str) -> Stamp {
        Stamp { rules, catalog: 7, role: Some("app".into()), search_path: Some(path.into()), sql: None }
    }

    fn now<'a>(rules: u64, catalog: u64, role: &'a str, search_path: &'a str) -> Conditions<'a> {
        Conditions { rules, catalog, role: Some(role), search_path: Some(search_path), sql: "SELECT 1" }
    }

    #[test]
    fn a_verdict_is_reused_only_under_the_same_conditions() {
        let statements = Arc::new(crate::query::classify::classify("SELECT 1"));
        let c = &statements[0];
        let mut m = Assessments::default();
        let later = Instant::now() + Duration::from_secs(60);
        m.keep(&statements, c, stamp(1, "public"), later, &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(1, 7, "app", "public"), false).is_some());
        assert!(m.get(c, &now(2, 7, "app", "public"), false).is_none(), "another rule set");
        assert!(m.get(c, &now(1, 8, "app", "public"), false).is_none(), "catalog facts forgotten");
        assert!(m.get(c, &now(1, 7, "other", "public"), false).is_none(), "another role");
        assert!(m.get(c, &now(1, 7, "app", "app, public"), false).is_none(), "another search_path");
        let patterned = Stamp { sql: Some("SELECT 1 -- a".into()), ..stamp(1, "public") };
        m.keep(&statements, c, patterned, later, &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(1, 7, "app", "public"), false).is_none(), "rules match patterns on other text");
        m.keep(&statements, c, stamp(1, "public"), Instant::now(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(1, 7, "app", "public"), false).is_none(), "past the catalog's TTL");
        assert!(m.get(c, &now(1, 7, "app", "public"), true).is_some(), "of any age while offline");
    }

    #[test]
    fn passing_conditions_are_not_kept() {
        let statements = Arc::new(crate::query::classify::classify("SELECT 1"));
        let c = &statements[0];
        let mut m = Assessments::default();
        let later = Instant::now() + Duration::from_secs(60);
        m.keep(&statements, c, stamp(1, "p"), later, &Verdict::NeedsSearchPath);
        m.keep(&statements, c, stamp(1, "p"), later, &Verdict::Forward(Reason::CatalogUnavailable("down".into())));
        assert!(m.get(c, &now(1, 7, "app", "p"), false).is_none());
    }
}
