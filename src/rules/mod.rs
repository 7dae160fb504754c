//! Rules: which SELECTs are cached, for how long, and which never are.
//!
//! Rule files are TOML files in one directory, loaded in file-name order; the first rule that
//! matches a statement decides ([`RuleSet::decide`]). Loading validates everything and reports
//! errors with file, line, rule and field ([`load`]). The loaded set is swapped atomically on
//! reload; a statement keeps the rule set it started with ([`reload`]).
//!
//! Owns the rule files and the rule set in force. May use `query` (fingerprints, relations) and
//! below; does not decide cacheability alone — [`crate::policy`] does.

pub mod load;
pub mod reload;
pub mod usage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::query::{Classified, Relation};

pub use load::{LoadError, load_dir};
pub use reload::Rules;

/// What a rule does with the statements it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Cache,
    Bypass,
}

/// Where the reads a rule matches may run, with replicas configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Route {
    /// A replica that shows what the read must see, or the primary (default).
    #[default]
    Any,
    /// Always the primary.
    Primary,
}

/// One validated rule.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    pub action: Action,
    pub ttl: Duration,
    pub max_entry_bytes: Option<u64>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub share_across_roles: bool,
    pub allow_stable_functions: bool,
    /// Cache reads of tables with row-level security. Their entries are always keyed by role
    /// (whatever `share_across_roles` says) and by every setting, custom ones included.
    pub allow_row_security: bool,
    /// Where the reads it matches run (`route`), whatever rule decides their caching.
    pub route: Route,
    /// Its recent hits and misses (for admission).
    pub usage: usage::Usage,
    pub matcher: Matcher,
    /// Its metrics, registered on first use with the server's recorder.
    pub counters: std::sync::OnceLock<crate::metrics::RuleCounters>,
}

impl Rule {
    /// How long an entry of this rule may be kept at all: its TTL and the longer of its stale
    /// windows (the shared L2 keeps entries this long).
    pub fn l2_ttl(&self) -> std::time::Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

impl Rule {
    /// A `cache` rule with this TTL and every default, whose matcher has no condition and so
    /// matches every statement (for building rule sets in code: the tests, the advisor's
    /// candidate rule).
    pub fn cache(name: &str, ttl: Duration) -> Rule {
        Rule {
            name: name.to_owned(),
            file: PathBuf::new(),
            line: 0,
            action: Action::Cache,
            ttl,
            max_entry_bytes: None,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            share_across_roles: false,
            allow_stable_functions: false,
            allow_row_security: false,
            route: Route::Any,
            usage: Default::default(),
            matcher: Matcher::default(),
            counters: Default::default(),
        }
    }
}

/// The conditions of a rule; all that are given must hold.
#[derive(Debug, Default)]
pub struct Matcher {
    /// The statement reads only these relations (`schema.name`, or a bare name for any
    /// schema), and at least one of them.
    pub tables: Option<Vec<Relation>>,
    /// The statement has this shape (pg_query fingerprint of the rule's query).
    pub query: Option<(String, u64)>,
    pub pattern: Option<regex::Regex>,
    pub database: Option<String>,
    pub user: Option<String>,
}

/// What the session needs to know to match a statement.
pub struct Subject<'a> {
    pub sql: &'a str,
    pub statement: &'a Classified,
    /// Each read relation with its schema resolved where known (through the session's
    /// `search_path` and the catalog).
    pub resolved_reads: &'a [Relation],
    pub database: &'a str,
    pub user: &'a str,
}

impl Matcher {
    /// Whether every condition holds; `pattern`: whether the rule's pattern matches the text
    /// (asked last, only when the rule has one and its other conditions hold).
    fn matches(&self, s: &Subject<'_>, pattern: impl FnOnce() -> bool) -> bool {
        if !self.in_scope(s) {
            return false;
        }
        if let Some(tables) = &self.tables {
            let covered = |read: &Relation| {
                tables.iter().any(|t| t.name == read.name && (t.schema.is_none() || t.schema == read.schema))
            };
            if s.resolved_reads.is_empty() || !s.resolved_reads.iter().all(covered) {
                return false;
            }
        }
        self.pattern.is_none() || pattern()
    }

