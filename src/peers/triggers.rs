//! `pgcache triggers install|uninstall|sql`: statement-level triggers that announce writes
//! which bypass every pgcache instance (cron jobs, migrations, `psql` straight to Postgres) on
//! the invalidation channel, in the writer's own transaction, with the same payload format the
//! instances use.
//!
//! The tables are the ones the rules can cache: those `match.tables` lists and those a
//! `match.query` reads, expanded through views to their base tables and through partitions and
//! inheritance to every child (a write to a partition fires only the partition's triggers);
//! every user table if any rule matches by `pattern`. Installing is idempotent and converges:
//! triggers on tables no longer targeted are dropped. Uninstalling removes every trigger, the
//! function and the `pgcache` schema.
//!
//! Cost per write: one `pg_notify` per statement (not per row), so every writing transaction
//! takes Postgres's notify lock at commit — measure it with `bench/peers.sh` before installing
//! on write-heavy tables.

use std::collections::BTreeSet;

use crate::query::Relation;
use crate::query::catalog::{Catalog, CatalogError};
use crate::query::classify::{Kind, classify};
use crate::rules::{Action, RuleSet};

/// The triggers' names (the catalog ignores them when it looks for user triggers).
pub const TRIGGER: &str = "pgcache_invalidate";
pub const TRUNCATE_TRIGGER: &str = "pgcache_invalidate_truncate";

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// An identifier quoted for SQL.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn qualified(r: &Relation) -> String {
    match &r.schema {
        Some(s) => format!("{}.{}", ident(s), ident(&r.name)),
        None => ident(&r.name),
    }
}

/// What to install on `tables` for `channel`: the schema, the function, the two triggers per
/// table, and the removal of pgcache triggers from any other table. With the fleet's `key`
/// ([`crate::peers::message::Seal`]) the function seals its messages as the instances do:
/// HMAC-SHA-256 computed in SQL from the key's inner and outer pads, kept in
/// `pgcache.peer_key`, which no role but its owner may read; the function runs as its owner
/// (SECURITY DEFINER) to read it.
pub fn install_sql(channel: &str, tables: &[Relation], key: Option<&[u8; 32]>) -> String {
    let payload = "json_build_object('v', 1, 'i', 'trigger', 'd', current_database(),\n    \
         't', (extract(epoch FROM clock_timestamp()) * 1000000)::int8, 'r', json_build_array(TG_RELID::int8))::text";
    let (key_sql, notify, definer) = match key {
        Some(key) => {
            let pad = |byte: u8| {
                let mut p = [byte; 64];
                p.iter_mut().zip(key).for_each(|(p, k)| *p ^= k);
                p.iter().map(|b| format!("{b:02x}")).collect::<String>()
            };
            (
                format!(
                    "CREATE TABLE IF NOT EXISTS pgcache.peer_key (inner_pad bytea NOT NULL, outer_pad bytea NOT NULL);\n\
                     REVOKE ALL ON pgcache.peer_key FROM PUBLIC;\n\
                     DELETE FROM pgcache.peer_key;\n\
                     INSERT INTO pgcache.peer_key VALUES ('\\x{}'::bytea, '\\x{}'::bytea);\n",
                    pad(0x36),
                    pad(0x5c)
                ),
                format!(
                    "DECLARE m text := {payload}; k record;\n\
                     BEGIN\n  \
                       SELECT * INTO k FROM pgcache.peer_key;\n  \
                       PERFORM pg_notify('{channel}', encode(sha256(k.outer_pad || sha256(k.inner_pad || convert_to(m, 'UTF8'))), 'base64') || '.' || m);\n"
                ),
                " SECURITY DEFINER",
            )
        }
        None => (
            "DROP TABLE IF EXISTS pgcache.peer_key;\n".to_owned(),
            format!("BEGIN\n  PERFORM pg_notify('{channel}', {payload});\n"),
            "",
        ),
    };
    let mut sql = format!(
        "BEGIN;\n\
         CREATE SCHEMA IF NOT EXISTS pgcache;\n\
         {key_sql}\
         CREATE OR REPLACE FUNCTION pgcache.notify_write() RETURNS trigger LANGUAGE plpgsql{definer}\n  \
           SET search_path = pg_catalog AS $fn$\n\
         {notify}  \
           RETURN NULL;\n\
         END\n\
         $fn$;\n\
         REVOKE ALL ON FUNCTION pgcache.notify_write() FROM PUBLIC;\n"
    );
    let targets: Vec<String> =
        tables.iter().map(|t| format!("'{}'::regclass", qualified(t).replace('\'', "''"))).collect();
    sql += &format!(
        "DO $prune$ DECLARE r record; BEGIN\n  \
           FOR r IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger\n    \
             WHERE tgname IN ('{TRIGGER}', '{TRUNCATE_TRIGGER}') AND tgrelid <> ALL (ARRAY[{}]::regclass[]) LOOP\n    \
             EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.rel);\n  \
           END LOOP;\n\
         END $prune$;\n",
        targets.join(", ")
    );
    for t in tables {
        let q = qualified(t);
        sql += &format!(
            "CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {q}\n  \
               FOR EACH STATEMENT EXECUTE FUNCTION pgcache.notify_write();\n\
             CREATE OR REPLACE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON {q}\n  \
               FOR EACH STATEMENT EXECUTE FUNCTION pgcache.notify_write();\n"
        );
    }
    sql + "COMMIT;\n"
}

