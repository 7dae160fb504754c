//! Loading and validating rule files. Every problem is a [`Problem`] naming the file, the line,
//! the rule and the field as far as known, e.g. `rules/10-app.toml:12: rule "profile": ttl:
//! must be greater than zero`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::query::Relation;
use crate::query::classify::{Kind, classify};

use super::{Action, Matcher, Rule, RuleSet};

/// Everything wrong with a rule directory, one problem per line when displayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n"))]
pub struct LoadError {
    pub problems: Vec<Problem>,
}

/// One problem: where it is (file, line, rule, field, as far as known) and what it is.
/// Displayed as `file:line: rule "name": field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub rule: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    fn in_file(file: &Path, message: String) -> Problem {
        Problem { file: file.to_path_buf(), line: None, rule: None, field: None, message }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ": rule {rule:?}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(rename = "match")]
    matcher: RawMatch,
    action: Option<String>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    max_entry_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    stale_while_revalidate: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stale_if_error: Option<Duration>,
    share_across_roles: Option<bool>,
    allow_stable_functions: Option<bool>,
    allow_row_security: Option<bool>,
    route: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    tables: Option<Vec<String>>,
    query: Option<String>,
    pattern: Option<String>,
    database: Option<String>,
    user: Option<String>,
}

/// Loads every `*.toml` file in `dir`, in file-name order.
pub fn load_dir(dir: &Path, version: u64) -> Result<RuleSet, LoadError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LoadError { problems: vec![Problem::in_file(dir, format!("cannot read rule directory: {e}"))] })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    let mut errors = Vec::new();
    let mut rules: Vec<Arc<Rule>> = Vec::new();
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(text) => load_file(&path, &text, &mut rules, &mut errors),
            Err(e) => errors.push(Problem::in_file(&path, format!("cannot read: {e}"))),
        }
    }
    if errors.is_empty() { Ok(RuleSet::new(rules, version)) } else { Err(LoadError { problems: errors }) }
}