    /// Whether the statement touches what the rule names, for routing: its conditions as in
    /// [`Matcher::matches`], except that reading *any* listed table is enough (a join or a
    /// view over it too, when `s.resolved_reads` holds what views read), and a read whose
    /// schema is not known matches a listed table of any schema.
    fn touches(&self, s: &Subject<'_>) -> bool {
        if !self.in_scope(s) {
            return false;
        }
        if let Some(tables) = &self.tables {
            let listed = |read: &Relation| {
                tables.iter().any(|t| {
                    t.name == read.name && (t.schema.is_none() || read.schema.is_none() || t.schema == read.schema)
                })
            };
            if !s.resolved_reads.iter().any(listed) {
                return false;
            }
        }
        self.pattern.as_ref().is_none_or(|p| p.is_match(s.sql))
    }

    /// The database, user and query shape conditions, which matching and routing share.
    fn in_scope(&self, s: &Subject<'_>) -> bool {
        self.database.as_deref().is_none_or(|d| d == s.database)
            && self.user.as_deref().is_none_or(|u| u == s.user)
            && self.query.as_ref().is_none_or(|(_, fp)| *fp == s.statement.fingerprint)
    }

    /// What it matches, as `key=value` words.
    pub fn describe(&self) -> String {
        let mut m = Vec::new();
        if let Some(t) = &self.tables {
            m.push(format!("tables={}", t.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")));
        }
        if let Some((q, _)) = &self.query {
            m.push(format!("query={q:?}"));
        }
        if let Some(p) = &self.pattern {
            m.push(format!("pattern={:?}", p.as_str()));
        }
        if let Some(d) = &self.database {
            m.push(format!("database={d}"));
        }
        if let Some(u) = &self.user {
            m.push(format!("user={u}"));
        }
        m.join(" ")
    }
}

/// Rules in order, as loaded from one directory.
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Arc<Rule>>,
    /// Incremented on every successful load: decisions cached under another version are stale.
    pub version: u64,
    /// Every rule's `pattern` in one automaton, matched in one pass over a text.
    patterns: Option<Patterns>,
    /// Some rule matches by `pattern`.
    has_patterns: bool,
    /// Some rule says `route = "primary"`.
    has_primary_routes: bool,
}

/// The rules' patterns as one `RegexSet`: however many rules match by pattern, a text is read
/// once, and which of them match is known at once — and remembered for the text, so a text
/// that comes again (a hot key in the simple protocol, a prepared statement) is not read again.
struct Patterns {
    set: regex::RegexSet,
    /// For each rule, its pattern's index in the set.
    of_rule: Vec<Option<usize>>,
    by_text: quick_cache::sync::Cache<Box<str>, PatternMatches>,
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patterns").field("set", &self.set).field("texts", &self.by_text.len()).finish()
    }
}

/// Texts whose pattern matches are remembered (per rule set), and the longest remembered.
const REMEMBERED_TEXTS: usize = 4096;
const REMEMBERED_TEXT_BYTES: usize = 2048;

/// Which of a rule set's patterns a text matches (indexes into its pattern set): all that
/// depends on the text in a rule decision, for one statement shape.
pub type PatternMatches = Arc<[u32]>;

impl RuleSet {
    pub fn new(rules: Vec<Arc<Rule>>, version: u64) -> RuleSet {
        let sources: Vec<&str> = rules.iter().filter_map(|r| r.matcher.pattern.as_ref().map(|p| p.as_str())).collect();
        let patterns = if sources.is_empty() {
            None
        } else {
            // Each pattern compiled alone already; together they may pass the size limit, and
            // then each is matched on its own.
            let set = regex::RegexSet::new(&sources)
                .inspect_err(|e| tracing::warn!(error = %e, "the rules' patterns do not fit one automaton: each is matched on its own"))
                .ok();
            set.map(|set| {
                let mut next = 0;
                let of_rule = rules
                    .iter()
                    .map(|r| {
                        r.matcher.pattern.as_ref().map(|_| {
                            next += 1;
                            next - 1
                        })
                    })
                    .collect();
                Patterns { set, of_rule, by_text: quick_cache::sync::Cache::new(REMEMBERED_TEXTS) }
            })
        };
        let has_patterns = !sources.is_empty();
        let has_primary_routes = rules.iter().any(|r| r.route == Route::Primary);
        RuleSet { rules, version, patterns, has_patterns, has_primary_routes }
    }

