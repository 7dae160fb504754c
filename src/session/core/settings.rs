//! The session settings every cache key includes, so two sessions that could see different rows
//! or bytes never share an entry.
//!
//! Not a fixed list: the key holds every setting Postgres reports as changed from its built-in
//! default for this session (`pg_settings.source` other than `default` and `override`: the
//! configuration file, `ALTER DATABASE/ROLE ... SET`, the startup packet and its `options`,
//! `SET`, `SET LOCAL`, `set_config()`), plus the role (`current_user`, `session_user`), the
//! `search_path`, and the custom settings the session may have set (`app.tenant`,
//! `request.jwt.claims`). Postgres keeps custom (placeholder) settings out of `pg_settings`, so
//! the session tracks their names — from its startup packet, `SET`/`RESET` statements and
//! `set_config` calls — and the probe reads each with `current_setting(name, true)`.
//!
//! The probe is one query, run when a key is first needed and again after anything that may
//! have changed a setting (see [`super::flow::Flow::settings_may_change`]). A statement
//! pgcache cannot see into (`DO`, `CALL`, a volatile user function, `set_config` with a
//! computed name) may set custom settings it cannot name: until `RESET ALL` or `DISCARD ALL`,
//! reads whose results can depend on custom settings (row-level security, stable functions)
//! are then not cached.
//!
//! Settings that never change a result's rows or bytes ([`IGNORED`]) are left out of the key so
//! they do not split the cache.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::key::KeyBuilder;
use crate::query::SettingsChange;
use crate::query::tree::custom_setting;
use crate::session::shared::Shared;

/// Settings that cannot change what a query returns (only when or whether it runs, or what the
/// server logs). Leaving one out of this list only splits the cache; it never shares an entry
/// wrongly.
pub const IGNORED: [&str; 5] = [
    "application_name",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
];

/// Server-file settings that cannot change what a query returns either, and that Postgres
/// shows only to superusers (`GUC_SUPERUSER_ONLY`): left in the key they would keep a
/// superuser and every other role from sharing entries of rules that share across roles.
const SERVER_FILE: [&str; 10] = [
    "shared_preload_libraries",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "dynamic_library_path",
    "krb_server_keyfile",
    "restore_command",
    "archive_command",
];

/// Whether a setting is left out of the key (see [`IGNORED`] and [`SERVER_FILE`]): logging,
/// TLS files and Unix-socket settings never change a result either.
fn ignored(name: &str) -> bool {
    IGNORED.contains(&name)
        || SERVER_FILE.contains(&name)
        || ["log_", "ssl_", "unix_socket_"].iter().any(|p| name.starts_with(p))
}

/// Rows of the probe that are not `pg_settings` rows.
const CURRENT_USER: &str = ".current_user";
const SESSION_USER: &str = ".session_user";
const SEARCH_PATH: &str = ".search_path";
const ISOLATION: &str = ".transaction_isolation";
const DEFAULT_ISOLATION: &str = ".default_transaction_isolation";
/// The source reported for a custom setting's row.
const CUSTOM: &str = "custom";

/// What one probe read: every row as (name, source, value), and the key parts built from it.
/// Equal when the rows are (the rest is derived from them).
#[derive(Debug)]
pub struct Snapshot {
    rows: Vec<(String, String, Option<String>)>,
    /// The key part with the role, and without it (for rules shared across roles).
    with_role: Bytes,
    without_role: Bytes,
    /// Where the rows of [`FREQUENT`] are, found once: they are read for every statement.
    frequent: [Option<usize>; FREQUENT.len()],
}

/// Rows read for every statement (the memo's conditions, the isolation check).
const FREQUENT: [&str; 4] = [CURRENT_USER, SEARCH_PATH, ISOLATION, DEFAULT_ISOLATION];

/// The snapshots sessions hold, by their rows: sessions whose probes read the same settings
/// (nearly every session of a pool: same role, same database, no `SET`) hold one between them.
static SNAPSHOTS: Shared<Snapshot> = Shared::new();

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.rows == other.rows
    }
}

impl Eq for Snapshot {}

impl std::hash::Hash for Snapshot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.rows.hash(state);
    }
}

impl Snapshot {
    fn get(&self, name: &str) -> Option<&str> {
        let at = match FREQUENT.iter().position(|f| *f == name) {
            Some(i) => self.frequent[i],
            None => self.rows.iter().position(|(n, _, _)| n == name),
        };
        at.and_then(|i| self.rows[i].2.as_deref())
    }

