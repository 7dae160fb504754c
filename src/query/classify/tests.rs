//! Unit tests of statement classification.

use super::*;

fn one(sql: &str) -> Classified {
    let mut v = classify(sql);
    assert_eq!(v.len(), 1, "{sql}");
    v.remove(0)
}

fn names(rels: &[Relation]) -> Vec<String> {
    rels.iter().map(|r| r.to_string()).collect()
}

#[test]
fn plain_selects_are_cacheable_candidates() {
    for (sql, reads) in [
        ("SELECT * FROM items WHERE id = $1", vec!["items"]),
        ("select a.x from s.a join b using (id)", vec!["b", "s.a"]),
        ("WITH f AS (SELECT * FROM t) SELECT * FROM f", vec!["t"]),
        ("SELECT * FROM ONLY t", vec!["t"]),
        ("SELECT (SELECT count(*) FROM u) FROM t", vec!["t", "u"]),
        ("SELECT 1", vec![]),
        ("SELECT * FROM \"Mixed Case\"", vec!["Mixed Case"]),
    ] {
        let c = one(sql);
        assert_eq!(c.kind, Kind::Select, "{sql}");
        assert_eq!(c.never_cache, None, "{sql}");
        assert_eq!(names(&c.reads), reads, "{sql}");
        assert!(c.writes.is_empty(), "{sql}");
    }
}

#[test]
fn writes_and_their_targets() {
    for (sql, writes) in [
        ("INSERT INTO t VALUES (1)", vec!["t"]),
        ("UPDATE ONLY s.t SET x = 1", vec!["s.t"]),
        ("DELETE FROM t USING u WHERE t.id = u.id", vec!["t"]),
        ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", vec!["t"]),
        ("WITH d AS (DELETE FROM audit RETURNING *) SELECT * FROM d", vec!["audit"]),
        ("SELECT * INTO newtab FROM items", vec!["newtab"]),
        ("COPY items FROM STDIN", vec!["items"]),
        ("TRUNCATE a, s.b", vec!["a", "s.b"]),
        ("REFRESH MATERIALIZED VIEW mv", vec!["mv"]),
        ("EXPLAIN ANALYZE DELETE FROM t", vec!["t"]),
        // It runs the query, which may call a function that writes.
        ("EXPLAIN ANALYZE SELECT * FROM t", vec![]),
        ("COPY (DELETE FROM t RETURNING *) TO STDOUT", vec!["t"]),
    ] {
        let c = one(sql);
        assert_eq!(c.kind, Kind::Write, "{sql}");
        assert_eq!(names(&c.writes), writes, "{sql}");
    }
}

#[test]
fn ddl_names_what_it_touches() {
    let c = one("ALTER TABLE t RENAME TO t_old");
    assert_eq!((c.kind.clone(), names(&c.writes)), (Kind::Ddl, vec!["t".to_string(), "t_old".to_string()]));
    let c = one("DROP TABLE a, s.b");
    assert_eq!(names(&c.writes), vec!["a", "s.b"]);
    let c = one("CREATE OR REPLACE VIEW v AS SELECT * FROM t");
    assert_eq!(c.kind, Kind::Ddl);
    assert!(names(&c.writes).contains(&"v".to_string()));
    let c = one("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'");
    assert!(c.writes_unknown(), "DDL naming no relation invalidates everything");
    assert_eq!(one("CREATE TEMP TABLE x (a int)").kind, Kind::Session(SessionChange::CreatesTemp));
}

#[test]
fn selects_that_must_never_be_cached() {
    for (sql, why) in [
        ("SELECT * FROM t FOR UPDATE", "locks"),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)", "locks"),
        ("SELECT * FROM t TABLESAMPLE SYSTEM (10)", "TABLESAMPLE"),
        ("SELECT * FROM pg_stat_activity", "system"),
        ("SELECT * FROM pg_catalog.pg_class", "system"),
        ("SELECT * FROM information_schema.tables", "system"),
        ("SELECT * FROM pg_temp.scratch", "temporary"),
    ] {
        let c = one(sql);
        assert!(c.never_cache.is_some_and(|r| r.contains(why)), "{sql}: {:?}", c.never_cache);
    }
}

#[test]
fn stable_builtins_and_functions_are_found() {
    assert!(one("SELECT CURRENT_TIMESTAMP").stable_builtins);
    assert!(one("SELECT * FROM t WHERE owner = current_user").stable_builtins);
    assert!(one("SELECT * FROM t WHERE day = 'today'::date").stable_builtins);
    assert!(one("SELECT 'NOW'::timestamptz").stable_builtins);
    assert!(!one("SELECT 'nowhere'").stable_builtins);
    let c = one("SELECT now(), lower(x), s.f(1) FROM t LIMIT (random()*10)::int");
    assert_eq!(names(&c.functions), vec!["lower", "now", "random", "s.f"]);
}

