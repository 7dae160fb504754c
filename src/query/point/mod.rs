//! Which rows of its one table a statement can touch, as far as equality on a column says:
//! `SELECT … FROM t WHERE id = 5`, `UPDATE t SET … WHERE id = $1`, `DELETE FROM t WHERE id IN
//! (1, 2)`, `INSERT INTO t (id, …) VALUES (7, …)`. The cache uses it to invalidate by key
//! instead of by table (see [`crate::cache::generation`]) — but only for a column the catalog
//! says is the table's single-column integer primary key, so the parse here only collects
//! *candidates*: every column the statement pins to constants or parameters.
//!
//! The parse is deliberately narrow; anything else has no point and is handled table-wide:
//! - a read qualifies with one plain table in FROM, no sub-queries and no function calls
//!   (a function or a sub-query could read other rows of the same table);
//! - a WHERE qualifies through its top-level `AND` conjuncts of `column = constant` or
//!   `column IN (constants)`; an `OR` or anything else around them contributes nothing;
//! - an UPDATE's candidates exclude the columns it assigns (moving a row to another key); an
//!   UPDATE with `FROM` or a DELETE with `USING` has none (`other.id = 5` is another table's);
//! - an INSERT qualifies with an explicit column list and `VALUES` rows (a column is a
//!   candidate when every row gives it a constant), no `ON CONFLICT DO UPDATE` (which updates
//!   a row found by some other value), and no `WITH`.
//!
//! Constants are numbers and plain quoted strings (`5`, `-5`, `'5'`, `'a0eebc99-…'`), read
//! as the key column's type says ([`KeyType`]: integers and UUIDs); anything else (`5.0` for
//! an integer, a cast, an escape string) is no key value, and the statement counts as one on
//! the whole table. Statements that differ only in their
//! literals share one classification ([`super::classifier`]), so a constant is recorded by
//! its place among the statement's literal tokens ([`Value::Literal`]) and read from each
//! text's own literals ([`Point::resolve`]). How values read as a key's type is [`key`]'s.

mod key;

use std::sync::Arc;

use serde_json::Value as Json;

pub use key::{KeyType, KeyValue};

/// A value a candidate column is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A constant's text: a number (with its sign) or a quoted string's contents.
    Const(Arc<str>),
    /// The statement's `$n` parameter (1-based), known only at Bind.
    Param(u16),
    /// Every element of the array bound to `$n` (`id = ANY($1)`).
    ArrayParam(u16),
    /// The statement's `index`th literal token (0-based, as Postgres's lexer counts them),
    /// negated when a minus sign precedes it: the same for every text of one shape, and
    /// turned into [`Value::Const`] for each text by [`Point::resolve`].
    Literal { index: u16, negative: bool },
}

/// The columns a statement pins to values, each with every value it may take (one for
/// `= 5`, several for an `IN` list or a multi-row `INSERT`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Point {
    pub columns: Vec<(String, Vec<Value>)>,
}

impl Point {
    /// The values `column` is pinned to, if it is a candidate.
    pub fn values(&self, column: &str) -> Option<&[Value]> {
        self.columns.iter().find(|(c, _)| c == column).map(|(_, v)| v.as_slice())
    }

    /// Whether some value is still a [`Value::Literal`].
    pub fn has_literals(&self) -> bool {
        self.columns.iter().flat_map(|(_, v)| v).any(|v| matches!(v, Value::Literal { .. }))
    }

    /// This point for a text whose literal tokens are `literals` (their text as written):
    /// literals become constants; a column with a literal that cannot be read plainly (an
    /// escape or dollar-quoted string) is no candidate.
    pub fn resolve(&self, literals: &[&str]) -> Option<Point> {
        let columns: Vec<(String, Vec<Value>)> = self
            .columns
            .iter()
            .filter_map(|(c, values)| {
                let values = values
                    .iter()
                    .map(|v| match *v {
                        Value::Literal { index, negative } => {
                            let text = literal_text(literals.get(usize::from(index))?)?;
                            Some(Value::Const(if negative { format!("-{text}").into() } else { text.into() }))
                        }
                        ref other => Some(other.clone()),
                    })
                    .collect::<Option<Vec<_>>>()?;
                Some((c.clone(), values))
            })
            .collect();
        (!columns.is_empty()).then_some(Point { columns })
    }
}

/// A literal token's value as text: a number as written, or a plain quoted string's contents.
fn literal_text(token: &str) -> Option<&str> {
    match token.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        Some(inner) if !inner.contains(['\'', '\\']) => Some(inner),
        Some(_) => None,
        None if token.starts_with(|c: char| c.is_ascii_digit() || c == '.') => Some(token),
        None => None,
    }
}