    fn build(rows: Vec<(String, String, Option<String>)>) -> Snapshot {
        let encode = |with_role: bool| {
            let mut kb = KeyBuilder::new(b's');
            for (name, _, value) in &rows {
                let role_part = matches!(
                    name.as_str(),
                    CURRENT_USER | SESSION_USER | "role" | "session_authorization" | "is_superuser"
                );
                if ignored(name)
                    || name.starts_with("transaction_")
                    || matches!(name.as_str(), ISOLATION | DEFAULT_ISOLATION)
                    || (role_part && !with_role)
                {
                    continue;
                }
                kb.str(name).part(value.as_deref().map(str::as_bytes));
            }
            // Exactly sized: every session with these settings holds them.
            Bytes::copy_from_slice(&kb.finish_part())
        };
        let frequent = FREQUENT.map(|f| rows.iter().position(|(n, _, _)| n == f));
        Snapshot { with_role: encode(true), without_role: encode(false), rows, frequent }
    }
}

/// The session's settings as far as the cache key is concerned.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    probed: Option<Arc<Snapshot>>,
    /// Custom settings the session may have set (lower case).
    custom: BTreeSet<String>,
    /// Custom settings may have been set under names pgcache does not know.
    unknowable: bool,
    /// ... and by the client's own statements (DO, CALL, `set_config` with a computed name),
    /// so moving the session to another backend could lose them. (A trigger or function
    /// that sets a custom setting for the session makes it unknowable for the cache key, but
    /// not unreplayable: see the README on transaction pooling.)
    unreplayable: bool,
    /// The snapshot was read on the backend the session holds now (or that backend was
    /// verified to have exactly these settings), and nothing that may change them ran since:
    /// a result computed there is computed in this state, so it may be stored under it.
    on_backend: bool,
    /// Counts [`Settings::forget`]s: a probe sent before the latest may have read settings
    /// half-changed, and its answer is not learned ([`Settings::epoch`]).
    forgotten: u64,
}

impl Settings {
    /// The settings of a session that starts with these startup parameters: custom settings
    /// given directly or in `options` (`-c app.tenant=1`, `--app.tenant=1`) are tracked.
    pub fn at_startup(params: &[(String, String)]) -> Settings {
        let mut s = Settings::default();
        for (name, value) in params {
            if name == "options" {
                s.custom.extend(option_names(value).filter_map(|n| custom_setting(&n)));
            } else if !name.starts_with("_pq_.") {
                s.custom.extend(custom_setting(name));
            }
        }
        s
    }

    /// The settings of a session started with `startup` that then applied `replayed` (what
    /// [`Settings::replay`] gave) and tracked the custom settings `customs`, set or not. Not
    /// known until a probe reads them.
    pub fn replayed(startup: &[(String, String)], replayed: &[(String, String)], customs: &[String]) -> Settings {
        let mut s = Settings::at_startup(startup);
        s.custom.extend(replayed.iter().filter_map(|(name, _)| custom_setting(name)));
        s.custom.extend(customs.iter().filter_map(|name| custom_setting(name)));
        s
    }

    pub fn known(&self) -> bool {
        self.probed.is_some()
    }

    /// Something may have changed them: probe again before the next key.
    pub fn forget(&mut self) {
        self.probed = None;
        self.on_backend = false;
        self.forgotten += 1;
    }

    /// Which snapshot of the settings a probe sent now reads: if the settings are forgotten
    /// again before its answer arrives, that answer may predate what changed them.
    pub fn epoch(&self) -> u64 {
        self.forgotten
    }

    /// The session now holds a backend on which a probe last read `verified` (the key part
    /// with the role; `None`: unknown there). The snapshot describes that backend only if it
    /// is the same; otherwise it still keys lookups (it is the session's state) but a fill
    /// waits for a probe of this backend ([`Settings::verified`]).
    pub fn attach(&mut self, verified: Option<&Bytes>) {
        self.on_backend = self.probed.as_ref().is_some_and(|p| Some(&p.with_role) == verified);
    }

    /// The key part (with the role) of the settings the session's current backend has, as a
    /// probe on it read them: what a result computed there may be stored under. `None` when
    /// that backend has not been read since it was given to the session or since something
    /// may have changed its settings.
    pub fn verified(&self) -> Option<&Bytes> {
        self.probed.as_ref().filter(|_| self.on_backend).map(|p| &p.with_role)
    }

