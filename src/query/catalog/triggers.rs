//! What a relation's user triggers may write, read from their functions' bodies: a PL/pgSQL
//! function (parsed with libpg_query's PL/pgSQL parser) or an SQL one is classified statement
//! by statement, like any query, and a write to a table with such triggers invalidates the
//! tables its triggers write (by name, in every schema) — not everything. What cannot be known
//! stays unknown, and invalidates wide: dynamic SQL (`EXECUTE`), another language, a volatile
//! user function called from the body, a statement that cannot be parsed, or a body that sets
//! settings (`SET`, `set_config`: a trigger can change the session's state).

use std::collections::BTreeSet;

use serde_json::Value;

use super::{Catalog, CatalogError};
use crate::query::Relation;
use crate::query::classify::{Kind, classify};

/// What a relation's triggers do, as far as their functions' bodies say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TriggerEffects {
    /// Relations they write (qualified when the body qualifies them).
    pub writes: BTreeSet<Relation>,
    /// Something they do cannot be known.
    pub unknown: bool,
}

/// libpg_query's `PgQueryPlpgsqlParseResult`.
#[repr(C)]
struct PlpgsqlParseResult {
    plpgsql_funcs: *mut std::os::raw::c_char,
    error: *mut std::ffi::c_void,
}

unsafe extern "C" {
    fn pg_query_parse_plpgsql(input: *const std::os::raw::c_char) -> PlpgsqlParseResult;
    fn pg_query_free_plpgsql_parse_result(result: PlpgsqlParseResult);
}

/// The PL/pgSQL parse tree of a `CREATE FUNCTION` statement, as JSON.
///
/// Not `pg_query::parse_plpgsql`: libpg_query (as bundled with pg_query 18.1) writes a
/// trigger function's implicit variables (`TG_NAME`, ...) into the `datums` array as `{}}`,
/// which is not JSON, so the crate's call fails for every trigger function. The tree itself
/// (`action`) is whole; the datums are not needed. So the library is called directly (the same
/// function, linked by pg_query) and the `datums` array dropped before the JSON is read.
fn plpgsql_tree(definition: &str) -> Option<Value> {
    let input = std::ffi::CString::new(definition).ok()?;
    // SAFETY: a NUL-terminated input; the result is read (a NUL-terminated string, when there
    // is no error) before it is freed once, as libpg_query's API says.
    let raw = unsafe {
        let result = pg_query_parse_plpgsql(input.as_ptr());
        let text = (result.error.is_null() && !result.plpgsql_funcs.is_null())
            .then(|| std::ffi::CStr::from_ptr(result.plpgsql_funcs).to_string_lossy().into_owned());
        pg_query_free_plpgsql_parse_result(result);
        text?
    };
    serde_json::from_str(&without_datums(&raw)).ok()
}

/// `raw` with every `"datums":[...]` array removed (brackets counted outside strings).
fn without_datums(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find("\"datums\":[") {
        out.push_str(&rest[..at]);
        let array = &rest[at + "\"datums\":".len()..];
        let (mut depth, mut in_string, mut escaped, mut end) = (0usize, false, false, array.len());
        for (i, ch) in array.char_indices() {
            match ch {
                _ if escaped => escaped = false,
                '\\' if in_string => escaped = true,
                '"' => in_string = !in_string,
                '[' if !in_string => depth += 1,
                ']' if !in_string => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push_str("\"datums\":[]");
        rest = &array[end..];
    }
    out.push_str(rest);
    out
}

/// The SQL a PL/pgSQL body runs, and whether it runs SQL that cannot be read (`EXECUTE`).
fn plpgsql_queries(definition: &str) -> Option<(Vec<String>, bool)> {
    let tree = plpgsql_tree(definition)?;
    let mut queries = Vec::new();
    let mut dynamic = false;
    walk(&tree, &mut queries, &mut dynamic);
    Some((queries, dynamic))
}

fn walk(v: &Value, queries: &mut Vec<String>, dynamic: &mut bool) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match k.as_str() {
                    "PLpgSQL_stmt_dynexecute" | "PLpgSQL_stmt_dynfors" => *dynamic = true,
                    "PLpgSQL_stmt_open" if child.get("dynquery").is_some() => *dynamic = true,
                    "PLpgSQL_expr" => {
                        if let Some(q) = child.get("query").and_then(Value::as_str) {
                            queries.push(q.to_owned());
                        }
                    }
                    _ => {}
                }
                walk(child, queries, dynamic);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| walk(i, queries, dynamic)),
        _ => {}
    }
}

