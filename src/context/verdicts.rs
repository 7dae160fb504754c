//! The verdicts of [`policy::assess`] (rule, statement, catalog facts) per statement shape,
//! kept for every session of one database and user ([`Book`]), so that a prepared statement
//! executed again — or a simple-protocol query of a shape seen before — costs a map look-up
//! instead of rule matching and catalog look-ups, and an idle session keeps none of it.
//!
//! A verdict is reused only while nothing it was drawn from can have changed: the same rule set
//! (its version), the same catalog facts (the catalog's epoch, which moves on DDL and
//! `INVALIDATE`; and no longer than `cache.catalog_ttl`, the facts' own lifetime), and the same
//! role and `search_path` (which resolve unqualified names), and — when a rule matches by
//! `pattern`, which reads literal values — the same patterns matched by the text (all of the
//! rule set's patterns are matched in one pass, [`crate::rules::RuleSet::pattern_matches`]).
//! The rest of what `assess` reads, the database and the user, is the book's: sessions of one
//! pool key share a book, and no other does. Verdicts that depend on a passing condition (the
//! catalog unreachable, the search path not yet known) are not kept.
//!
//! Shared rather than per session (as it once was): sessions of a pool decide the same
//! statements, and what a session kept cost an idle client in transaction pooling a third of
//! a kilobyte (`bench/idle.sh`). A book lives while a session of its pool does; the lock is
//! held for a look-up or an insert, never across an `await`.
//!
//! [`policy::assess`]: crate::policy::assess

use foldhash::HashMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use crate::backend::PoolKey;
use crate::policy::{Assessed, Assessment, Reason};
use crate::query::Classified;
use crate::query::classify::Shape;

/// Above this many shapes a book gives one up for each new one (sessions that generate SQL
/// endlessly).
const MAX_ENTRIES: usize = 2048;

/// Above this many verdicts for one shape, the oldest goes (texts of one shape matching
/// different rules' patterns, or sessions under different roles or search paths).
const MAX_PER_SHAPE: usize = 8;

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

/// Everything a verdict was drawn from, besides the statement and the book's pool key.
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

struct Memo {
    /// Keeps the shape alive, so its address (the key) is not reused.
    _shape: Arc<Shape>,
    /// Each verdict with what it was drawn from and how long it holds, oldest first.
    kept: Vec<(Stamp, Instant, Verdict)>,
    /// Whether a function or operator the shape calls may write, as the catalog said: with
    /// its epoch then, and until when its facts hold (`session::effects`).
    calls: Option<(u64, Instant, bool)>,
}

/// The verdicts of one pool key's sessions. Keyed by the statement's shape
/// ([`Classified::shape_id`]), which every text of the shape shares: the simple protocol's
/// texts that differ only in literals are decided once (a rule matching by `pattern` reads the
/// literals: its stamp holds which patterns the text matched, and a shape keeps a verdict for
/// each of the last few such sets). What a text pins itself, its key values, is not part of
/// the verdict: where the verdict says the read is keyed, each execution's values are read
/// from its own text or parameters.
#[derive(Default)]
pub struct Book {
    entries: Mutex<HashMap<usize, Memo>>,
}

impl Book {
    /// The verdict for `c`, if one was kept under the same conditions and is still within the
    /// catalog's TTL — or of any age with `any_age` (while Postgres cannot be reached, the facts
    /// cannot be looked up again, nor changed).
    pub fn get(&self, c: &Classified, now: &Conditions<'_>, any_age: bool) -> Option<Verdict> {
        let entries = self.entries.lock();
        let m = entries.get(&c.shape_id())?;
        let (_, until, verdict) = m.kept.iter().find(|(stamp, ..)| stamp.matches(now))?;
        (any_age || Instant::now() < *until).then(|| verdict.clone())
    }

    /// Whether a function or operator `c` calls may write, if the catalog said so under
    /// epoch `catalog` and its facts still hold.
    pub fn calls_may_write(&self, c: &Classified, catalog: u64) -> Option<bool> {
        let (epoch, until, may_write) = self.entries.lock().get(&c.shape_id())?.calls?;
        (epoch == catalog && Instant::now() < until).then_some(may_write)
    }

    /// Keeps what the catalog said of the functions and operators `c` calls (under epoch
    /// `catalog`, until `until`).
    pub fn keep_calls(&self, c: &Classified, catalog: u64, until: Instant, may_write: bool) {
        let mut entries = self.entries.lock();
        memo(&mut entries, c).calls = Some((catalog, until, may_write));
    }