    /// Notes what a statement about to run does to settings (the caller forgets them).
    pub fn track(&mut self, change: &SettingsChange) {
        let before = self.custom.len();
        self.custom.extend(change.custom.iter().cloned());
        if self.custom.len() > before {
            // A custom setting the probe did not read: read it before the next key.
            self.forget();
        }
        self.unknowable |= change.unnamed;
        self.unreplayable |= change.unnamed;
        if change.resets_all {
            // Every custom setting is back at its start-up value, which is tracked.
            self.unknowable = false;
            self.unreplayable = false;
        }
    }

    /// The custom settings the session tracks (it set, reset or read them by name, or its
    /// startup packet gave them).
    pub fn customs(&self) -> &BTreeSet<String> {
        &self.custom
    }

    /// Tracked custom settings the last probe found undefined in the session (never set
    /// there): a connection on which another session defined one of them cannot show this
    /// session's state, as Postgres cannot undefine a custom setting (`RESET` makes it '').
    pub fn undefined(&self) -> impl Iterator<Item = &str> {
        let rows = self.probed.as_ref().map(|p| p.rows.as_slice()).unwrap_or_default();
        rows.iter().filter(|(_, source, value)| source == CUSTOM && value.is_none()).map(|(name, _, _)| name.as_str())
    }

    /// A statement pgcache cannot see into ran: it may have set custom settings.
    pub fn mark_unknowable(&mut self) {
        self.unknowable = true;
    }

    /// A statement of the client's that pgcache cannot see into ran (DO, CALL): custom
    /// settings it set could not be replayed on another backend.
    pub fn mark_unreplayable(&mut self) {
        self.unknowable = true;
        self.unreplayable = true;
    }

    /// Whether custom settings may have been set under names the probe cannot read.
    pub fn unknowable(&self) -> bool {
        self.unknowable
    }

    /// The probe query (simple protocol; rows of name, source, value as text). Custom names
    /// are validated to letters, digits, `_`, `$` and `.`, so quoting them is safe whatever
    /// `standard_conforming_strings` says; a session that set any other name is marked
    /// unknowable instead.
    pub fn probe_sql(&mut self) -> String {
        let mut sql = String::from(
            "SELECT name, source, setting FROM pg_catalog.pg_settings WHERE source NOT IN ('default', 'override') \
             UNION ALL SELECT '.current_user', '', current_user::text \
             UNION ALL SELECT '.session_user', '', session_user::text \
             UNION ALL SELECT '.search_path', '', pg_catalog.current_setting('search_path') \
             UNION ALL SELECT '.transaction_isolation', '', pg_catalog.current_setting('transaction_isolation') \
             UNION ALL SELECT '.default_transaction_isolation', '', \
               pg_catalog.current_setting('default_transaction_isolation')",
        );
        let plain = |n: &str| n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_$.".contains(&b));
        self.unknowable |= !self.custom.iter().all(|n| plain(n));
        for name in self.custom.iter().filter(|n| plain(n)) {
            sql.push_str(&format!(
                " UNION ALL SELECT '{name}', '{CUSTOM}', pg_catalog.current_setting('{name}', true)"
            ));
        }
        sql
    }

    /// Records the probe's rows; rows of the wrong shape leave the settings unknown.
    pub fn learn(&mut self, rows: Vec<Vec<Option<String>>>) {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let Ok([Some(name), Some(source), value]) = <[Option<String>; 3]>::try_from(row) else {
                return;
            };
            out.push((name, source, value));
        }
        let snapshot = Snapshot::build(out);
        if snapshot.get(CURRENT_USER).is_some() && snapshot.get(SEARCH_PATH).is_some() {
            self.probed = Some(SNAPSHOTS.get(snapshot));
            // The probe ran on the session's backend: this is that backend's state.
            self.on_backend = true;
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.probed.as_ref().and_then(|s| s.get(name))
    }

    pub fn role(&self) -> Option<&str> {
        self.get(CURRENT_USER)
    }

    /// Whether transactions default to SERIALIZABLE, if the settings were read (role and
    /// database defaults included): `None` when they were not.
    pub fn serializable_as_read(&self) -> Option<bool> {
        self.probed.as_ref().and_then(|s| s.get(DEFAULT_ISOLATION)).map(|v| v == "serializable")
    }

