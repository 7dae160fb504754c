//! Walks over a statement's parse tree, read as pg_query's typed nodes: every node below a
//! node ([`children`], generated from pg_query's own node definitions by
//! `scripts/gen_children.py`, so no field of any node type is missed) and each node type's
//! name ([`name`]).

mod children;
mod names;

use pg_query::protobuf::Node;
use pg_query::{NodeEnum, NodeRef};

pub use children::children;
pub use names::name;

/// Calls `visit` with `node` and every node below it, depth first.
pub fn walk<'a>(node: NodeRef<'a>, visit: &mut dyn FnMut(NodeRef<'a>)) {
    visit(node);
    children(node, &mut |child| walk(child, visit));
}

/// Whether a node of the type `found` picks occurs in `node` or below it.
pub fn mentions(node: NodeRef<'_>, found: fn(NodeRef<'_>) -> bool) -> bool {
    let mut seen = false;
    walk(node, &mut |n| seen |= found(n));
    seen
}

/// The texts of a list of `String` nodes (names: `schema.function`, `schema.type`), other
/// nodes skipped.
pub fn strings(list: &[Node]) -> Vec<&str> {
    list.iter()
        .filter_map(|n| match &n.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_query::NodeRef;
    use serde_json::Value;

    /// What pg_query's serde view of a tree holds: structs (every node, and the structs
    /// fields hold directly) and `String` texts. Objects with a single key are either a
    /// `Node` wrapper (`{"node": …}`) or a variant's tag (`{"SelectStmt": {…}}`).
    fn serde_count(v: &Value, counts: &mut (usize, Vec<String>)) {
        match v {
            Value::Object(map) => {
                let wrapper = map.len() == 1
                    && map
                        .keys()
                        .next()
                        .is_some_and(|k| k == "node" || k.starts_with(|c: char| c.is_ascii_uppercase()));
                if !wrapper {
                    counts.0 += 1;
                }
                if let Some(Value::String(s)) = map.get("sval") {
                    counts.1.push(s.clone());
                }
                map.values().for_each(|c| serde_count(c, counts));
            }
            Value::Array(items) => items.iter().for_each(|i| serde_count(i, counts)),
            _ => {}
        }
    }

    /// The walk reaches every node pg_query's serde view of the tree has (which serde derives
    /// from every field), on the test corpus and on statements that use the rarer nodes.
    #[test]
    fn every_field_is_walked() {
        let corpus = [
            include_str!("../../../tests/corpus/10-types.sql"),
            include_str!("../../../tests/corpus/20-writes.sql"),
            include_str!("../../../tests/corpus/30-sessions.sql"),
            include_str!("../../../tests/corpus/40-functions.sql"),
            "SELECT x, count(*) FILTER (WHERE y > 0) OVER w, array_agg(z ORDER BY z) FROM t \
             GROUP BY GROUPING SETS ((x), ()) HAVING sum(y) > 1 \
             WINDOW w AS (PARTITION BY a ORDER BY b ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) \
             ORDER BY 1 USING < LIMIT 5 FOR UPDATE OF t SKIP LOCKED;
             SELECT * FROM JSON_TABLE(jsonb '[1]', '$[*]' COLUMNS (a int PATH '$', NESTED PATH '$' COLUMNS (b text PATH '$'))) jt;
             SELECT JSON_OBJECT('a': 1 RETURNING jsonb), JSON_ARRAYAGG(x ORDER BY x), xmlserialize(content '<a/>' AS text), \
             CASE WHEN a IS DISTINCT FROM b THEN 1 ELSE 2 END, COALESCE(a, b), GREATEST(a, b), a BETWEEN 1 AND 2, \
             (ARRAY[1, 2])[1:2], ROW(1, 2), (x).y, x COLLATE \"C\", 'now'::date, CURRENT_TIMESTAMP, \
             EXISTS (SELECT 1), a = ANY (SELECT b FROM u), set_config('app.t', 'x', false) FROM t TABLESAMPLE BERNOULLI (5);
             WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SEARCH DEPTH FIRST BY n SET o \
             CYCLE n SET c USING p SELECT * FROM r, LATERAL (VALUES (1)) v(x), ROWS FROM (generate_series(1, 2), f(x) AS (a int));
             MERGE INTO t USING u ON t.id = u.id WHEN MATCHED AND u.x > 0 THEN UPDATE SET x = u.x \
             WHEN NOT MATCHED THEN INSERT (id) VALUES (u.id) RETURNING merge_action(), t.*;
             INSERT INTO t (a) VALUES (1) ON CONFLICT (a) WHERE a > 0 DO UPDATE SET b = excluded.b WHERE t.b <> 0;
             CREATE TABLE p (a int DEFAULT 1 CHECK (a > 0), b text COLLATE \"C\" REFERENCES q (b) ON DELETE CASCADE) \
             PARTITION BY RANGE (a);
             CREATE TABLE p1 PARTITION OF p FOR VALUES FROM (1) TO (10);
             CREATE FUNCTION f(a int, OUT b text) RETURNS SETOF record LANGUAGE sql AS 'select 1';
             CREATE TRIGGER tr BEFORE UPDATE ON t REFERENCING NEW TABLE AS n FOR EACH ROW WHEN (true) EXECUTE FUNCTION f();
             ALTER TABLE t ALTER COLUMN a TYPE bigint USING a::bigint, ADD CONSTRAINT c UNIQUE (b);
             CREATE POLICY pol ON t USING (owner = current_user) WITH CHECK (true);
             GRANT SELECT (a) ON t TO r; COMMENT ON TABLE t IS 'x'; DO $$ BEGIN END $$; CALL p(1);",
        ];
        for sql in corpus {
            let tree = pg_query::parse(sql, 0).expect("the corpus parses");
            let mut serde = (0, Vec::new());
            let mut typed = (0, Vec::new());
            for stmt in &tree.protobuf.stmts {
                let node = stmt.stmt.as_ref().and_then(|s| s.node.as_ref()).expect("a statement");
                serde_count(&serde_json::to_value(node).unwrap(), &mut serde);
                walk(node.to_ref(), &mut |n| {
                    typed.0 += 1;
                    if let NodeRef::String(s) = n {
                        typed.1.push(s.sval.clone());
                    }
                });
            }
            assert!(typed.0 > 100, "the corpus is no corpus");
            // serde_json's maps sort their keys: compare the names as multisets.
            typed.1.sort();
            serde.1.sort();
            let first_difference = typed.1.iter().zip(&serde.1).position(|(a, b)| a != b);
            assert_eq!(
                typed, serde,
                "the walk missed or invented nodes ({} walked, {} in serde; names differ first at {first_difference:?}) in:\n{sql}",
                typed.0, serde.0
            );
        }
    }
}
