//! The session settings that change query results or their encoding, which every cache key
//! includes (so two sessions that could see different rows or bytes never share an entry).
//!
//! Settings Postgres reports through ParameterStatus (`TimeZone`, `DateStyle`,
//! `IntervalStyle`, `client_encoding`, `standard_conforming_strings`,
//! `session_authorization`, `integer_datetimes`) are always current. The others
//! (`search_path`, `extra_float_digits`, `bytea_output`, the role, ...) are not reported, so the
//! session reads them with one probe query when it first needs a key and again after anything
//! that may have changed them (SET, RESET, DISCARD, a volatile function, the end of a
//! transaction that changed them).

use std::collections::BTreeMap;

use crate::cache::key::KeyBuilder;

/// Settings reported by ParameterStatus that affect results or their encoding.
const REPORTED: [&str; 7] = [
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "client_encoding",
    "standard_conforming_strings",
    "session_authorization",
    "integer_datetimes",
];

/// What the probe reads, in order.
const PROBED: [&str; 14] = [
    "current_user",
    "search_path",
    "extra_float_digits",
    "bytea_output",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "row_security",
    "array_nulls",
    "transform_null_equals",
    "xmlbinary",
    "xmloption",
    "default_transaction_isolation",
    "transaction_isolation",
];

/// The probe query (simple protocol, one row of text values).
pub fn probe_sql() -> String {
    let cols: Vec<String> = PROBED
        .iter()
        .map(|name| {
            if *name == "current_user" { "current_user::text".to_owned() } else { format!("current_setting('{name}')") }
        })
        .collect();
    format!("SELECT {}", cols.join(", "))
}

/// The unreported settings, once known.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    probed: Option<Vec<String>>,
}

impl Settings {
    pub fn known(&self) -> bool {
        self.probed.is_some()
    }

    /// Something may have changed them: probe again before the next key.
    pub fn forget(&mut self) {
        self.probed = None;
    }

    /// Records the probe's row; a row of the wrong shape leaves them unknown.
    pub fn learn(&mut self, row: Vec<Option<String>>) {
        if row.len() == PROBED.len() && row.iter().all(Option::is_some) {
            self.probed = Some(row.into_iter().flatten().collect());
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        let i = PROBED.iter().position(|p| *p == name)?;
        self.probed.as_ref().map(|v| v[i].as_str())
    }

    pub fn role(&self) -> Option<&str> {
        self.get("current_user")
    }

    pub fn search_path(&self) -> Option<&str> {
        self.get("search_path")
    }

    /// Whether a transaction started now (and the current one, if any) reads with a fresh
    /// snapshot per statement, which is when cached results are valid inside it.
    pub fn read_committed(&self) -> bool {
        self.get("transaction_isolation") == Some("read committed")
            && self.get("default_transaction_isolation") == Some("read committed")
    }

    /// Appends every setting to a key; the role only when entries are not shared across
    /// roles.
    pub fn key(&self, reported: &BTreeMap<String, String>, share_across_roles: bool, kb: &mut KeyBuilder) {
        for name in REPORTED {
            if share_across_roles && name == "session_authorization" {
                continue;
            }
            kb.part(reported.get(name).map(|v| v.as_bytes()));
        }
        for (name, value) in PROBED.iter().zip(self.probed.iter().flatten()) {
            if matches!(*name, "transaction_isolation" | "default_transaction_isolation")
                || (share_across_roles && *name == "current_user")
            {
                continue;
            }
            kb.str(value);
        }
    }

    /// The settings to apply on another connection (started like this session's, as
    /// `login_user`) so it computes the same results: `(name, value)` pairs for `set_config`.
    /// `None` when that cannot be reproduced (a different session authorization).
    pub fn replay(&self, reported: &BTreeMap<String, String>, login_user: &str) -> Option<Vec<(String, String)>> {
        let probed = self.probed.as_ref()?;
        if reported.get("session_authorization").is_some_and(|a| a != login_user) {
            return None;
        }
        let mut out = Vec::new();
        for name in ["TimeZone", "DateStyle", "IntervalStyle", "client_encoding", "standard_conforming_strings"] {
            if let Some(v) = reported.get(name) {
                out.push((name.to_owned(), v.clone()));
            }
        }
        for (name, value) in PROBED.iter().zip(probed) {
            match *name {
                "current_user" if value != login_user => out.push(("role".to_owned(), value.clone())),
                "current_user" | "transaction_isolation" | "default_transaction_isolation" => {}
                _ => out.push(((*name).to_owned(), value.clone())),
            }
        }
        Some(out)
    }

    /// Resolves an unqualified relation to the first schema of the search path holding it
    /// (`pg_temp` and `pg_catalog` first unless listed, as Postgres does).
    pub fn resolve<'a>(&self, candidates: &'a [String]) -> Option<&'a str> {
        let role = self.role().unwrap_or("");
        let path = self.search_path()?;
        let mut order: Vec<String> = Vec::new();
        let listed: Vec<String> = path
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_owned())
            .map(|s| if s == "$user" { role.to_owned() } else { s })
            .collect();
        if !listed.iter().any(|s| s == "pg_temp") {
            order.push("pg_temp".into());
        }
        if !listed.iter().any(|s| s == "pg_catalog") {
            order.push("pg_catalog".into());
        }
        order.extend(listed);
        order.iter().find_map(|schema| {
            candidates
                .iter()
                .find(|c| *c == schema || (schema == "pg_temp" && c.starts_with("pg_temp_")))
                .map(String::as_str)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probed(search_path: &str) -> Settings {
        let mut s = Settings::default();
        let mut row: Vec<Option<String>> = PROBED.iter().map(|_| Some("x".to_owned())).collect();
        row[0] = Some("alice".into());
        row[1] = Some(search_path.into());
        row[12] = Some("read committed".into());
        row[13] = Some("read committed".into());
        s.learn(row);
        s
    }

    #[test]
    fn resolution_follows_the_search_path() {
        let s = probed("\"$user\", public");
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(s.resolve(&c(&["public", "alice"])), Some("alice"));
        assert_eq!(s.resolve(&c(&["public", "other"])), Some("public"));
        assert_eq!(s.resolve(&c(&["other"])), None);
        assert_eq!(s.resolve(&c(&["public", "pg_temp_3"])), Some("pg_temp_3"));
        assert!(s.read_committed());
    }

    #[test]
    fn keys_differ_by_role_unless_shared() {
        let a = probed("public");
        let mut b = probed("public");
        let mut row: Vec<Option<String>> = b.probed.take().into_iter().flatten().map(Some).collect();
        row[0] = Some("bob".into());
        b.learn(row);
        let reported = BTreeMap::new();
        let key = |s: &Settings, share| {
            let mut kb = KeyBuilder::new(b'Q');
            s.key(&reported, share, &mut kb);
            kb.finish()
        };
        assert_ne!(key(&a, false), key(&b, false));
        assert_eq!(key(&a, true), key(&b, true));
    }

    #[test]
    fn wrong_shaped_probe_leaves_settings_unknown() {
        let mut s = Settings::default();
        s.learn(vec![Some("a".into())]);
        assert!(!s.known());
        assert!(probe_sql().starts_with("SELECT current_user::text, current_setting('search_path')"));
    }
}