    /// Keeps `verdict` for `c` until `until`, unless it depends on a passing condition.
    pub fn keep(&self, c: &Classified, stamp: Stamp, until: Instant, verdict: &Verdict) {
        let passing = matches!(verdict, Verdict::NeedsSearchPath | Verdict::Forward(Reason::CatalogUnavailable(_)));
        if passing {
            return;
        }
        let mut entries = self.entries.lock();
        let m = memo(&mut entries, c);
        // Drawn under catalog facts older than a verdict of the same rule set kept meanwhile (a
        // slow look-up): it would never be matched again, nor should it push that one out.
        // (Rule set versions are not compared so: concurrent reloads may store them out of
        // order, and the verdicts of the set in force must be kept whatever its number.)
        if m.kept.iter().any(|(s, ..)| s.rules == stamp.rules && s.catalog > stamp.catalog) {
            return;
        }
        // A verdict drawn under conditions that no longer hold is never matched again.
        m.kept.retain(|(s, ..)| s != &stamp && s.rules == stamp.rules && s.catalog == stamp.catalog);
        if m.kept.len() >= MAX_PER_SHAPE {
            m.kept.remove(0);
        }
        m.kept.push((stamp, until, verdict.clone()));
    }

    /// How many shapes the book holds.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `c`'s memo in `entries`, made if missing (in place of another shape's when the book is
/// full: a session generating endless new SQL costs the others of its pool a look-up now and
/// then, not every verdict at once).
fn memo<'a>(entries: &'a mut HashMap<usize, Memo>, c: &Classified) -> &'a mut Memo {
    if entries.len() >= MAX_ENTRIES
        && !entries.contains_key(&c.shape_id())
        && let Some(&other) = entries.keys().next()
    {
        entries.remove(&other);
    }
    entries.entry(c.shape_id()).or_insert_with(|| Memo { _shape: c.shape().clone(), kept: Vec::new(), calls: None })
}

/// The books of the pool keys that have sessions. A book is dropped with its pool's last
/// session (the map holds it weakly), so log-ins under ever new names keep nothing.
#[derive(Default)]
pub struct Verdicts {
    books: Mutex<Books>,
}

#[derive(Default)]
struct Books {
    by_key: HashMap<PoolKey, Weak<Book>>,
    /// Sweep dead references when the map reaches this size.
    sweep_at: usize,
}

