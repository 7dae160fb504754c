//! A session's memo of the session-free half of its cache decisions ([`policy::assess`]: rule,
//! statement, catalog facts), per classified statement, so that a prepared statement executed
//! again — or a simple-protocol query of a shape seen before — costs a map look-up instead of
//! rule matching and catalog look-ups.
//!
//! A verdict is reused only while nothing it was drawn from can have changed: the same rule set
//! (its version), the same catalog facts (the catalog's epoch, which moves on DDL and
//! `INVALIDATE`; and no longer than `cache.catalog_ttl`, the facts' own lifetime), and the same
//! role and `search_path` (which resolve unqualified names), and — when a rule matches by
//! `pattern`, which reads literal values — the same patterns matched by the text (all of the
//! rule set's patterns are matched in one pass, [`crate::rules::RuleSet::pattern_matches`]). Verdicts that depend on a passing
//! condition (the catalog unreachable, the search path not yet known) are not kept.
//!
//! It also remembers the interned id of the session's settings key part (see [`Interner`]).
//!
//! [`policy::assess`]: crate::policy::assess

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::cache::key::{Interner, Key};
use crate::policy::{Assessed, Assessment, Reason};
use crate::query::Classified;
use crate::query::classify::Shape;

use super::core::flow::Statement;

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
    /// Which of the rule set's patterns the text matched, when it has any (statements of one
    /// shape may then be decided differently; those matching the same are decided alike).
    pub patterns: Option<crate::rules::PatternMatches>,
}

/// What a verdict is looked up under, besides the statement.
#[derive(Debug, Clone, Copy)]
pub struct Conditions<'a> {
    pub rules: u64,
    pub catalog: u64,
    pub role: Option<&'a str>,
    pub search_path: Option<&'a str>,
    pub patterns: Option<&'a [u32]>,
}

impl Stamp {
    fn matches(&self, now: &Conditions<'_>) -> bool {
        self.rules == now.rules
            && self.catalog == now.catalog
            && self.role.as_deref() == now.role
            && self.search_path.as_deref() == now.search_path
            && self.patterns.as_deref() == now.patterns
    }
}

/// Above this many verdicts for one shape, the oldest goes (texts of one shape matching
/// different rules' patterns, or a session switching roles).
const MAX_PER_SHAPE: usize = 8;

struct Memo {
    /// Keeps the shape alive, so its address (the key) is not reused.
    _shape: Arc<Shape>,
    /// Each verdict with what it was drawn from and how long it holds, oldest first.
    kept: Vec<(Stamp, Instant, Verdict)>,
    /// Whether a function or operator the shape calls may write, as the catalog said: with
    /// its epoch then, and until when its facts hold ([`super::effects`]).
    calls: Option<(u64, Instant, bool)>,
}

/// The memo. Keyed by the statement's shape ([`Classified::shape_id`]), which every text of
/// the shape shares: the simple protocol's texts that differ only in literals are decided once
/// (a rule matching by `pattern` reads the literals: its stamp holds which patterns the text
/// matched, and a shape keeps a verdict for each of the last few such sets). What a text pins itself, its key values,
/// is not part of the verdict: where the verdict says the read is keyed, each execution's
/// values are read from its own text or parameters, and a text whose values cannot be read is
/// invalidated with its whole table ([`super::effects::pinned_keys`]).
#[derive(Default)]
pub struct Assessments {
    /// Boxed: a table's buckets are its entries' size, and a session with one shape has room
    /// for four (an idle session keeps this; see bench/idle.sh).
    entries: HashMap<usize, Box<Memo>>,
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

    /// The verdict for `c`, if one was kept under the same conditions and is still within the
    /// catalog's TTL — or of any age with `any_age` (while Postgres cannot be reached, the facts
    /// cannot be looked up again, nor changed).
    pub fn get(&self, c: &Classified, now: &Conditions<'_>, any_age: bool) -> Option<&Verdict> {
        let m = self.entries.get(&c.shape_id())?;
        let (_, until, verdict) = m.kept.iter().find(|(stamp, ..)| stamp.matches(now))?;
        (any_age || Instant::now() < *until).then_some(verdict)
    }

    /// Whether a function or operator `c` calls may write, if the catalog said so under
    /// epoch `catalog` and its facts still hold.
    pub fn calls_may_write(&self, c: &Classified, catalog: u64) -> Option<bool> {
        let (epoch, until, may_write) = self.entries.get(&c.shape_id())?.calls?;
        (epoch == catalog && Instant::now() < until).then_some(may_write)
    }