    pub fn search_path(&self) -> Option<&str> {
        self.get(SEARCH_PATH)
    }

    /// Whether a transaction started now (and the current one, if any) reads with a fresh
    /// snapshot per statement, which is when cached results are valid inside it.
    pub fn read_committed(&self) -> bool {
        self.get(ISOLATION) == Some("read committed") && self.get(DEFAULT_ISOLATION) == Some("read committed")
    }

    /// The key part for these settings: with the role, or without it (rules that share entries
    /// across roles). Empty until probed.
    pub fn key_part(&self, with_role: bool) -> Bytes {
        match &self.probed {
            Some(s) if with_role => s.with_role.clone(),
            Some(s) => s.without_role.clone(),
            None => Bytes::new(),
        }
    }

    /// The settings to apply on another connection (started like this session's, as
    /// `login_user`) so it computes the same results: `(name, value)` pairs for `set_config`.
    /// Settings from the startup packet, the database, the role and the configuration file
    /// are the same there already. `None` when that cannot be reproduced (another session
    /// authorization, or custom settings pgcache cannot name).
    pub fn replay(&self, login_user: &str) -> Option<Vec<(String, String)>> {
        let probed = self.probed.as_ref()?;
        if self.unreplayable || probed.get(SESSION_USER).is_some_and(|u| u != login_user) {
            return None;
        }
        let mut out = Vec::new();
        for (name, source, value) in &probed.rows {
            let Some(value) = value else { continue };
            match (name.as_str(), source.as_str()) {
                (CURRENT_USER, _) if value != login_user => out.push(("role".to_owned(), value.clone())),
                ("role" | "session_authorization" | "is_superuser", _) => {}
                (n, _) if n.starts_with("transaction_") => {}
                (_, "session" | CUSTOM) => out.push((name.clone(), value.clone())),
                _ => {}
            }
        }
        Some(out)
    }

    /// Resolves an unqualified relation to the first schema of the search path holding it
    /// (`pg_temp` and `pg_catalog` first unless listed, as Postgres does).
    pub fn resolve<'a>(&self, candidates: &'a [String]) -> Option<&'a str> {
        crate::policy::resolve(self.role().unwrap_or(""), self.search_path()?, candidates)
    }
}