/// The point of a statement (`top` is its node type, `node` its body, `sql` its text), or
/// `None`. `calls_functions` says whether it calls any function (which rules a read out).
/// Constants are [`Value::Literal`]s.
pub fn of(sql: &str, top: &str, node: &Json, calls_functions: bool) -> Option<Point> {
    let mut point = candidates(top, node, calls_functions)?;
    let consts = point.columns.iter().flat_map(|(_, v)| v).any(|v| matches!(v, Value::Literal { .. }));
    if consts {
        // Until here a constant's `index` is its byte offset in `sql`.
        let starts = literal_starts(sql)?;
        for (_, values) in &mut point.columns {
            for v in values.iter_mut() {
                if let Value::Literal { index, negative } = v {
                    let at = usize::from(*index);
                    *negative = sql.as_bytes().get(at) == Some(&b'-');
                    *index = u16::try_from(starts.iter().position(|s| *s >= at)?).ok()?;
                }
            }
        }
    }
    Some(point)
}

/// The byte offsets of the literal tokens of `sql`.
fn literal_starts(sql: &str) -> Option<Vec<usize>> {
    Some(super::literals::literals(sql)?.iter().map(|l| l.start).collect())
}

fn candidates(top: &str, node: &Json, calls_functions: bool) -> Option<Point> {
    if !node["with_clause"].is_null() {
        return None;
    }
    let mut columns = match top {
        "SelectStmt" => {
            let from = node["from_clause"].as_array()?;
            let single_table = from.len() == 1 && from[0]["node"].get("RangeVar").is_some();
            if !single_table || calls_functions || node["op"].as_i64() != Some(1) || mentions(node, "SubLink") {
                return None;
            }
            conjuncts(&node["where_clause"])
        }
        // With other relations joined in (`UPDATE … FROM`, `DELETE … USING`), `other.id = 5`
        // pins the other relation's column, not the target's: no point.
        "UpdateStmt" if node["from_clause"].as_array().is_some_and(|f| !f.is_empty()) => return None,
        "DeleteStmt" if node["using_clause"].as_array().is_some_and(|u| !u.is_empty()) => return None,
        "UpdateStmt" => {
            let assigned: Vec<&str> = node["target_list"]
                .as_array()?
                .iter()
                .filter_map(|t| t["node"]["ResTarget"]["name"].as_str())
                .collect();
            let mut c = conjuncts(&node["where_clause"]);
            c.retain(|(col, _)| !assigned.contains(&col.as_str()));
            c
        }
        "DeleteStmt" => conjuncts(&node["where_clause"]),
        "InsertStmt" => insert_values(node)?,
        _ => return None,
    };
    columns.retain(|(_, values)| !values.is_empty());
    (!columns.is_empty()).then_some(Point { columns })
}