    /// Whether some rule matches by `pattern` (decisions then depend on the text).
    pub fn has_patterns(&self) -> bool {
        self.has_patterns
    }

    /// Which patterns `sql` matches, when some rule has one: two texts of one shape with the
    /// same matches are decided alike.
    pub fn pattern_matches(&self, sql: &str) -> Option<PatternMatches> {
        if let Some(p) = &self.patterns {
            if let Some(m) = p.by_text.get(sql) {
                return Some(m);
            }
            let m: PatternMatches = p.set.matches(sql).iter().map(|i| i as u32).collect();
            if sql.len() <= REMEMBERED_TEXT_BYTES {
                p.by_text.insert(sql.into(), m.clone());
            }
            return Some(m);
        }
        self.has_patterns().then(|| {
            let patterns = self.rules.iter().filter_map(|r| r.matcher.pattern.as_ref());
            patterns.enumerate().filter(|(_, p)| p.is_match(sql)).map(|(i, _)| i as u32).collect()
        })
    }

    /// The first rule matching the statement, if any. The patterns are matched in one pass,
    /// and only if a rule with one matches otherwise.
    pub fn decide(&self, s: &Subject<'_>) -> Option<Arc<Rule>> {
        let mut matched: Option<regex::SetMatches> = None;
        self.rules
            .iter()
            .enumerate()
            .find(|(i, r)| {
                r.matcher.matches(s, || match &self.patterns {
                    Some(p) => {
                        let at = p.of_rule[*i].expect("a rule with a pattern has its place in the set");
                        matched.get_or_insert_with(|| p.set.matches(s.sql)).matched(at)
                    }
                    None => r.matcher.pattern.as_ref().is_some_and(|p| p.is_match(s.sql)),
                })
            })
            .map(|(_, r)| r.clone())
    }

    /// Some rule says `route = "primary"`.
    pub fn has_primary_routes(&self) -> bool {
        self.has_primary_routes
    }

    /// Whether some `route = "primary"` rule touches the statement ([`Matcher::touches`]):
    /// such a read stays on the primary whichever rule decides its caching.
    pub fn routes_to_primary(&self, s: &Subject<'_>) -> bool {
        self.has_primary_routes && self.rules.iter().any(|r| r.route == Route::Primary && r.matcher.touches(s))
    }

    /// Whether matching needs relations resolved to their schemas (some rule lists a
    /// schema-qualified table); otherwise names as written are enough.
    pub fn needs_resolution(&self) -> bool {
        self.rules.iter().any(|r| r.matcher.tables.as_ref().is_some_and(|t| t.iter().any(|t| t.schema.is_some())))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Rule>> {
        self.rules.iter().find(|r| r.name == name)
    }
}

/// One line describing a rule: where it is, what it matches, what it does.
pub fn describe(r: &Rule) -> String {
    let action = match r.action {
        Action::Bypass => "bypass".to_owned(),
        Action::Cache => {
            let mut a = format!("cache ttl={}", humantime::format_duration(r.ttl));
            if !r.stale_while_revalidate.is_zero() {
                a += &format!(" stale_while_revalidate={}", humantime::format_duration(r.stale_while_revalidate));
            }
            if !r.stale_if_error.is_zero() {
                a += &format!(" stale_if_error={}", humantime::format_duration(r.stale_if_error));
            }
            if let Some(b) = r.max_entry_bytes {
                a += &format!(" max_entry_bytes={b}");
            }
            if r.share_across_roles {
                a += " share_across_roles";
            }
            if r.allow_stable_functions {
                a += " allow_stable_functions";
            }
            if r.allow_row_security {
                a += " allow_row_security";
            }
            a
        }
    };
    let route = if r.route == Route::Primary { " route=primary" } else { "" };
    format!("{} ({}:{}): {} -> {action}{route}", r.name, r.file.display(), r.line, r.matcher.describe())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, pattern: Option<&str>, tables: Option<&[&str]>) -> Arc<Rule> {
        let mut r = Rule::cache(name, Duration::from_secs(60));
        r.matcher.pattern = pattern.map(|p| regex::Regex::new(p).unwrap());
        r.matcher.tables = tables.map(|t| t.iter().map(|n| Relation { schema: None, name: (*n).into() }).collect());
        Arc::new(r)
    }