impl Catalog {
    /// The effects of the user triggers on relation `oid` in `db`.
    pub(super) async fn trigger_effects(
        &self,
        client: &tokio_postgres::Client,
        db: &str,
        oid: i64,
    ) -> Result<TriggerEffects, CatalogError> {
        let rows = client
            .query(
                "SELECT l.lanname::text, pg_catalog.pg_get_functiondef(p.oid), p.prosrc \
                 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_language l ON l.oid = p.prolang \
                 WHERE t.tgrelid = $1::int8::oid AND NOT t.tgisinternal AND t.tgenabled <> 'D' \
                   AND t.tgname NOT IN ('pgcache_invalidate', 'pgcache_invalidate_truncate')",
                &[&oid],
            )
            .await?;
        let mut out = TriggerEffects::default();
        let mut functions = Vec::new();
        for row in rows {
            let (language, definition, source): (String, String, String) = (row.get(0), row.get(1), row.get(2));
            let queries = match language.as_str() {
                "plpgsql" => match plpgsql_queries(&definition) {
                    Some((queries, dynamic)) => {
                        out.unknown |= dynamic;
                        queries
                    }
                    None => {
                        out.unknown = true;
                        continue;
                    }
                },
                "sql" => vec![source],
                _ => {
                    out.unknown = true;
                    continue;
                }
            };
            for q in queries {
                // An expression (`NEW.id + 1`) is evaluated as a SELECT of it.
                let mut classified = classify(&q);
                if classified.iter().any(|c| c.kind == Kind::Unparseable) {
                    classified = classify(&format!("SELECT {q}"));
                }
                for c in classified {
                    match c.kind {
                        Kind::Select | Kind::Write | Kind::Neutral => {}
                        _ => out.unknown = true,
                    }
                    out.unknown |= c.settings.changes;
                    out.writes.extend(c.writes.iter().cloned());
                    functions.extend(c.functions.iter().cloned());
                }
            }
        }
        if !out.unknown && !functions.is_empty() {
            out.unknown |= self.functions(db, &functions).await?.iter().any(|f| f.may_write);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plpgsql_body_gives_its_statements_and_flags_dynamic_sql() {
        // As pg_get_functiondef writes a trigger function (whose datums libpg_query garbles).
        let def = "CREATE OR REPLACE FUNCTION public.log_it()\n RETURNS trigger\n LANGUAGE plpgsql\n\
            AS $function$ BEGIN INSERT INTO audit VALUES (1); RETURN NEW; END $function$\n";
        let (queries, _) = plpgsql_queries(def).expect("parsed");
        assert_eq!(queries, vec!["INSERT INTO audit VALUES (1)".to_owned()]);
        let def = "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ \
            BEGIN INSERT INTO audit.log VALUES (NEW.id); UPDATE counts SET n = n + 1; \
            IF NEW.id > 10 THEN PERFORM 1; END IF; RETURN NEW; END $$";
        let (queries, dynamic) = plpgsql_queries(def).unwrap();
        assert!(!dynamic);
        assert!(queries.iter().any(|q| q.contains("INSERT INTO audit.log")), "{queries:?}");
        assert!(queries.iter().any(|q| q.contains("UPDATE counts")), "{queries:?}");
        let def = "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ \
            BEGIN EXECUTE 'DELETE FROM ' || TG_ARGV[0]; RETURN NULL; END $$";
        assert!(plpgsql_queries(def).unwrap().1, "EXECUTE is dynamic");
    }
}
