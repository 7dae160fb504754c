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
    for sql in ["DO $$ BEGIN PERFORM 1; END $$", "CALL p()", "EXECUTE q(1)"] {
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
