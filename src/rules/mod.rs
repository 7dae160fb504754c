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
    /// A `cache` rule with this TTL that matches nothing by itself and keeps every default
    /// (for building rule sets in code, as the tests do).
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
    fn matches(&self, s: &Subject<'_>) -> bool {
        if self.database.as_deref().is_some_and(|d| d != s.database)
            || self.user.as_deref().is_some_and(|u| u != s.user)
        {
            return false;
        }
        if self.query.as_ref().is_some_and(|(_, fp)| *fp != s.statement.fingerprint) {
            return false;
        }
        if self.pattern.as_ref().is_some_and(|p| !p.is_match(s.sql)) {
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
        true
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
}

impl RuleSet {
    /// The first rule matching the statement, if any.
    pub fn decide(&self, s: &Subject<'_>) -> Option<Arc<Rule>> {
        self.rules.iter().find(|r| r.matcher.matches(s)).cloned()
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
    format!("{} ({}:{}): {} -> {}", r.name, r.file.display(), r.line, r.matcher.describe(), action)
}