fn load_file(path: &Path, text: &str, rules: &mut Vec<Arc<Rule>>, errors: &mut Vec<Problem>) {
    let file: File = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            // Name the key on the offending line, as validation errors do.
            let key = text.lines().nth(line.saturating_sub(1)).and_then(|l| l.split_once('=')).map(|(k, _)| k.trim());
            let field = key.filter(|k| !k.is_empty() && !k.starts_with('[')).map(str::to_owned);
            let mut message = e.message().trim().to_owned();
            if message.ends_with("expected a duration") {
                message += " (write e.g. \"5s\", \"250ms\", \"10m\")";
            }
            errors.push(Problem { file: path.to_path_buf(), line: Some(line), rule: None, field, message });
            return;
        }
    };
    for spanned in file.rule {
        let line = line_of(text, spanned.span().start);
        let raw = spanned.into_inner();
        let name = raw.name.clone();
        let problem = |field: &str, message| Problem {
            file: path.to_path_buf(),
            line: Some(line),
            rule: Some(name.clone()),
            field: Some(field.to_owned()),
            message,
        };
        match validate(raw, path, line) {
            Ok(rule) => {
                if let Some(other) = rules.iter().find(|r| r.name == rule.name) {
                    errors.push(problem("name", format!("also used at {}:{}", other.file.display(), other.line)));
                } else {
                    rules.push(Arc::new(rule));
                }
            }
            Err((field, message)) => errors.push(problem(field, message)),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A field that failed validation, and why.
pub type FieldError = (&'static str, String);

fn validate(raw: RawRule, path: &Path, line: usize) -> Result<Rule, FieldError> {
    if raw.name.trim().is_empty() {
        return Err(("name", "must not be empty".into()));
    }
    let action = match raw.action.as_deref() {
        None | Some("cache") => Action::Cache,
        Some("bypass") => Action::Bypass,
        Some(other) => return Err(("action", format!("{other:?} (expected \"cache\" or \"bypass\")"))),
    };
    let m = raw.matcher;
    if m.tables.is_none() && m.query.is_none() && m.pattern.is_none() {
        return Err(("match", "empty: give tables, query or pattern".into()));
    }
    let tables = match m.tables {
        Some(t) if t.is_empty() => return Err(("match.tables", "empty list".into())),
        Some(t) => Some(t.iter().map(|s| parse_table(s)).collect::<Result<Vec<_>, _>>()?),
        None => None,
    };
    let query = match m.query {
        Some(q) => {
            let parsed = classify(&q);
            if parsed.len() != 1 || parsed[0].kind != Kind::Select {
                return Err(("match.query", format!("{q:?} is not a single SELECT")));
            }
            let fp = parsed[0].fingerprint;
            Some((q, fp))
        }
        None => None,
    };
    let pattern = match m.pattern {
        Some(p) => Some(regex::Regex::new(&p).map_err(|e| ("match.pattern", e.to_string()))?),
        None => None,
    };
    let ttl = match (action, raw.ttl) {
        (Action::Cache, Some(t)) if t.is_zero() => return Err(("ttl", "must be greater than zero".into())),
        (Action::Cache, Some(t)) => t,
        (Action::Cache, None) => return Err(("ttl", "required for action = \"cache\"".into())),
        (Action::Bypass, None) => Duration::ZERO,
        (Action::Bypass, Some(_)) => return Err(("ttl", "has no effect with action = \"bypass\"".into())),
    };
    if action == Action::Bypass
        && (raw.max_entry_bytes.is_some()
            || raw.stale_while_revalidate.is_some()
            || raw.stale_if_error.is_some()
            || raw.share_across_roles.is_some()
            || raw.allow_stable_functions.is_some()
            || raw.allow_row_security.is_some())
    {
        return Err(("action", "cache settings have no effect with action = \"bypass\"".into()));
    }
    let route = match raw.route.as_deref() {
        None | Some("any") => super::Route::Any,
        Some("primary") => super::Route::Primary,
        Some(other) => return Err(("route", format!("{other:?} (expected \"any\" or \"primary\")"))),
    };
    if raw.max_entry_bytes == Some(0) {
        return Err(("max_entry_bytes", "must be greater than zero".into()));
    }
    Ok(Rule {
        name: raw.name,
        file: path.to_owned(),
        line,
        action,
        ttl,
        max_entry_bytes: raw.max_entry_bytes,
        stale_while_revalidate: raw.stale_while_revalidate.unwrap_or_default(),
        stale_if_error: raw.stale_if_error.unwrap_or_default(),
        share_across_roles: raw.share_across_roles.unwrap_or(false),
        allow_stable_functions: raw.allow_stable_functions.unwrap_or(false),
        allow_row_security: raw.allow_row_security.unwrap_or(false),
        route,
        usage: Default::default(),
        matcher: Matcher { tables, query, pattern, database: m.database, user: m.user },
        counters: Default::default(),
    })
}

/// `name` or `schema.name`, unquoted identifiers folded to lower case as Postgres does;
/// `"Quoted"` parts kept as written.
pub fn parse_table(s: &str) -> Result<Relation, FieldError> {
    let parts = split_ident(s).ok_or_else(|| ("match.tables", format!("{s:?} is not a table name")))?;
    match parts.as_slice() {
        [name] => Ok(Relation::new(None, name)),
        [schema, name] => Ok(Relation::new(Some(schema), name)),
        _ => Err(("match.tables", format!("{s:?}: expected name or schema.name"))),
    }
}

fn split_ident(s: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut part = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next()? {
                    '"' if chars.next_if_eq(&'"').is_some() => part.push('"'),
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != '.') {
                part.push(c.to_ascii_lowercase());
            }
            if part.is_empty() || part.contains(char::is_whitespace) {
                return None;
            }
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<RuleSet, LoadError> {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        load_dir(dir.path(), 1)
    }

    #[test]
    fn loads_in_file_name_order() {
        let set = load(&[
            ("20-b.toml", "[[rule]]\nname = \"b\"\nmatch = { tables = [\"t\"] }\nttl = \"5s\"\n"),
            ("10-a.toml", "[[rule]]\nname = \"a\"\nmatch = { pattern = \"(?i)from t\" }\nttl = \"1m\"\nstale_while_revalidate = \"30s\"\n"),
            ("notes.txt", "ignored"),
        ])
        .expect("valid");
        let names: Vec<&str> = set.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(set.rules[0].ttl, Duration::from_secs(60));
        assert_eq!(set.rules[0].stale_while_revalidate, Duration::from_secs(30));
    }

    #[test]
    fn errors_name_file_line_rule_and_field() {
        let cases = [
            ("[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\nttl = \"5 parsecs\"\n", "ttl"),
            ("[[rule]]\nname = \"x\"\nmatch = {}\nttl = \"5s\"\n", "match: empty"),
            ("[[rule]]\nname = \"x\"\nmatch = { pattern = \"(unclosed\" }\nttl = \"5s\"\n", "match.pattern"),
            ("[[rule]]\nname = \"x\"\nmatch = { query = \"DELETE FROM t\" }\nttl = \"5s\"\n", "not a single SELECT"),
            ("[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\n", "ttl: required"),
            ("[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\nttl = \"5s\"\ncolour = \"red\"\n", "colour"),
            ("[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\naction = \"bypass\"\nttl = \"5s\"\n", "no effect"),
            ("[[rule]]\nname = \"x\"\nmatch = { tables = [\"a b\"] }\nttl = \"5s\"\n", "match.tables"),
            (
                "[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\nttl = \"5s\"\n[[rule]]\nname = \"x\"\nmatch = { tables = [\"u\"] }\nttl = \"5s\"\n",
                "also used",
            ),
            ("[[rule]\n", "rules.toml:1"),
            (
                "[[rule]]\nname = \"x\"\nmatch = { tables = [\"t\"] }\naction = \"bypass\"\nroute = \"replica\"\n",
                "route",
            ),
        ];
        for (text, expect) in cases {
            let err = load(&[("rules.toml", text)]).expect_err(text).to_string();
            assert!(err.contains(expect), "{text}\n=> {err}");
            assert!(err.contains("rules.toml:"), "{err}");
        }
        let err = load(&[("r.toml", "\n\n[[rule]]\nname = \"late\"\nmatch = {}\nttl = \"5s\"\n")])
            .expect_err("empty match")
            .to_string();
        assert!(err.contains("r.toml:3: rule \"late\": match"), "{err}");
    }

    #[test]
    fn table_names_fold_like_postgres() {
        assert_eq!(parse_table("Public.Items").expect("ok"), Relation::new(Some("public"), "items"));
        assert_eq!(parse_table("\"My Schema\".\"T\"").expect("ok"), Relation::new(Some("My Schema"), "T"));
        assert!(parse_table("a.b.c").is_err());
        assert!(parse_table("").is_err());
    }
}