/// The setting names in a startup `options` string: `-c name=value`, `-cname=value` and
/// `--name=value`, words separated by spaces (a backslash escapes the next character).
fn option_names(options: &str) -> impl Iterator<Item = String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut names = Vec::new();
    let mut iter = words.into_iter();
    while let Some(w) = iter.next() {
        let assignment = match w.as_str() {
            "-c" => iter.next(),
            w if w.starts_with("-c") => Some(w[2..].to_owned()),
            w if w.starts_with("--") => Some(w[2..].to_owned()),
            _ => None,
        };
        if let Some(name) = assignment.and_then(|a| a.split_once('=').map(|(n, _)| n.replace('-', "_"))) {
            names.push(name);
        }
    }
    names.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, source: &str, value: Option<&str>) -> Vec<Option<String>> {
        vec![Some(name.into()), Some(source.into()), value.map(str::to_owned)]
    }

    fn probed(user: &str, search_path: &str, extra: Vec<Vec<Option<String>>>) -> Settings {
        let mut s = Settings::default();
        let mut rows = vec![
            row(CURRENT_USER, "", Some(user)),
            row(SESSION_USER, "", Some(user)),
            row(SEARCH_PATH, "", Some(search_path)),
            row(ISOLATION, "", Some("read committed")),
            row(DEFAULT_ISOLATION, "", Some("read committed")),
        ];
        rows.extend(extra);
        s.learn(rows);
        s
    }

    #[test]
    fn resolution_follows_the_search_path() {
        let s = probed("alice", "\"$user\", public", vec![]);
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(s.resolve(&c(&["public", "alice"])), Some("alice"));
        assert_eq!(s.resolve(&c(&["public", "other"])), Some("public"));
        assert_eq!(s.resolve(&c(&["other"])), None);
        assert_eq!(s.resolve(&c(&["public", "pg_temp_3"])), Some("pg_temp_3"));
        assert!(s.read_committed());
    }

    #[test]
    fn keys_differ_by_role_unless_shared_and_by_any_changed_setting() {
        let (a, b) = (probed("alice", "public", vec![]), probed("bob", "public", vec![]));
        assert_ne!(a.key_part(true), b.key_part(true));
        assert_eq!(a.key_part(false), b.key_part(false));
        let hashagg = probed("alice", "public", vec![row("enable_hashagg", "session", Some("off"))]);
        assert_ne!(a.key_part(false), hashagg.key_part(false), "any setting the session changed");
        let tenant = |t: Option<&str>| probed("alice", "public", vec![row("app.tenant", CUSTOM, t)]);
        assert_ne!(tenant(Some("1")).key_part(true), tenant(Some("2")).key_part(true));
        assert_ne!(tenant(Some("")).key_part(true), tenant(None).key_part(true), "unset differs from empty");
        let named = probed("alice", "public", vec![row("application_name", "client", Some("x"))]);
        assert_eq!(a.key_part(true), named.key_part(true), "application_name never changes results");
    }

    #[test]
    fn sessions_with_the_same_settings_share_one_snapshot() {
        let (a, b) = (probed("carol", "public", vec![]), probed("carol", "public", vec![]));
        assert!(Arc::ptr_eq(a.probed.as_ref().unwrap(), b.probed.as_ref().unwrap()));
        let other = probed("carol", "public", vec![row("work_mem", "session", Some("8MB"))]);
        assert!(!Arc::ptr_eq(a.probed.as_ref().unwrap(), other.probed.as_ref().unwrap()));
        // The source counts too: the same value from another source is another snapshot.
        let file = probed("carol", "public", vec![row("work_mem", "configuration file", Some("8MB"))]);
        assert!(!Arc::ptr_eq(other.probed.as_ref().unwrap(), file.probed.as_ref().unwrap()));
        assert_eq!(other.key_part(true), file.key_part(true));
    }

    #[test]
    fn wrong_shaped_probe_leaves_settings_unknown() {
        let mut s = Settings::default();
        s.learn(vec![vec![Some("a".into())]]);
        assert!(!s.known());
        s.learn(vec![row("enable_hashagg", "session", Some("off"))]);
        assert!(!s.known(), "the role and search_path rows are required");
    }

    #[test]
    fn custom_settings_come_from_startup_statements_and_set_config() {
        let mut s = Settings::at_startup(&[
            ("user".into(), "u".into()),
            ("options".into(), "-c app.tenant=2 -cApp.Other=x --request.jwt-claims=y -c search_path=s".into()),
            ("my.flag".into(), "1".into()),
        ]);
        let sql = s.probe_sql();
        for name in ["app.tenant", "app.other", "request.jwt_claims", "my.flag"] {
            assert!(sql.contains(&format!("current_setting('{name}', true)")), "{name}: {sql}");
        }
        assert!(!s.unknowable());
        s.track(&SettingsChange { changes: true, custom: vec!["x.y".into()], unnamed: true, ..Default::default() });
        assert!(s.probe_sql().contains("'x.y'") && s.unknowable());
        s.track(&SettingsChange { changes: true, resets_all: true, ..Default::default() });
        assert!(!s.unknowable());
        s.track(&SettingsChange { custom: vec!["a.b'; DROP".into()], ..Default::default() });
        let sql = s.probe_sql();
        assert!(!sql.contains("DROP") && s.unknowable(), "a name pgcache cannot quote is not probed");
    }

    #[test]
    fn replay_reproduces_session_and_custom_settings_only() {
        // Logged in as alice, SET ROLE bob.
        let mut rows = vec![row(SESSION_USER, "", Some("alice"))];
        let s = probed(
            "bob",
            "s1",
            vec![
                row("search_path", "session", Some("s1")),
                row("DateStyle", "configuration file", Some("ISO, MDY")),
                row("app.tenant", CUSTOM, Some("7")),
                row("app.unset", CUSTOM, None),
            ],
        );
        assert_eq!(s.replay("alice"), None, "the probe said bob is the session user too");
        let mut replayable = Settings::default();
        rows.extend(
            s.probed
                .as_ref()
                .map(|p| p.rows.iter().filter(|r| r.0 != SESSION_USER))
                .into_iter()
                .flatten()
                .map(|(n, src, v)| vec![Some(n.clone()), Some(src.clone()), v.clone()]),
        );
        replayable.learn(rows);
        let s = replayable;
        let replay = s.replay("alice").expect("replayable");
        assert_eq!(
            replay,
            vec![("role".into(), "bob".into()), ("search_path".into(), "s1".into()), ("app.tenant".into(), "7".into())]
        );
    }
}