#[test]
fn transaction_and_session_statements() {
    assert_eq!(one("BEGIN").kind, Kind::Transaction(TxControl::Begin { plain: true }));
    assert_eq!(
        one("START TRANSACTION ISOLATION LEVEL SERIALIZABLE").kind,
        Kind::Transaction(TxControl::Begin { plain: false })
    );
    assert_eq!(one("BEGIN READ ONLY").kind, Kind::Transaction(TxControl::Begin { plain: false }));
    assert_eq!(one("COMMIT").kind, Kind::Transaction(TxControl::Commit));
    assert_eq!(one("END").kind, Kind::Transaction(TxControl::Commit));
    assert_eq!(one("ROLLBACK").kind, Kind::Transaction(TxControl::Rollback));
    assert_eq!(one("ABORT").kind, Kind::Transaction(TxControl::Rollback));
    assert_eq!(one("SAVEPOINT a").kind, Kind::Transaction(TxControl::Savepoint));
    assert_eq!(one("ROLLBACK TO SAVEPOINT a").kind, Kind::Transaction(TxControl::Savepoint));
    assert_eq!(one("RELEASE a").kind, Kind::Transaction(TxControl::Savepoint));
    for sql in ["PREPARE TRANSACTION 'x'", "COMMIT PREPARED 'x'", "ROLLBACK PREPARED 'x'"] {
        assert_eq!(one(sql).kind, Kind::Transaction(TxControl::TwoPhase), "{sql}");
    }
    assert_eq!(
        one("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").kind,
        Kind::Transaction(TxControl::SetTransaction)
    );
    assert_eq!(one("SET search_path = a, b").kind, Kind::Session(SessionChange::Setting));
    assert_eq!(one("RESET ALL").kind, Kind::Session(SessionChange::Setting));
    assert_eq!(one("SET ROLE reader").kind, Kind::Session(SessionChange::Setting));
    assert_eq!(one("DISCARD ALL").kind, Kind::Session(SessionChange::Discard));
}

#[test]
fn unknown_effects_are_opaque() {
    for sql in ["DO $$ BEGIN PERFORM 1; END $$", "CALL p()", "EXECUTE q(1)", "EXPLAIN ANALYZE EXECUTE q(1)"] {
        assert!(one(sql).writes_unknown(), "{sql}");
    }
    use crate::query::{Held, Hold};
    let take = |h, n: &str| Some(Hold::Take(h, Arc::from(n)));
    let release = |h, n: Option<&str>| Some(Hold::Release(h, n.map(Arc::from)));
    assert_eq!(one("LISTEN x").holds, take(Held::Listen, "x"));
    assert_eq!(one("UNLISTEN x").holds, release(Held::Listen, Some("x")));
    assert_eq!(one("UNLISTEN *").holds, release(Held::Listen, None));
    assert_eq!(one("SELECT pg_advisory_lock(1)").holds, take(Held::AdvisoryLock, ""));
    assert_eq!(one("SELECT pg_try_advisory_lock_shared(1)").holds, take(Held::AdvisoryLock, ""));
    assert_eq!(one("SELECT pg_advisory_unlock_all()").holds, release(Held::AdvisoryLock, None));
    assert_eq!(one("SELECT pg_advisory_xact_lock(1)").holds, None);
    assert_eq!(one("DECLARE c CURSOR WITH HOLD FOR SELECT 1").holds, take(Held::Cursor, "c"));
    assert_eq!(one("DECLARE c CURSOR FOR SELECT 1").holds, None, "ends with its transaction");
    assert_eq!(one("CLOSE c").holds, release(Held::Cursor, Some("c")));
    assert_eq!(one("CLOSE ALL").holds, release(Held::Cursor, None));
    assert_eq!(one("PREPARE p AS SELECT 1").holds, take(Held::Prepared, "p"));
    assert_eq!(one("DEALLOCATE p").holds, release(Held::Prepared, Some("p")));
    assert_eq!(one("DEALLOCATE ALL").holds, release(Held::Prepared, None));
    assert_eq!(one("CREATE TEMP TABLE t (a int)").holds, take(Held::Temp, ""));
    assert_eq!(one("DISCARD TEMP").holds, release(Held::Temp, None));
    assert_eq!(one("DISCARD ALL").holds, Some(Hold::ReleaseAll));
    assert_eq!(one("LOAD 'auto_explain'").holds, take(Held::Library, ""));
    assert!(one("DO $$ BEGIN PERFORM 1; END $$").settings.unseen);
    assert!(one("CALL p()").settings.unseen);
    assert!(!one("EXECUTE p(1)").settings.unseen, "its PREPARE was classified");
    assert!(!one("EXPLAIN ANALYZE EXECUTE p(1)").settings.unseen);
    let bad = classify("SELEC oops");
    assert_eq!(bad[0].kind, Kind::Unparseable);
    assert!(bad[0].writes_unknown());
    for sql in ["SHOW work_mem", "LISTEN x", "NOTIFY x", "VACUUM t", "EXPLAIN SELECT 1", "COPY t TO STDOUT"] {
        assert_eq!(one(sql).kind, Kind::Neutral, "{sql}");
    }
}

