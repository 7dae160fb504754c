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

use pg_query::protobuf::{
    AExprKind, BoolExprType, InsertStmt, Node, OnConflictAction, OnConflictClause, ParamRef, ResTarget, SetOperation,
    TypeName, a_const,
};
use pg_query::{NodeEnum, NodeRef};

use super::walk::{mentions, strings};

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
    /// negated when the constant is negative (the parser folds the signs before a number into
    /// it): the same for every text of one shape, and
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

/// The point of the statement `node` (its text is `sql`, which starts at byte `base` of the
/// string the tree was parsed from), or `None`. `calls_functions` says whether it calls any
/// function (which rules a read out). Constants are [`Value::Literal`]s.
pub fn of(sql: &str, base: usize, node: NodeRef<'_>, calls_functions: bool) -> Option<Point> {
    let mut point = candidates(node, calls_functions)?;
    let consts = point.columns.iter().flat_map(|(_, v)| v).any(|v| matches!(v, Value::Literal { .. }));
    if consts {
        // Until here a constant's `index` is its byte offset in what was parsed.
        let starts = literal_starts(sql)?;
        for (_, values) in &mut point.columns {
            for v in values.iter_mut() {
                if let Value::Literal { index, .. } = v {
                    let at = usize::from(*index).checked_sub(base)?;
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

fn candidates(node: NodeRef<'_>, calls_functions: bool) -> Option<Point> {
    let mut columns = match node {
        NodeRef::SelectStmt(s) => {
            let single_table = matches!(s.from_clause.as_slice(), [t] if matches!(t.node, Some(NodeEnum::RangeVar(_))));
            if s.with_clause.is_some()
                || !single_table
                || calls_functions
                || s.op != SetOperation::SetopNone as i32
                || mentions(node, |n| matches!(n, NodeRef::SubLink(_)))
            {
                return None;
            }
            conjuncts(s.where_clause.as_deref())
        }
        // With other relations joined in (`UPDATE … FROM`, `DELETE … USING`), `other.id = 5`
        // pins the other relation's column, not the target's: no point.
        NodeRef::UpdateStmt(u) if u.with_clause.is_some() || !u.from_clause.is_empty() => return None,
        NodeRef::DeleteStmt(d) if d.with_clause.is_some() || !d.using_clause.is_empty() => return None,
        NodeRef::UpdateStmt(u) => {
            let assigned: Vec<&str> = u.target_list.iter().filter_map(res_target).map(|t| t.name.as_str()).collect();
            let mut c = conjuncts(u.where_clause.as_deref());
            c.retain(|(col, _)| !assigned.contains(&col.as_str()));
            c
        }
        NodeRef::DeleteStmt(d) => conjuncts(d.where_clause.as_deref()),
        NodeRef::InsertStmt(i) if i.with_clause.is_none() => insert_values(i)?,
        _ => return None,
    };
    columns.retain(|(_, values)| !values.is_empty());
    (!columns.is_empty()).then_some(Point { columns })
}

/// `column = constant` and `column IN (constants)` among the top-level AND conjuncts.
fn conjuncts(clause: Option<&Node>) -> Vec<(String, Vec<Value>)> {
    let e = match clause.and_then(|c| c.node.as_ref()) {
        Some(NodeEnum::BoolExpr(b)) if b.boolop == BoolExprType::AndExpr as i32 => {
            return b.args.iter().flat_map(|a| conjuncts(Some(a))).collect();
        }
        Some(NodeEnum::AExpr(e)) => e,
        _ => return Vec::new(),
    };
    if strings(&e.name) != ["="] {
        return Vec::new();
    }
    let (lexpr, rexpr) = (e.lexpr.as_deref(), e.rexpr.as_deref());
    match AExprKind::try_from(e.kind) {
        Ok(AExprKind::AexprOpAny) => {
            let Some(c) = column(lexpr) else { return Vec::new() };
            let values = match rexpr.and_then(|r| r.node.as_ref()) {
                Some(NodeEnum::AArrayExpr(a)) => a.elements.iter().map(value).collect::<Option<Vec<Value>>>(),
                r => array_param(r).map(|n| vec![Value::ArrayParam(n)]),
            };
            values.map(|v| vec![(c, v)]).unwrap_or_default()
        }
        Ok(AExprKind::AexprOp) => {
            let found = match (column(lexpr), column(rexpr)) {
                (Some(c), None) => rexpr.and_then(value).map(|v| (c, v)),
                (None, Some(c)) => lexpr.and_then(value).map(|v| (c, v)),
                _ => None,
            };
            found.map(|(c, v)| vec![(c, vec![v])]).unwrap_or_default()
        }
        Ok(AExprKind::AexprIn) => {
            let Some(c) = column(lexpr) else { return Vec::new() };
            let Some(NodeEnum::List(list)) = rexpr.and_then(|r| r.node.as_ref()) else { return Vec::new() };
            let values: Option<Vec<Value>> = list.items.iter().map(value).collect();
            values.map(|v| vec![(c, v)]).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// The column an expression names, unqualified (`a.id` → `id`).
fn column(expr: Option<&Node>) -> Option<String> {
    let Some(NodeEnum::ColumnRef(c)) = expr?.node.as_ref() else { return None };
    match c.fields.last()?.node.as_ref()? {
        NodeEnum::String(s) => Some(s.sval.clone()),
        _ => None,
    }
}

/// A constant (a [`Value::Literal`] whose `index` is its byte offset, for [`of`] to turn into
/// its place among the literals) or a parameter.
fn value(expr: &Node) -> Option<Value> {
    match expr.node.as_ref()? {
        // A cast to a key type (`$1::INTEGER`, as SQLAlchemy writes parameters; `'…'::uuid`)
        // keeps the value; its text is still read as the column's type, so a cast that would
        // round (`5.7::int`) reads as nothing.
        NodeEnum::TypeCast(cast) => {
            key_type_name(cast.type_name.as_ref()?, false).then(|| value(cast.arg.as_deref()?)).flatten()
        }
        NodeEnum::ParamRef(p) => param_number(p).map(Value::Param),
        NodeEnum::AConst(c) => {
            // A negated number is one constant located at its sign (`-5`; `- -5` is 5, at the
            // first sign): the sign comes from the value, the digits from the first literal
            // token from there on.
            let negative = match &c.val {
                Some(a_const::Val::Ival(i)) => i.ival < 0,
                Some(a_const::Val::Fval(f)) => f.fval.starts_with('-'),
                Some(a_const::Val::Sval(_)) => false,
                _ => return None,
            };
            let at = u16::try_from(c.location).ok()?;
            Some(Value::Literal { index: at, negative })
        }
        _ => None,
    }
}

/// A parameter's number, if it is one (`$n`, n ≥ 1).
fn param_number(p: &ParamRef) -> Option<u16> {
    u16::try_from(p.number).ok().filter(|n| *n > 0)
}

/// A `ResTarget` node (an assignment or a named column).
fn res_target(node: &Node) -> Option<&ResTarget> {
    match node.node.as_ref()? {
        NodeEnum::ResTarget(t) => Some(t),
        _ => None,
    }
}

/// The candidate columns of `INSERT … (cols) VALUES …`. With `ON CONFLICT (col) DO UPDATE`
/// the row updated is the one holding the inserted value of `col`, so `col` is the only
/// candidate (unless the update assigns it).
fn insert_values(insert: &InsertStmt) -> Option<Vec<(String, Vec<Value>)>> {
    let only = match insert.on_conflict_clause.as_deref() {
        None => None,
        Some(c) if c.action == OnConflictAction::OnconflictNothing as i32 => None,
        Some(c) if c.action == OnConflictAction::OnconflictUpdate as i32 => Some(upsert_column(c)?),
        Some(_) => return None,
    };
    let Some(NodeEnum::SelectStmt(select)) = insert.select_stmt.as_deref().and_then(|s| s.node.as_ref()) else {
        return None;
    };
    let plain = select.with_clause.is_none() && select.from_clause.is_empty();
    if !plain || select.values_lists.is_empty() {
        return None;
    }
    let rows: Vec<&[Node]> = select
        .values_lists
        .iter()
        .map(|r| match r.node.as_ref() {
            Some(NodeEnum::List(l)) => Some(l.items.as_slice()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let mut out = Vec::new();
    for (i, col) in insert.cols.iter().enumerate() {
        let target = res_target(col)?;
        if !target.indirection.is_empty() {
            continue;
        }
        let values: Option<Vec<Value>> = rows.iter().map(|r| r.get(i).and_then(value)).collect();
        if let Some(values) = values
            && only.as_ref().is_none_or(|o| *o == target.name)
        {
            out.push((target.name.clone(), values));
        }
    }
    Some(out)
}

/// The one column an `ON CONFLICT (col) DO UPDATE` arbitrates on, if its update leaves it
/// alone.
fn upsert_column(conflict: &OnConflictClause) -> Option<String> {
    let [elem] = conflict.infer.as_deref()?.index_elems.as_slice() else { return None };
    let Some(NodeEnum::IndexElem(elem)) = elem.node.as_ref() else { return None };
    let column = Some(elem.name.as_str()).filter(|c| !c.is_empty())?;
    let assigns = conflict.target_list.iter().filter_map(res_target).any(|t| t.name == column);
    (!assigns).then(|| column.to_owned())
}

/// `$n`, or `$n` cast to an array of a key type (`$1::int8[]`).
fn array_param(node: Option<&NodeEnum>) -> Option<u16> {
    let param = match node? {
        NodeEnum::TypeCast(cast) if key_type_name(cast.type_name.as_ref()?, true) => {
            cast.arg.as_deref()?.node.as_ref()?
        }
        other => other,
    };
    match param {
        NodeEnum::ParamRef(p) => param_number(p),
        _ => None,
    }
}

/// Whether a TypeName is `int2`, `int4`, `int8` or `uuid` (the built-in ones) — a one-
/// dimensional array of one when `array`, else not an array.
fn key_type_name(type_name: &TypeName, array: bool) -> bool {
    let builtin = match strings(&type_name.names).as_slice() {
        [name] | ["pg_catalog", name] => Some(*name),
        _ => None,
    };
    let shape = if array { type_name.array_bounds.len() == 1 } else { type_name.array_bounds.is_empty() };
    shape && builtin.is_some_and(|n| matches!(n, "int2" | "int4" | "int8" | "uuid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The point of `sql` with its literals resolved from its own text.
    fn point(sql: &str) -> Option<Point> {
        let tree = pg_query::parse(sql, 0).unwrap().protobuf;
        let node = tree.stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref()).unwrap();
        let calls = !pg_query::summary(sql, 0, -1).unwrap().functions.is_empty();
        let p = of(sql, 0, node.to_ref(), calls)?;
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
        assert_eq!(cols("SELECT * FROM t WHERE id = - -5"), [("id".into(), vec![k("5")])], "two signs");
        assert_eq!(cols("SELECT * FROM t WHERE id = -(-5)"), [("id".into(), vec![k("5")])]);
        assert_eq!(cols("SELECT * FROM t WHERE id = -(-(-5.5))"), [("id".into(), vec![k("-5.5")])]);
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
        let tree = pg_query::parse(sql, 0).unwrap().protobuf;
        let node = tree.stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref()).unwrap();
        let shared = of(sql, 0, node.to_ref(), false).unwrap();
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