/// What removes every pgcache trigger, the function and the schema (if nothing else is in it).
pub fn uninstall_sql() -> String {
    format!(
        "BEGIN;\n\
         DO $drop$ DECLARE r record; BEGIN\n  \
           FOR r IN SELECT tgname, tgrelid::regclass AS rel FROM pg_trigger WHERE tgname IN ('{TRIGGER}', '{TRUNCATE_TRIGGER}') LOOP\n    \
             EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.rel);\n  \
           END LOOP;\n\
         END $drop$;\n\
         DROP FUNCTION IF EXISTS pgcache.notify_write();\n\
         DROP TABLE IF EXISTS pgcache.peer_key;\n\
         DROP SCHEMA IF EXISTS pgcache;\n\
         COMMIT;\n"
    )
}

/// The tables in `db` that must announce their writes for `rules`.
pub async fn target_tables(catalog: &Catalog, db: &str, rules: &RuleSet) -> Result<Vec<Relation>, TriggerError> {
    let mut named: BTreeSet<Relation> = BTreeSet::new();
    let mut everything = false;
    for rule in rules.rules.iter().filter(|r| r.action == Action::Cache) {
        let m = &rule.matcher;
        if m.database.as_deref().is_some_and(|d| d != db) {
            continue;
        }
        if let Some(tables) = &m.tables {
            named.extend(tables.iter().cloned());
        } else if let Some((sql, _)) = &m.query {
            for c in classify(sql).iter().filter(|c| c.kind == Kind::Select) {
                named.extend(c.reads.iter().cloned());
            }
        } else {
            everything = true;
        }
    }
    let client = catalog.open_client(db).await?;
    let rows = if everything {
        client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgcache') \
                 AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2",
                &[],
            )
            .await?
    } else {
        // Every relation a read of the named ones depends on (views' base tables, partitions,
        // parents), as the cache sees it; then only those that can carry triggers.
        let names: Vec<Relation> = named.into_iter().collect();
        let deps: BTreeSet<Relation> =
            catalog.relations(db, &names).await?.iter().flat_map(|i| i.read_deps.iter().cloned()).collect();
        let (schemas, tables): (Vec<String>, Vec<String>) =
            deps.into_iter().map(|r| (r.schema.unwrap_or_default(), r.name)).unzip();
        client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN unnest($1::text[], $2::text[]) AS t(s, r) ON t.s = n.nspname AND t.r = c.relname \
                 WHERE c.relkind IN ('r', 'p') ORDER BY 1, 2",
                &[&schemas, &tables],
            )
            .await?
    };
    Ok(rows.iter().map(|r| Relation::new(Some(r.get::<_, &str>(0)), r.get::<_, &str>(1))).collect())
}

/// Runs `install`, `uninstall` or `sql` (print the install script) for `db`; returns what was
/// done, for the command line.
pub async fn run(
    catalog: &Catalog,
    db: &str,
    rules: &RuleSet,
    channel: &str,
    key: Option<&[u8; 32]>,
    action: &str,
) -> Result<String, TriggerError> {
    match action {
        "uninstall" => {
            catalog.open_client(db).await?.batch_execute(&uninstall_sql()).await?;
            Ok(format!("{db}: pgcache triggers, function and schema removed"))
        }
        _ => {
            let tables = target_tables(catalog, db, rules).await?;
            let sql = install_sql(channel, &tables, key);
            if action == "sql" {
                return Ok(format!("-- database {db}: {} table(s)\n{sql}", tables.len()));
            }
            catalog.open_client(db).await?.batch_execute(&sql).await?;
            let list: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
            Ok(format!("{db}: triggers on {} table(s): {}", tables.len(), list.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_the_scripts_are_whole_transactions() {
        let sql =
            install_sql("chan", &[Relation::new(Some("public"), "t"), Relation::new(Some("s"), "odd\"name")], None);
        assert!(sql.starts_with("BEGIN;") && sql.ends_with("COMMIT;\n"));
        assert!(sql.contains("ON \"s\".\"odd\"\"name\""), "{sql}");
        assert!(sql.contains("pg_notify('chan'"));
        assert_eq!(sql.matches("CREATE OR REPLACE TRIGGER").count(), 4);
        let un = uninstall_sql();
        assert!(un.contains("DROP SCHEMA IF EXISTS pgcache;") && !un.contains("CASCADE"));
        let signed = install_sql("chan", &[Relation::new(Some("public"), "t")], Some(&[7; 32]));
        assert!(signed.contains("SECURITY DEFINER") && signed.contains("REVOKE ALL ON pgcache.peer_key FROM PUBLIC"));
        assert!(!signed.contains(&"07".repeat(32)), "the key itself is not in the script, only its pads");
    }
}