#[test]
fn multi_statement_strings_are_split() {
    let v = classify("SELECT 1; UPDATE t SET x = 1; SELECT * FROM t");
    let kinds: Vec<Kind> = v.iter().map(|c| c.kind.clone()).collect();
    assert_eq!(kinds, vec![Kind::Select, Kind::Write, Kind::Select]);
    assert_eq!(classify("").len(), 1);
    // Parsed once: each part's key values are read from its own literals.
    let classifier = crate::query::Classifier::default();
    for (first, second) in [(1, 2), (3, 4)] {
        let v = classifier
            .classify(&format!("SELECT v FROM t WHERE id = {first}; SELECT v FROM t WHERE k = 'x' AND id = {second}"));
        let id = |c: &Classified| c.point.as_ref().and_then(|p| p.values("id").map(<[_]>::to_vec));
        assert_eq!(id(&v[0]), Some(vec![crate::query::point::Value::Const(first.to_string().into())]));
        assert_eq!(id(&v[1]), Some(vec![crate::query::point::Value::Const(second.to_string().into())]));
    }
    assert_eq!(classify(";")[0].kind, Kind::Neutral);
}

#[test]
fn fingerprints_ignore_literals_and_layout() {
    let a = one("SELECT * FROM users WHERE id = 42");
    let b = one("select *\n  from users where id=$1");
    let c = one("SELECT * FROM s.users WHERE id = 1");
    assert_eq!(a.fingerprint, b.fingerprint);
    assert_ne!(a.fingerprint, c.fingerprint);
    assert_eq!(&*a.normalized, "SELECT * FROM users WHERE id = $1");
    assert_eq!(&*one("SELECT 1 ;").normalized, "SELECT $1");
}

#[test]
fn with_names_hide_relations_only_where_they_are_visible() {
    for (sql, reads) in [
        // The outer `t` is the table: the inner WITH is out of scope there.
        ("SELECT * FROM (WITH t AS (SELECT 1) SELECT * FROM t) s, t", vec!["t"]),
        ("SELECT (WITH u AS (SELECT 1) SELECT count(*) FROM u), (SELECT count(*) FROM u)", vec!["u"]),
        ("(WITH c AS (SELECT 1) SELECT * FROM c) UNION ALL SELECT * FROM c", vec!["c"]),
        // A non-recursive WITH query does not see itself, nor the ones after it.
        ("WITH users AS (SELECT * FROM users) SELECT * FROM users", vec!["users"]),
        ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b", vec!["b"]),
        ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", vec![]),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r", vec![]),
        ("WITH c AS (SELECT 1) SELECT * FROM s.c", vec!["s.c"]),
        ("WITH c AS (SELECT 1) SELECT * FROM c UNION SELECT * FROM c WHERE EXISTS (SELECT 1 FROM c)", vec![]),
        ("SELECT * FROM t FOR UPDATE OF t", vec!["t"]),
        ("SELECT * FROM t AS x FOR SHARE OF x", vec!["t"]),
    ] {
        let c = one(sql);
        assert_eq!(names(&c.reads), reads, "{sql}");
    }
    let c = one("WITH t AS (SELECT 1) INSERT INTO t SELECT * FROM t");
    assert_eq!((names(&c.writes), names(&c.reads)), (vec!["t".to_string()], vec![]), "a target is never a WITH name");
}