/// `column = constant` and `column IN (constants)` among the top-level AND conjuncts.
fn conjuncts(clause: &Json) -> Vec<(String, Vec<Value>)> {
    let node = &clause["node"];
    if let Some(b) = node.get("BoolExpr") {
        // BoolExprType: 1 = AND_EXPR.
        if b["boolop"].as_i64() != Some(1) {
            return Vec::new();
        }
        return b["args"].as_array().into_iter().flatten().flat_map(conjuncts).collect();
    }
    let Some(e) = node.get("AExpr") else { return Vec::new() };
    let op = e["name"].as_array().map(|n| n.iter().map(|p| p["node"]["String"]["sval"].as_str()).collect::<Vec<_>>());
    if op.as_deref() != Some(&[Some("=")]) {
        return Vec::new();
    }
    // A_Expr_Kind: 1 = AEXPR_OP, 2 = AEXPR_OP_ANY, 7 = AEXPR_IN.
    match e["kind"].as_i64() {
        Some(2) => {
            let Some(c) = column(&e["lexpr"]) else { return Vec::new() };
            let r = &e["rexpr"]["node"];
            let values = if let Some(items) = r["AArrayExpr"]["elements"].as_array() {
                items.iter().map(value).collect::<Option<Vec<Value>>>()
            } else {
                array_param(r).map(|n| vec![Value::ArrayParam(n)])
            };
            values.map(|v| vec![(c, v)]).unwrap_or_default()
        }
        Some(1) => {
            let (l, r) = (&e["lexpr"], &e["rexpr"]);
            let found = match (column(l), column(r)) {
                (Some(c), None) => value(r).map(|v| (c, v)),
                (None, Some(c)) => value(l).map(|v| (c, v)),
                _ => None,
            };
            found.map(|(c, v)| vec![(c, vec![v])]).unwrap_or_default()
        }
        Some(7) => {
            let Some(c) = column(&e["lexpr"]) else { return Vec::new() };
            let Some(items) = e["rexpr"]["node"]["List"]["items"].as_array() else { return Vec::new() };
            let values: Option<Vec<Value>> = items.iter().map(value).collect();
            values.map(|v| vec![(c, v)]).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// The column an expression names, unqualified (`a.id` → `id`).
fn column(expr: &Json) -> Option<String> {
    let fields = expr["node"]["ColumnRef"]["fields"].as_array()?;
    fields.last()?["node"]["String"]["sval"].as_str().map(str::to_owned)
}

/// A constant (a [`Value::Literal`] whose `index` is its byte offset, for [`of`] to turn into
/// its place among the literals) or a parameter.
fn value(expr: &Json) -> Option<Value> {
    let node = &expr["node"];
    if let Some(cast) = node.get("TypeCast") {
        // A cast to a key type (`$1::INTEGER`, as SQLAlchemy writes parameters; `'…'::uuid`)
        // keeps the value; its text is still read as the column's type, so a cast that would
        // round (`5.7::int`) reads as nothing.
        return key_type_name(&cast["type_name"]).then(|| value(&cast["arg"])).flatten();
    }
    if let Some(p) = node.get("ParamRef") {
        return p["number"].as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0).map(Value::Param);
    }
    let c = &node["AConst"];
    let val = &c["val"];
    let number_or_string = ["Ival", "Fval", "Sval"].iter().any(|k| val.get(k).is_some());
    let at = c["location"].as_u64().and_then(|l| u16::try_from(l).ok())?;
    number_or_string.then_some(Value::Literal { index: at, negative: false })
}

/// The candidate columns of `INSERT … (cols) VALUES …`. With `ON CONFLICT (col) DO UPDATE`
/// the row updated is the one holding the inserted value of `col`, so `col` is the only
/// candidate (unless the update assigns it).
fn insert_values(node: &Json) -> Option<Vec<(String, Vec<Value>)>> {
    // OnConflictAction: 2 = ONCONFLICT_NOTHING, 3 = ONCONFLICT_UPDATE.
    let conflict = &node["on_conflict_clause"];
    let only = match conflict["action"].as_i64() {
        _ if conflict.is_null() => None,
        Some(2) => None,
        Some(3) => Some(upsert_column(conflict)?),
        _ => return None,
    };
    let select = node["select_stmt"]["node"].get("SelectStmt")?;
    let plain = select["with_clause"].is_null() && select["from_clause"].as_array().is_none_or(Vec::is_empty);
    let rows = select["values_lists"].as_array().filter(|r| plain && !r.is_empty())?;
    let rows: Vec<&Vec<Json>> = rows.iter().map(|r| r["node"]["List"]["items"].as_array()).collect::<Option<_>>()?;
    let mut out = Vec::new();
    for (i, col) in node["cols"].as_array()?.iter().enumerate() {
        let target = &col["node"]["ResTarget"];
        if target["indirection"].as_array().is_some_and(|ind| !ind.is_empty()) {
            continue;
        }
        let Some(name) = target["name"].as_str() else { continue };
        let values: Option<Vec<Value>> = rows.iter().map(|r| r.get(i).and_then(value)).collect();
        if let Some(values) = values
            && only.as_ref().is_none_or(|o| o == name)
        {
            out.push((name.to_owned(), values));
        }
    }
    Some(out)
}

/// The one column an `ON CONFLICT (col) DO UPDATE` arbitrates on, if its update leaves it
/// alone.
fn upsert_column(conflict: &Json) -> Option<String> {
    let infer = &conflict["infer"];
    let [elem] = infer["index_elems"].as_array()?.as_slice() else { return None };
    let column = elem["node"]["IndexElem"]["name"].as_str().filter(|c| !c.is_empty())?;
    let assigns =
        conflict["target_list"].as_array()?.iter().any(|t| t["node"]["ResTarget"]["name"].as_str() == Some(column));
    (!assigns).then(|| column.to_owned())
}

/// `$n`, or `$n` cast to an array of a key type (`$1::int8[]`).
fn array_param(node: &Json) -> Option<u16> {
    let (param, cast) = match node.get("TypeCast") {
        Some(cast) => (&cast["arg"]["node"]["ParamRef"], Some(&cast["type_name"])),
        None => (&node["ParamRef"], None),
    };
    if let Some(t) = cast {
        let array = t["array_bounds"].as_array().is_some_and(|b| b.len() == 1);
        let scalar = serde_json::json!({ "names": t["names"].clone() });
        if !array || !key_type_name(&scalar) {
            return None;
        }
    }
    param["number"].as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0)
}

/// Whether a TypeName is `int2`, `int4`, `int8` or `uuid` (the built-in ones), not an array.
fn key_type_name(type_name: &Json) -> bool {
    let names: Vec<&str> = type_name["names"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node"]["String"]["sval"].as_str())
        .collect();
    let builtin = match names.as_slice() {
        [name] | ["pg_catalog", name] => Some(*name),
        _ => None,
    };
    let scalar = type_name["array_bounds"].as_array().is_none_or(Vec::is_empty);
    scalar && builtin.is_some_and(|n| matches!(n, "int2" | "int4" | "int8" | "uuid"))
}

/// Whether a node of this type occurs anywhere in `v`.
fn mentions(v: &Json, node_type: &str) -> bool {
    match v {
        Json::Object(map) => map.iter().any(|(k, child)| k == node_type || mentions(child, node_type)),
        Json::Array(items) => items.iter().any(|i| mentions(i, node_type)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of `sql` with its literals resolved from its own text.
    fn point(sql: &str) -> Option<Point> {
        let tree = serde_json::to_value(pg_query::parse(sql, 0).unwrap().protobuf).unwrap();
        let (top, node) = tree["stmts"][0]["stmt"]["node"].as_object().unwrap().iter().next().unwrap();
        let calls = !pg_query::summary(sql, 0, -1).unwrap().functions.is_empty();
        let p = of(sql, top, node, calls)?;
        let literals: Vec<&str> =
            crate::query::literals::literals(sql).unwrap().iter().map(|l| &sql[l.start..l.end]).collect();
        p.resolve(&literals)
    }

    fn cols(sql: &str) -> Vec<(String, Vec<Value>)> {
        point(sql).map(|p| p.columns).unwrap_or_default()
    }

    use Value::Param;

    /// A constant.
    fn k(text: &str) -> Value {
        Value::Const(text.into())
    }

    #[test]
    fn reads_pinned_by_equality_have_points() {
        assert_eq!(cols("SELECT abalance FROM accounts WHERE aid = 5"), [("aid".into(), vec![k("5")])]);
        assert_eq!(
            cols("SELECT * FROM accounts a WHERE a.aid = $1 AND 7 = bid"),
            [("aid".into(), vec![Param(1)]), ("bid".into(), vec![k("7")])]
        );
        assert_eq!(
            cols("SELECT * FROM t WHERE id IN (1, -2, '3') ORDER BY id LIMIT 2"),
            [("id".into(), vec![k("1"), k("-2"), k("3")])]
        );
        assert_eq!(cols("SELECT * FROM t WHERE id = 0"), [("id".into(), vec![k("0")])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = 5000000000"), [("id".into(), vec![k("5000000000")])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = - 5 AND 'x' = 'x'"), [("id".into(), vec![k("-5")])]);
        // Casts to key types, as SQLAlchemy renders parameters.
        assert_eq!(cols("SELECT * FROM t WHERE t.id = $1::INTEGER"), [("id".into(), vec![Param(1)])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = 5::int8"), [("id".into(), vec![k("5")])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = 5.7::int"), [("id".into(), vec![k("5.7")])], "read as nothing");
        assert_eq!(cols("SELECT * FROM t WHERE id = '00000000-0000-0000-0000-000000000001'::uuid").len(), 1);
        // = ANY of an array parameter or an ARRAY[...] of constants.
        assert_eq!(cols("SELECT * FROM t WHERE id = ANY($1)"), [("id".into(), vec![Value::ArrayParam(1)])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = ANY($2::int8[])"), [("id".into(), vec![Value::ArrayParam(2)])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = ANY(ARRAY[1, $1])"), [("id".into(), vec![k("1"), Param(1)])]);
    }

    #[test]
    fn literals_are_read_from_each_text_of_a_shape() {
        let sql = "SELECT * FROM t WHERE v = 'a' AND id = 5";
        let tree = serde_json::to_value(pg_query::parse(sql, 0).unwrap().protobuf).unwrap();
        let (top, node) = tree["stmts"][0]["stmt"]["node"].as_object().unwrap().iter().next().unwrap();
        let shared = of(sql, top, node, false).unwrap();
        assert!(shared.has_literals());
        // Another text of the same shape: `... v = 'bb' AND id = 77`.
        let other = shared.resolve(&["'bb'", "77"]).unwrap();
        assert_eq!(other.columns, [("v".to_owned(), vec![k("bb")]), ("id".to_owned(), vec![k("77")])]);
        assert!(!other.has_literals());
        assert_eq!(
            shared.resolve(&["'5'", "'12'"]).unwrap().columns,
            [("v".to_owned(), vec![k("5")]), ("id".to_owned(), vec![k("12")])]
        );
        let id_of = |literals: &[&str]| shared.resolve(literals).and_then(|p| p.values("id").map(<[Value]>::to_vec));
        assert_eq!(id_of(&["'a'", "E'1'"]), None, "escape strings are not read");
        assert_eq!(id_of(&["'a'", "$$1$$"]), None, "dollar-quoted strings are not read");
    }

    #[test]
    fn reads_that_may_see_other_rows_have_none() {
        for sql in [
            "SELECT * FROM t WHERE id = 5 OR id = 6",
            "SELECT * FROM t WHERE id = 5::numeric",
            "SELECT * FROM t WHERE id = $1::int8[]",
            "SELECT * FROM t WHERE id = $1::myschema.int8",
            "SELECT * FROM t WHERE id = ANY($1::text[])",
            "SELECT * FROM t WHERE id = ANY('{1,2}')",
            "SELECT * FROM t WHERE id <> ANY($1)",
            "SELECT * FROM t WHERE id = ALL($1)",
            "SELECT * FROM t WHERE id > 5",
            "SELECT * FROM t WHERE id = (SELECT max(id) FROM t)",
            "SELECT * FROM t WHERE id = 5 AND EXISTS (SELECT 1 FROM t u WHERE u.v = 1)",
            "SELECT * FROM t, u WHERE t.id = 5",
            "SELECT * FROM t JOIN u USING (id) WHERE id = 5",
            "SELECT f(id) FROM t WHERE id = 5",
            "SELECT * FROM t WHERE id = 5 UNION SELECT * FROM t WHERE id = 6",
            "WITH x AS (SELECT * FROM t) SELECT * FROM t WHERE id = 5",
            "SELECT * FROM t WHERE id = OPERATOR(myschema.=) 5",
            "SELECT * FROM t WHERE id = other",
        ] {
            assert_eq!(point(sql), None, "{sql}");
        }
    }

    #[test]
    fn writes_have_the_rows_they_change() {
        assert_eq!(cols("UPDATE t SET v = v + 1 WHERE id = $2"), [("id".into(), vec![Param(2)])]);
        assert_eq!(cols("UPDATE t SET id = 9 WHERE id = 5"), []);
        assert_eq!(cols("UPDATE t SET v = now() WHERE id = 5 AND v > 0"), [("id".into(), vec![k("5")])]);
        assert_eq!(cols("DELETE FROM t WHERE id IN ($1, $2)"), [("id".into(), vec![Param(1), Param(2)])]);
        assert_eq!(
            cols("INSERT INTO t (id, v) VALUES (1, 'a'), ($1, DEFAULT) ON CONFLICT DO NOTHING"),
            [("id".into(), vec![k("1"), Param(1)])]
        );
        assert_eq!(
            cols("INSERT INTO t (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"),
            [("id".into(), vec![Param(1)])],
            "an upsert changes the row of the key it inserts"
        );
        assert_eq!(
            cols("INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (v) DO UPDATE SET w = 3"),
            [("v".into(), vec![k("2")])],
            "arbitrated on another column: only that one (not the key) is a candidate"
        );
        for sql in [
            "INSERT INTO t VALUES (1, 'a')",
            "INSERT INTO t (id) SELECT 1",
            "INSERT INTO t (id) VALUES (DEFAULT)",
            "INSERT INTO t (id) VALUES (1) ON CONFLICT (id) DO UPDATE SET id = 2",
            "INSERT INTO t (id) VALUES (1) ON CONFLICT ON CONSTRAINT t_pkey DO UPDATE SET v = 2",
            "INSERT INTO t (id, v) VALUES (1, 2) ON CONFLICT (id, v) DO UPDATE SET w = 2",
            "INSERT INTO t (id) VALUES (1) ON CONFLICT ((id + 1)) DO UPDATE SET v = 2",
            "WITH d AS (DELETE FROM u RETURNING id) UPDATE t SET v = 1 WHERE id = 5",
            "DELETE FROM t WHERE id = 5 OR v = 1",
            "UPDATE t SET v = 1 WHERE CURRENT OF c",
            "UPDATE t SET v = 1 FROM other WHERE other.id = 5",
            "UPDATE t SET v = 1 FROM other o WHERE t.id = o.ref AND o.id = 5",
            "DELETE FROM t USING other WHERE other.id = 5 AND t.ref = other.ref",
        ] {
            assert_eq!(point(sql), None, "{sql}");
        }
    }
}