impl Verdicts {
    /// The book of `key`'s sessions.
    pub fn book(&self, key: &PoolKey) -> Arc<Book> {
        let mut books = self.books.lock();
        if let Some(book) = books.by_key.get(key).and_then(Weak::upgrade) {
            return book;
        }
        let book = Arc::new(Book::default());
        books.by_key.insert(key.clone(), Arc::downgrade(&book));
        if books.by_key.len() >= books.sweep_at {
            books.by_key.retain(|_, b| b.strong_count() > 0);
            books.by_key.shrink_to_fit();
            books.sweep_at = (books.by_key.len() * 2).max(64);
        }
        book
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

    fn key(user: &str) -> PoolKey {
        PoolKey { database: "db".into(), user: user.into() }
    }

    /// The classification of `sql`, one statement (`[0]`), outside any classifier's cache.
    fn statement(sql: &str) -> Arc<Vec<Classified>> {
        Arc::new(crate::query::classify::classify(sql))
    }

    /// A minute from now: a verdict kept until then holds through the test.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_verdict_is_reused_only_under_the_same_conditions() {
        let statements = statement("SELECT 1");
        let c = &statements[0];
        let m = Book::default();
        m.keep(c, stamp(1, "public"), later(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(1, 7, "app", "public"), false).is_some());
        assert!(m.get(c, &now(2, 7, "app", "public"), false).is_none(), "another rule set");
        assert!(m.get(c, &now(1, 8, "app", "public"), false).is_none(), "catalog facts forgotten");
        assert!(m.get(c, &now(1, 7, "other", "public"), false).is_none(), "another role");
        assert!(m.get(c, &now(1, 7, "app", "app, public"), false).is_none(), "another search_path");
        // Rules (version 2) that match patterns: a verdict per set of patterns matched, the
        // last few kept.
        let patterned = |matched: &[u32]| Stamp { patterns: Some(matched.into()), ..stamp(2, "public") };
        let texts = |matched: &'static [u32]| Conditions { patterns: Some(matched), ..now(2, 7, "app", "public") };
        m.keep(c, patterned(&[3]), later(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &texts(&[]), false).is_none(), "a text matching other patterns");
        m.keep(c, patterned(&[]), later(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &texts(&[]), false).is_some(), "a text matching the same patterns");
        assert!(m.get(c, &texts(&[3]), false).is_some(), "the other text's, still kept");
        m.keep(c, stamp(3, "public"), Instant::now(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(c, &now(3, 7, "app", "public"), false).is_none(), "past the catalog's TTL");
        assert!(m.get(c, &now(3, 7, "app", "public"), true).is_some(), "of any age while offline");
    }

    #[test]
    fn texts_of_one_shape_share_a_verdict_but_not_their_keys() {
        let classifier = crate::query::Classifier::default();
        let one = classifier.classify("SELECT v FROM t WHERE id = 1");
        let two = classifier.classify("SELECT v FROM t WHERE id = 2");
        let other = classifier.classify("SELECT v FROM u WHERE id = 1");
        assert_ne!(one[0].point, two[0].point, "each text pins its own key");
        let m = Book::default();
        m.keep(&one[0], stamp(1, "public"), later(), &Verdict::Forward(Reason::NoMatch));
        assert!(m.get(&two[0], &now(1, 7, "app", "public"), false).is_some(), "same shape");
        assert!(m.get(&other[0], &now(1, 7, "app", "public"), false).is_none(), "another shape");
    }

    #[test]
    fn what_the_catalog_said_of_calls_holds_while_its_facts_do() {
        let statements = statement("SELECT f(1)");
        let c = &statements[0];
        let m = Book::default();
        assert_eq!(m.calls_may_write(c, 7), None);
        m.keep_calls(c, 7, later(), true);
        assert_eq!(m.calls_may_write(c, 7), Some(true));
        assert_eq!(m.calls_may_write(c, 8), None, "catalog facts forgotten since");
        m.keep(c, stamp(1, "p"), later(), &Verdict::Forward(Reason::NoMatch));
        assert_eq!(m.calls_may_write(c, 7), Some(true), "a verdict kept beside it");
        m.keep_calls(c, 7, Instant::now(), false);
        assert_eq!(m.calls_may_write(c, 7), None, "past the catalog's TTL");
    }

    #[test]
    fn a_verdict_drawn_under_older_facts_does_not_replace_a_newer_one() {
        let statements = statement("SELECT 1");
        let c = &statements[0];
        let m = Book::default();
        let at = |catalog| Stamp { catalog, ..stamp(1, "p") };
        m.keep(c, at(8), later(), &Verdict::Forward(Reason::NoMatch));
        m.keep(c, at(7), later(), &Verdict::Forward(Reason::NoRules));
        assert!(m.get(c, &now(1, 8, "app", "p"), false).is_some(), "the newer one kept");
        assert!(m.get(c, &now(1, 7, "app", "p"), false).is_none());
    }

    #[test]
    fn a_full_book_gives_up_one_shape_for_a_new_one() {
        let classifier = crate::query::Classifier::default();
        let m = Book::default();
        let shapes: Vec<_> =
            (0..MAX_ENTRIES + 1).map(|i| classifier.classify(&format!("SELECT c{i} FROM t"))).collect();
        for s in &shapes {
            m.keep(&s[0], stamp(1, "p"), later(), &Verdict::Forward(Reason::NoMatch));
        }
        assert_eq!(m.len(), MAX_ENTRIES);
        let kept = shapes.iter().filter(|s| m.get(&s[0], &now(1, 7, "app", "p"), false).is_some()).count();
        assert_eq!(kept, MAX_ENTRIES);
    }

    #[test]
    fn passing_conditions_are_not_kept() {
        let statements = statement("SELECT 1");
        let c = &statements[0];
        let m = Book::default();
        m.keep(c, stamp(1, "p"), later(), &Verdict::NeedsSearchPath);
        m.keep(c, stamp(1, "p"), later(), &Verdict::Forward(Reason::CatalogUnavailable("down".into())));
        assert!(m.get(c, &now(1, 7, "app", "p"), false).is_none());
    }

    #[test]
    fn sessions_of_one_pool_key_share_a_book_and_no_other_does() {
        let statements = statement("SELECT 1");
        let c = &statements[0];
        let verdicts = Verdicts::default();
        let (a, b, other) = (verdicts.book(&key("app")), verdicts.book(&key("app")), verdicts.book(&key("other")));
        assert!(Arc::ptr_eq(&a, &b));
        a.keep(c, stamp(1, "p"), later(), &Verdict::Forward(Reason::NoMatch));
        assert!(b.get(c, &now(1, 7, "app", "p"), false).is_some(), "another session of the pool");
        assert!(other.get(c, &now(1, 7, "app", "p"), false).is_none(), "another user's sessions");
        drop((a, b));
        assert!(verdicts.book(&key("app")).is_empty(), "a pool's last session gone, its book goes");
        // Log-ins under ever new names leave nothing behind.
        for i in 0..1000 {
            verdicts.book(&key(&format!("u{i}")));
        }
        assert!(verdicts.books.lock().by_key.len() < 200);
    }
}