/// The walk of the tree pg_query already built finds what `pg_query::summary()` (a second
/// parse) finds, on the test corpus and the statements above: the same reads, writes and calls
/// — except where the summary hides a relation behind a `WITH` name out of scope.
#[test]
fn references_agree_with_the_summary() {
    let corpus = [
        include_str!("../../../tests/corpus/10-types.sql"),
        include_str!("../../../tests/corpus/20-writes.sql"),
        include_str!("../../../tests/corpus/30-sessions.sql"),
        include_str!("../../../tests/corpus/40-functions.sql"),
        "SELECT * FROM a JOIN b ON a.id = b.id LEFT JOIN LATERAL (SELECT * FROM c WHERE c.x = a.x) l ON true;
         SELECT * FROM t TABLESAMPLE SYSTEM (1), ROWS FROM (f(1)), JSON_TABLE(jsonb '[1]', '$[*]' COLUMNS (a int PATH '$')) j;
         UPDATE t SET x = (SELECT max(y) FROM u) FROM v WHERE t.id = v.id RETURNING (SELECT 1 FROM w);
         DELETE FROM s.t USING u WHERE t.a = u.a; MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE;
         WITH d AS (DELETE FROM audit RETURNING *) INSERT INTO archive SELECT * FROM d;
         INSERT INTO t (a) SELECT a FROM u ON CONFLICT (a) DO UPDATE SET b = excluded.b;
         CREATE TABLE n AS SELECT * FROM t; CREATE VIEW v AS SELECT * FROM t JOIN u USING (id);
         CREATE INDEX ON t (lower(x)) WHERE y > 0; ALTER TABLE t ADD COLUMN z int; ALTER INDEX i RENAME TO j;
         DROP TABLE a, s.b; DROP TRIGGER tr ON s.t; DROP RULE r ON t; DROP VIEW v; DROP FUNCTION f(int);
         GRANT SELECT ON t, s.u TO r; GRANT EXECUTE ON FUNCTION f() TO r; ALTER TABLE t RENAME TO t2;
         ALTER TABLE t RENAME COLUMN a TO b; CREATE TRIGGER tr AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION f();
         CREATE RULE r AS ON INSERT TO t DO ALSO INSERT INTO u VALUES (1); LOCK TABLE t, u; VACUUM t, s.u;
         TRUNCATE t, u; REFRESH MATERIALIZED VIEW mv; COPY t TO STDOUT; COPY (SELECT * FROM t) TO STDOUT;
         EXPLAIN ANALYZE UPDATE t SET a = 1; PREPARE p AS SELECT * FROM t WHERE id = $1; CALL p(1);
         CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT count(*) FROM t; END;
         CREATE POLICY p ON t USING (true); COMMENT ON TABLE t IS 'x'; SELECT * INTO n FROM t;",
    ];
    use pg_query::protobuf::summary_result::Context;
    for file in corpus {
        for sql in pg_query::split_with_parser(file).unwrap() {
            let tree = pg_query::parse(sql, 0).unwrap().protobuf;
            let Some(node) = tree.stmts[0].stmt.as_ref().and_then(|s| s.node.as_ref()) else { continue };
            let refs = refs::of(node.to_ref());
            let summary = pg_query::summary(sql, 0, -1).unwrap();
            let (mut reads, mut writes) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
            for t in &summary.tables {
                let rel = Relation::new(Some(&t.schema_name), &t.table_name);
                match t.context {
                    Context::Dml | Context::Ddl => writes.insert(rel),
                    _ => reads.insert(rel),
                };
            }
            let calls: std::collections::BTreeSet<Relation> = summary
                .functions
                .iter()
                .filter(|f| f.context == Context::Call)
                .map(|f| Relation::new(f.schema_name.as_deref(), &f.function_name))
                .collect();
            let only_select = summary.statement_types.iter().all(|t| t == "SelectStmt");
            // What this walk reads besides the summary: only what a schema statement or a
            // MERGE/LOCK/VACUUM/TRUNCATE/COPY names (the summary files those under writes or not
            // at all), never fewer.
            assert!(reads.is_subset(&(&refs.reads | &refs.writes)), "{sql}: reads {reads:?} vs {:?}", refs.reads);
            assert!(writes.is_subset(&(&refs.reads | &refs.writes)), "{sql}: writes {writes:?} vs {:?}", refs.writes);
            let dml_or_into = refs.writes.iter().all(|w| writes.contains(w));
            assert!(dml_or_into, "{sql}: writes {:?}, summary {writes:?}", refs.writes);
            assert_eq!(refs.functions, calls, "{sql}");
            if matches!(node.to_ref(), NodeRef::SelectStmt(_)) {
                assert_eq!(refs.only_select, only_select, "{sql}");
                assert_eq!(refs.reads, reads, "{sql}");
            }
        }
    }
}

#[test]
fn a_unicode_name_escape_is_part_of_the_shape() {
    let classifier = crate::query::Classifier::default();
    let bang = classifier.classify("SELECT * FROM U&\"a!0031b\" UESCAPE '!'");
    let star = classifier.classify("SELECT * FROM U&\"a!0031b\" UESCAPE '*'");
    assert_eq!(names(&bang[0].reads), vec!["a1b"]);
    assert_eq!(names(&star[0].reads), vec!["a!0031b"], "not the other text's classification");
}