    /// The rule `set` decides for `sql` (reading table `t`).
    fn decided(set: &RuleSet, sql: &str) -> Option<String> {
        let statements = crate::query::classify::classify(sql);
        let reads = [Relation { schema: None, name: "t".into() }];
        let s = Subject { sql, statement: &statements[0], resolved_reads: &reads, database: "d", user: "u" };
        set.decide(&s).map(|r| r.name.clone())
    }

    #[test]
    fn many_patterns_are_matched_in_one_pass_and_the_first_matching_rule_decides() {
        let mut rules: Vec<Arc<Rule>> =
            (0..1000).map(|i| rule(&format!("p{i}"), Some(&format!(r"\bid = {i}\b")), None)).collect();
        rules.insert(500, rule("bypass-t", Some(r"(?i)\bfrom t\b"), Some(&["u"])));
        rules.push(rule("table", None, Some(&["t"])));
        let set = RuleSet::new(rules, 1);
        assert!(set.patterns.is_some(), "one automaton for the thousand patterns");
        assert_eq!(decided(&set, "SELECT * FROM t WHERE id = 7").as_deref(), Some("p7"));
        assert_eq!(decided(&set, "SELECT * FROM t WHERE id = 999").as_deref(), Some("p999"));
        // A pattern that matches, on a rule whose tables do not: not that rule.
        assert_eq!(decided(&set, "SELECT * FROM t WHERE id = 1000").as_deref(), Some("table"));
        assert_eq!(set.pattern_matches("SELECT * FROM t WHERE id = 7").as_deref(), Some(&[7, 500][..]));
        assert_eq!(set.pattern_matches("SELECT * FROM t WHERE id = 7").as_deref(), Some(&[7, 500][..]), "remembered");
        assert_eq!(set.pattern_matches("SELECT 1").as_deref(), Some(&[][..]));
        let plain = RuleSet::new(vec![rule("table", None, Some(&["t"]))], 1);
        assert_eq!(plain.pattern_matches("SELECT 1"), None, "no patterns: decisions do not read the text");
    }

    #[test]
    fn a_primary_route_holds_whatever_rule_decides_and_whatever_schema_a_name_resolves_to() {
        let mut pinned = Rule::cache("pinned", Duration::from_secs(60));
        pinned.route = Route::Primary;
        pinned.matcher.tables = Some(vec![Relation::new(Some("app"), "t")]);
        let set = RuleSet::new(vec![rule("first", None, Some(&["t"])), Arc::new(pinned)], 1);
        let routed = |sql: &str| {
            let statements = crate::query::classify::classify(sql);
            let c = &statements[0];
            set.routes_to_primary(&Subject { sql, statement: c, resolved_reads: &c.reads, database: "d", user: "u" })
        };
        assert_eq!(decided(&set, "SELECT * FROM t").as_deref(), Some("first"), "another rule decides caching");
        assert!(routed("SELECT * FROM t"), "unqualified: may be app.t");
        assert!(routed("SELECT * FROM app.t"));
        assert!(!routed("SELECT * FROM other.t"));
        assert!(!routed("SELECT * FROM u"));
        assert!(routed("SELECT * FROM u JOIN app.t USING (id)"), "any listed table is enough");
        let none = RuleSet::new(vec![rule("first", None, Some(&["t"]))], 1);
        let c = &crate::query::classify::classify("SELECT * FROM t")[0];
        let s = Subject { sql: "SELECT * FROM t", statement: c, resolved_reads: &c.reads, database: "d", user: "u" };
        assert!(!none.routes_to_primary(&s));
    }
}
