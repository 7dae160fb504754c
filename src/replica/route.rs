//! Which statements may run on a replica: only what is provably read-only there, so that no
//! client ever sees a standby's "cannot execute … in a read-only transaction". A statement
//! qualifies when it is a single plain SELECT (no `FOR UPDATE/SHARE`, no `SELECT INTO`, no
//! data-modifying CTE), changes no setting, takes nothing that lives in its connection
//! (advisory locks, cursors, temporary objects), and everything it evaluates is read-only per
//! the catalog: functions and operators IMMUTABLE or STABLE (Postgres refuses writes in
//! those), or one of a few volatile built-ins that write nothing; relations that are neither
//! temporary, unlogged (a standby cannot read those) nor unknown. Anything else — and
//! anything the catalog cannot answer for right now — stays on the primary. So does what the
//! operator pins there ([`pinned_to_primary`]): a read a `route = "primary"` rule matches, or
//! whose text carries `pgcache:primary` (as in a comment, `/* pgcache:primary */ SELECT …`).

use crate::query::catalog::{Catalog, Volatility};
use crate::query::{Classified, Kind, Relation};
use crate::rules::{RuleSet, Subject};

/// Text that pins a statement to the primary, wherever it appears (a comment, usually).
pub const PRIMARY_HINT: &str = "pgcache:primary";

/// Whether the operator pinned the statements of `sql` to the primary: by the hint in its text,
/// or by a `route = "primary"` rule touching any of them — what they read, and what the views
/// they read read (see [`RuleSet::routes_to_primary`]). If the catalog cannot say what views
/// read while such a rule exists, they stay on the primary.
pub async fn pinned_to_primary(
    catalog: &Catalog,
    rules: &RuleSet,
    sql: &str,
    statements: &[Classified],
    database: &str,
    user: &str,
) -> bool {
    if sql.contains(PRIMARY_HINT) {
        return true;
    }
    if !rules.has_primary_routes() {
        return false;
    }
    for c in statements {
        let mut reads = c.reads.clone();
        if !reads.is_empty() {
            let Ok(infos) = catalog.relations(database, &c.reads).await else { return true };
            reads.extend(infos.iter().flat_map(|i| i.read_deps.iter().cloned()));
        }
        if rules.routes_to_primary(&Subject { sql, statement: c, resolved_reads: &reads, database, user }) {
            return true;
        }
    }
    false
}

/// Volatile built-ins that read or write nothing a standby refuses.
const HARMLESS_VOLATILE: &[&str] =
    &["random", "random_normal", "gen_random_uuid", "clock_timestamp", "timeofday", "pg_sleep"];

/// Built-ins a standby refuses whatever their volatility (they need a transaction id or the
/// WAL's insert position), or answers for itself rather than for the primary.
const PRIMARY_ONLY: &[&str] = &[
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_walfile_name",
    "pg_walfile_name_offset",
    "pg_export_snapshot",
    "inet_server_addr",
    "inet_server_port",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
    "pg_backend_pid",
    "pg_is_in_recovery",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
];

/// Whether `c` is read-only by its text alone (the catalog is asked next).
pub fn reads_only(c: &Classified) -> bool {
    c.kind == Kind::Select
        && c.holds.is_none()
        && !c.settings.changes
        && !c.settings.unseen
        && !c.settings.unnamed
        // A standby's own statistics and activity are not the primary's.
        && !matches!(c.never_cache, Some(why) if why.starts_with("locks") || why.contains("temporary") || why.contains("system catalog"))
}

/// Whether every statement may run on a replica of `database`'s primary.
pub async fn eligible(catalog: &Catalog, database: &str, statements: &[&Classified]) -> bool {
    if statements.is_empty() || !statements.iter().all(|c| reads_only(c)) {
        return false;
    }
    let all = |f: fn(&Classified) -> &Vec<Relation>| -> Vec<Relation> {
        let mut v: Vec<Relation> = statements.iter().flat_map(|c| f(c).iter().cloned()).collect();
        v.sort();
        v.dedup();
        v
    };
    let (functions, operators, reads, types) =
        (all(|c| &c.functions), all(|c| &c.operators), all(|c| &c.reads), all(|c| &c.types));
    let system = |name: &Relation| name.schema.as_deref().is_none_or(|s| s == "pg_catalog");
    if functions.iter().any(|f| system(f) && PRIMARY_ONLY.contains(&f.name.as_str())) {
        return false;
    }
    let harmless = |name: &Relation, v: Volatility| {
        v != Volatility::Volatile
            || (HARMLESS_VOLATILE.contains(&name.name.as_str())
                && name.schema.as_deref().is_none_or(|s| s == "pg_catalog"))
    };
    if !functions.is_empty() {
        let Ok(infos) = catalog.functions(database, &functions).await else { return false };
        if functions.iter().zip(&infos).any(|(f, i)| i.may_write || !harmless(f, i.volatility)) {
            return false;
        }
    }
    if !operators.is_empty() {
        let Ok(infos) = catalog.operators(database, &operators).await else { return false };
        if infos.iter().any(|i| i.may_write || i.volatility == Volatility::Volatile) {
            return false;
        }
    }
    if !types.is_empty() {
        let Ok(v) = catalog.types(database, &types).await else { return false };
        if v.contains(&Volatility::Volatile) {
            return false;
        }
    }
    if !reads.is_empty() {
        let Ok(infos) = catalog.relations(database, &reads).await else { return false };
        // (A view over a volatile function may write: never_cache says so.)
        if infos.iter().any(|i| i.unlogged || i.never_cache.is_some()) {
            return false;
        }
        // What views read (expanded to the tables underneath).
        let mut under: Vec<Relation> = infos.iter().flat_map(|i| i.read_deps.iter().cloned()).collect();
        under.retain(|r| !reads.contains(r));
        under.sort();
        under.dedup();
        if !under.is_empty() {
            let Ok(infos) = catalog.relations(database, &under).await else { return false };
            if infos.iter().any(|i| i.unlogged) {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::classify::classify;

    fn one(sql: &str) -> bool {
        classify(sql).iter().all(reads_only)
    }

    #[test]
    fn only_plain_reads_qualify_by_their_text() {
        assert!(one("select * from t where id = 1"));
        assert!(one("select count(*) from t join u using (id)"));
        for sql in [
            "select * from t for update",
            "select * from t for share",
            "select * into t2 from t",
            "with d as (delete from t returning *) select * from d",
            "insert into t values (1)",
            "select set_config('a.b', '1', false)",
            "select pg_advisory_lock(1)",
            "set statement_timeout = 1",
            "begin",
            "do $$ begin end $$",
            "declare c cursor with hold for select 1",
            "select * from pg_stat_activity",
        ] {
            assert!(!one(sql), "{sql}");
        }
    }
}