    /// Keeps what the catalog said of the functions and operators `c` calls (under epoch
    /// `catalog`, until `until`).
    pub fn keep_calls(&mut self, c: &Classified, catalog: u64, until: Instant, may_write: bool) {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&c.shape_id()) {
            self.entries.clear();
        }
        let m = self
            .entries
            .entry(c.shape_id())
            .or_insert_with(|| Box::new(Memo { _shape: c.shape().clone(), kept: Vec::new(), calls: None }));
        m.calls = Some((catalog, until, may_write));
    }

    /// Keeps `verdict` for `c` until `until`, unless it depends on a passing condition.
    pub fn keep(&mut self, c: &Classified, stamp: Stamp, until: Instant, verdict: &Verdict) {
        let passing = matches!(verdict, Verdict::NeedsSearchPath | Verdict::Forward(Reason::CatalogUnavailable(_)));
        if passing {
            return;
        }
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&c.shape_id()) {
            self.entries.clear();
        }
        let m = self
            .entries
            .entry(c.shape_id())
            .or_insert_with(|| Box::new(Memo { _shape: c.shape().clone(), kept: Vec::with_capacity(1), calls: None }));
        // A verdict drawn under conditions that no longer hold is never matched again.
        m.kept.retain(|(s, ..)| s != &stamp && s.rules == stamp.rules && s.catalog == stamp.catalog);
        if m.kept.len() >= MAX_PER_SHAPE {
            m.kept.remove(0);
        }
        m.kept.push((stamp, until, verdict.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stamp(rules: u64, path: &str) -> Stamp {
        Stamp { rules, catalog: 7, role: Some("app".into()), search_path: Some(path.into()), patterns: None }
    }

    fn now<'a>(rules: u64, catalog: u64, role: &'a str, search_path: &'a str) -> Conditions<'a> {
        Conditions { rules, catalog, role: Some(role), search_path: Some(search_path), patterns: None }
    }

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

    #[test]
    fn a_verdict_is_reused_only_under_the_same_conditions() {
        let statements = Arc::new(crate::query::classify::classify("SELECT 1"));
        let c = &statements[0];
        let mut m = Assessments::default();
        let later = Instant::now() + Duration::from_secs(60);
        m.keep(c, stamp(1, "public"), later, &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(1, 7, "app", "public"), false).is_some());
        assert!(m.get(c, &now(2, 7, "app", "public"), false).is_none(), "another rule set");
        assert!(m.get(c, &now(1, 8, "app", "public"), false).is_none(), "catalog facts forgotten");
        assert!(m.get(c, &now(1, 7, "other", "public"), false).is_none(), "another role");
        assert!(m.get(c, &now(1, 7, "app", "app, public"), false).is_none(), "another search_path");
        // Rules (version 2) that match patterns: a verdict per set of patterns matched, the
        // last few kept.
        let patterned = |matched: &[u32]| Stamp { patterns: Some(matched.into()), ..stamp(2, "public") };
        let texts = |matched: &'static [u32]| Conditions { patterns: Some(matched), ..now(2, 7, "app", "public") };
        m.keep(c, patterned(&[3]), later, &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &texts(&[]), false).is_none(), "a text matching other patterns");
        m.keep(c, patterned(&[]), later, &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &texts(&[]), false).is_some(), "a text matching the same patterns");
        assert!(m.get(c, &texts(&[3]), false).is_some(), "the other text's, still kept");
        m.keep(c, stamp(1, "public"), Instant::now(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(1, 7, "app", "public"), false).is_none(), "past the catalog's TTL");
        assert!(m.get(c, &now(1, 7, "app", "public"), true).is_some(), "of any age while offline");
    }

    #[test]
    fn texts_of_one_shape_share_a_verdict_but_not_their_keys() {
        let classifier = crate::query::Classifier::default();
        let one = classifier.classify("SELECT v FROM t WHERE id = 1");
        let two = classifier.classify("SELECT v FROM t WHERE id = 2");
        let other = classifier.classify("SELECT v FROM u WHERE id = 1");
        assert_ne!(one[0].point, two[0].point, "each text pins its own key");
        let mut m = Assessments::default();
        let later = Instant::now() + Duration::from_secs(60);
        m.keep(&one[0], stamp(1, "public"), later, &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(&two[0], &now(1, 7, "app", "public"), false).is_some(), "same shape");
        assert!(m.get(&other[0], &now(1, 7, "app", "public"), false).is_none(), "another shape");
    }

    #[test]
    fn what_the_catalog_said_of_calls_holds_while_its_facts_do() {
        let statements = Arc::new(crate::query::classify::classify("SELECT f(1)"));
        let c = &statements[0];
        let mut m = Assessments::default();
        assert_eq!(m.calls_may_write(c, 7), None);
        m.keep_calls(c, 7, Instant::now() + Duration::from_secs(60), true);
        assert_eq!(m.calls_may_write(c, 7), Some(true));
        assert_eq!(m.calls_may_write(c, 8), None, "catalog facts forgotten since");
        m.keep(c, stamp(1, "p"), Instant::now() + Duration::from_secs(60), &Verdict::Forward(Reason::NoMatch));
        assert_eq!(m.calls_may_write(c, 7), Some(true), "a verdict kept beside it");
        m.keep_calls(c, 7, Instant::now(), false);
        assert_eq!(m.calls_may_write(c, 7), None, "past the catalog's TTL");
    }

    #[test]
    fn passing_conditions_are_not_kept() {
        let statements = Arc::new(crate::query::classify::classify("SELECT 1"));
        let c = &statements[0];
        let mut m = Assessments::default();
        let later = Instant::now() + Duration::from_secs(60);
        m.keep(c, stamp(1, "p"), later, &Verdict::NeedsSearchPath);
        m.keep(c, stamp(1, "p"), later, &Verdict::Forward(Reason::CatalogUnavailable("down".into())));
        assert!(m.get(c, &now(1, 7, "app", "p"), false).is_none());
    }
}
