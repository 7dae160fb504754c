//! Invalidation: after a write through pgcache completes (or its transaction commits), no
//! client reads the old rows from the cache — through every kind of write, in the same session
//! and in a new one. Each check also proves the read before the write was a cache hit.

mod common;

use common::{CacheEnv, PgCluster, cache_env, executions, text};
use tokio_postgres::Client;

const RULES: &str = r#"
[[rule]]
name = "all-app-tables"
match = { pattern = "(?i)\\bfrom\\b" }
ttl = "10m"
"#;

const SCHEMA: &str = "
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t VALUES (1, 'one');
CREATE SCHEMA a; CREATE SCHEMA b;
CREATE TABLE a.same (v text); INSERT INTO a.same VALUES ('a1');
CREATE TABLE b.same (v text); INSERT INTO b.same VALUES ('b1');
CREATE VIEW t_view AS SELECT v FROM t WHERE id = 1;
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int, parent_id int REFERENCES parent ON DELETE CASCADE);
INSERT INTO parent VALUES (1); INSERT INTO child VALUES (10, 1);
CREATE TABLE audit (n int);
CREATE TABLE audited (v text);
CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (1); RETURN NEW; END $$;
CREATE TRIGGER audited_log AFTER INSERT ON audited FOR EACH ROW EXECUTE FUNCTION log_it();
CREATE TABLE kv (id int8 PRIMARY KEY, v text);
INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 10) g;
CREATE TABLE uk (id uuid PRIMARY KEY, v text);
INSERT INTO uk VALUES ('00000000-0000-0000-0000-000000000001', 'u1'), ('00000000-0000-0000-0000-000000000002', 'u2'),
  ('00000000-0000-0000-0000-000000000003', 'u3');
CREATE TABLE moved (id int PRIMARY KEY, v text);
INSERT INTO moved VALUES (1, 'one');
CREATE FUNCTION move_it() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.id := NEW.id + 100; RETURN NEW; END $$;
CREATE TRIGGER moved_move BEFORE UPDATE ON moved FOR EACH ROW EXECUTE FUNCTION move_it();
CREATE TABLE measurements (day int, v int) PARTITION BY RANGE (day);
CREATE TABLE measurements_1 PARTITION OF measurements FOR VALUES FROM (0) TO (100);
INSERT INTO measurements VALUES (1, 1);
";

type Env = CacheEnv;

async fn env() -> Env {
    cache_env(PgCluster::shared(), "inval", SCHEMA, RULES, |_| {}).await
}

trait Reads {
    async fn client(&self) -> Client;
    async fn cached(&self, c: &Client, sql: &str) -> String;
}

impl Reads for Env {
    async fn client(&self) -> Client {
        self.proxy.connect(&self.db, &PgCluster::shared_or_superuser()).await
    }

    /// Reads `sql` twice through `c`, asserting the second read was a hit; returns the value.
    async fn cached(&self, c: &Client, sql: &str) -> String {
        let first = text(c, sql).await;
        let before = executions(&self.admin, &shape(sql)).await;
        assert_eq!(text(c, sql).await, first);
        assert_eq!(executions(&self.admin, &shape(sql)).await, before, "second read of {sql:?} was not a hit");
        first
    }
}

/// A fragment of the normalized text pg_stat_statements records for `sql`.
fn shape(sql: &str) -> String {
    sql.split(" WHERE").next().unwrap_or(sql).to_owned()
}

/// Fills `read`, runs `write` (simple protocol), and checks the same session and a new one
/// see `expected` at once.
async fn check(e: &Env, read: &str, write: &str, expected: &str) {
    let c = e.client().await;
    let before = e.cached(&c, read).await;
    assert_ne!(before, expected, "the write must change {read:?}");
    c.batch_execute(write).await.unwrap_or_else(|err| panic!("{write}: {err}"));
    assert_eq!(text(&c, read).await, expected, "same session after {write:?}");
    assert_eq!(text(&e.client().await, read).await, expected, "new session after {write:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_write_invalidates() {
    let e = env().await;
    let read = "SELECT count(*), string_agg(v, ',' ORDER BY id) FROM t";
    check(&e, read, "INSERT INTO t VALUES (2, 'two')", "2,one,two").await;
    check(&e, read, "UPDATE t SET v = 'uno' WHERE id = 1", "2,uno,two").await;
    check(&e, read, "DELETE FROM t WHERE id = 2", "1,uno").await;
    check(
        &e,
        read,
        "MERGE INTO t USING (VALUES (3, 'three')) s(id, v) ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
        "2,uno,three",
    )
    .await;
    check(&e, read, "WITH gone AS (DELETE FROM t WHERE id = 3 RETURNING *) SELECT count(*) FROM gone", "1,uno").await;
    check(&e, read, "SELECT 1; UPDATE t SET v = 'one' WHERE id = 1; SELECT 2", "1,one").await;
    check(&e, read, "BEGIN; INSERT INTO t VALUES (4, 'four'); COMMIT", "2,one,four").await;
    check(&e, read, "TRUNCATE t", "0,NULL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_and_extended_protocol_writes_invalidate() {
    let e = env().await;
    let read = "SELECT count(*) FROM t";
    let c = e.client().await;
    assert_eq!(e.cached(&c, read).await, "1");
    let sink = c.copy_in("COPY t FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from_static(b"5\tfive\n6\tsix\n")).await.unwrap();
    sink.finish().await.unwrap();
    assert_eq!(text(&c, read).await, "3");
    assert_eq!(e.cached(&c, read).await, "3");
    c.execute("INSERT INTO t VALUES ($1, $2)", &[&7i32, &"seven"]).await.unwrap();
    assert_eq!(text(&e.client().await, read).await, "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_invalidate_on_commit_and_rollback_keeps_entries() {
    let e = env().await;
    let read = "SELECT v FROM t WHERE id = 1";
    let c = e.client().await;
    let other = e.client().await;
    assert_eq!(e.cached(&c, read).await, "one");
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("UPDATE t SET v = 'changed' WHERE id = 1").await.unwrap();
    // The writer sees its own write (not the cache); others still see the committed row.
    assert_eq!(text(&c, read).await, "changed");
    assert_eq!(text(&other, read).await, "one");
    c.batch_execute("ROLLBACK").await.unwrap();
    let before = executions(&e.admin, "SELECT v FROM t").await;
    assert_eq!(text(&other, read).await, "one");
    assert_eq!(executions(&e.admin, "SELECT v FROM t").await, before, "after ROLLBACK the entry is still valid");
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("UPDATE t SET v = 'committed' WHERE id = 1").await.unwrap();
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(text(&other, read).await, "committed");
}

/// A client that pipelines (libpq's pipeline mode, tokio-postgres's concurrent queries) sends
/// the next transaction before the last one's answers arrive: what it writes is invalidated
/// when Postgres commits it, not when an earlier request ends or fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transactions_are_invalidated_when_they_commit() {
    let e = env().await;
    let read = "SELECT v FROM t WHERE id = 1";
    let (c, other) = (e.client().await, e.client().await);
    for (n, first) in ["SELECT 1", "SELECT 1/0"].into_iter().enumerate() {
        let value = format!("pipelined {n}");
        let update = format!("UPDATE t SET v = '{value}' WHERE id = 1");
        let (a, b, u) = tokio::join!(c.simple_query(first), c.simple_query("BEGIN"), c.simple_query(&update));
        assert_eq!(a.is_ok(), n == 0, "{first}");
        b.unwrap();
        u.unwrap();
        // The other session fills the entry while the write is uncommitted (the old row) ...
        let old = e.cached(&other, read).await;
        assert_ne!(old, value);
        // ... and the COMMIT must invalidate it.
        c.batch_execute("COMMIT").await.unwrap();
        assert_eq!(text(&other, read).await, value, "after a pipelined transaction behind {first:?} committed");
    }
}

/// A COMMIT inside a request that goes on in a new transaction invalidates as it commits:
/// others read the new row while the writer's next transaction is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_mid_request_invalidates_before_the_request_ends() {
    let e = env().await;
    let read = "SELECT v FROM t WHERE id = 1";
    let (c, other) = (e.client().await, e.client().await);
    let old = e.cached(&other, read).await;
    c.batch_execute("BEGIN; UPDATE t SET v = 'chained' WHERE id = 1; COMMIT; BEGIN; SELECT 1").await.unwrap();
    assert_ne!(old, "chained");
    assert_eq!(text(&other, read).await, "chained", "committed while the writer's next transaction is open");
    c.batch_execute("UPDATE t SET v = 'chain 2' WHERE id = 1; COMMIT AND CHAIN").await.unwrap();
    assert_eq!(text(&other, read).await, "chain 2", "COMMIT AND CHAIN");
    c.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_views_and_new_tables_invalidate() {
    let e = env().await;
    check(&e, "SELECT * FROM t WHERE id = 1", "ALTER TABLE t ADD COLUMN extra int DEFAULT 7", "1,one,7").await;
    check(&e, "SELECT v FROM t_view", "UPDATE t SET v = 'via view' WHERE id = 1", "via view").await;
    // A table created after pgcache started.
    e.admin.batch_execute("CREATE TABLE later (v int); INSERT INTO later VALUES (1)").await.unwrap();
    check(&e, "SELECT sum(v) FROM later", "INSERT INTO later VALUES (41)", "42").await;
    check(
        &e,
        "SELECT sum(v) FROM later",
        "DROP TABLE later; CREATE TABLE later (v int); INSERT INTO later VALUES (5)",
        "5",
    )
    .await;
}

/// A key written with two signs is the number they make: `- -5` is 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_written_with_two_signs_invalidates_its_own_key() {
    let e = env().await;
    check(&e, "SELECT v FROM kv WHERE id = 5", "UPDATE kv SET v = 'five' WHERE id = - -5", "five").await;
    check(&e, "SELECT v FROM kv WHERE id = 6", "UPDATE kv SET v = 'six' WHERE id = -(-6)", "six").await;
}

/// A `WITH` name hides a table of that name only where SQL makes it visible: the outer `kv`
/// here is the table, so a write to it must reach the cached answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_with_name_out_of_scope_does_not_hide_the_table() {
    let e = env().await;
    let read = "SELECT count(*) FROM (WITH kv AS (SELECT id FROM t) SELECT * FROM kv) s CROSS JOIN kv";
    check(&e, read, "DELETE FROM kv WHERE id > 5", "5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_told_apart_and_qualified_names_work() {
    let e = env().await;
    let c = e.client().await;
    assert_eq!(e.cached(&c, "SELECT v FROM a.same").await, "a1");
    assert_eq!(e.cached(&c, "SELECT v FROM b.same").await, "b1");
    c.batch_execute("UPDATE a.same SET v = 'a2'").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM a.same").await, "a2");
    let before = executions(&e.admin, "SELECT v FROM b.same").await;
    assert_eq!(text(&c, "SELECT v FROM b.same").await, "b1");
    assert_eq!(
        executions(&e.admin, "SELECT v FROM b.same").await,
        before,
        "b.same was not invalidated by a write to a.same"
    );
    // Unqualified names resolve through search_path, for reads and writes.
    c.batch_execute("SET search_path = b, public").await.unwrap();
    assert_eq!(e.cached(&c, "SELECT v FROM same").await, "b1");
    c.batch_execute("UPDATE same SET v = 'b2'").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM same").await, "b2");
    assert_eq!(text(&e.client().await, "SELECT v FROM b.same").await, "b2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascades_triggers_and_partitions_invalidate() {
    let e = env().await;
    check(&e, "SELECT count(*) FROM child", "DELETE FROM parent WHERE id = 1", "0").await;
    check(&e, "SELECT count(*) FROM audit", "INSERT INTO audited VALUES ('x')", "1").await;
    check(&e, "SELECT sum(v) FROM measurements_1", "INSERT INTO measurements VALUES (2, 10)", "11").await;
    check(&e, "SELECT sum(v) FROM measurements", "INSERT INTO measurements_1 VALUES (3, 100)", "111").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_writes_invalidate_everything() {
    let e = env().await;
    let read = "SELECT v FROM t WHERE id = 1";
    check(&e, read, "DO $$ BEGIN UPDATE t SET v = 'by do' WHERE id = 1; END $$", "by do").await;
    e.admin
        .batch_execute("CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS $$ UPDATE t SET v = 'sneaky' WHERE id = 1 RETURNING 1 $$")
        .await
        .unwrap();
    check(&e, read, "SELECT sneaky()", "sneaky").await;
    // An operator whose function writes.
    e.admin
        .batch_execute(
            "CREATE FUNCTION sneaky_eq(int, int) RETURNS bool LANGUAGE plpgsql VOLATILE AS \
             $$ BEGIN UPDATE t SET v = 'by operator' WHERE id = 1; RETURN $1 = $2; END $$; \
             CREATE OPERATOR ~=~ (LEFTARG = int, RIGHTARG = int, FUNCTION = sneaky_eq)",
        )
        .await
        .unwrap();
    check(&e, read, "INSERT INTO audit SELECT 1 WHERE 0 ~=~ 0", "by operator").await;
    // A plain SELECT using it writes too.
    e.client().await.batch_execute("UPDATE t SET v = 'before' WHERE id = 1").await.unwrap();
    check(&e, read, "SELECT 1 WHERE 0 ~=~ 0", "by operator").await;
}

/// Whether reading `sql` through `c` now is answered from the cache (Postgres does not run it).
async fn is_hit(e: &Env, c: &Client, sql: &str) -> bool {
    let before = executions(&e.admin, &shape(sql)).await;
    text(c, sql).await;
    executions(&e.admin, &shape(sql)).await == before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_pinned_to_primary_keys_invalidate_only_those_keys() {
    let e = env().await;
    let c = e.client().await;
    let key = |id: i64| format!("SELECT v FROM kv WHERE id = {id}");
    let whole = "SELECT string_agg(v, ',' ORDER BY id) FROM kv";
    for id in [1, 2, 3, 4, 5, 11, 12] {
        e.cached(&c, &key(id)).await;
    }
    e.cached(&c, whole).await;
    // An extended-protocol read pinned by a (binary int8) parameter.
    let by_param = c.prepare("SELECT v FROM kv WHERE id = $1").await.unwrap();
    let (c, by_param) = (&c, &by_param);
    let param = |id: i64| async move { c.query_one(by_param, &[&id]).await.unwrap().get::<_, String>(0) };
    assert_eq!(param(6).await, "v6");
    let before = executions(&e.admin, "SELECT v FROM kv").await;
    assert_eq!(param(6).await, "v6");
    assert_eq!(executions(&e.admin, "SELECT v FROM kv").await, before, "the parameterized read was not a hit");

    // A literal key: that key's read and the whole-table read see the write; other keys stay cached.
    c.batch_execute("UPDATE kv SET v = 'x1' WHERE id = 1").await.unwrap();
    assert_eq!(text(c, &key(1)).await, "x1");
    assert!(is_hit(&e, c, &key(2)).await, "a write to key 1 left key 2 cached");
    assert!(text(c, whole).await.starts_with("x1,v2"), "the whole-table read saw the write");

    // A key bound as a parameter (extended protocol, binary int8).
    c.execute("UPDATE kv SET v = $1 WHERE id = $2", &[&"x6", &6i64]).await.unwrap();
    assert_eq!(param(6).await, "x6");
    assert!(is_hit(&e, c, &key(2)).await);
    // A parameter cast to the key's type, as SQLAlchemy writes them.
    c.execute("UPDATE kv SET v = $1 WHERE id = $2::BIGINT", &[&"y6", &6i64]).await.unwrap();
    assert_eq!(param(6).await, "y6");
    assert!(is_hit(&e, c, &key(2)).await);

    // IN lists, DELETE, INSERT of a key read before it existed.
    c.batch_execute("DELETE FROM kv WHERE id IN (3, 4)").await.unwrap();
    assert_eq!(text(c, &key(3)).await, "");
    assert_eq!(text(c, &key(4)).await, "");
    assert!(is_hit(&e, c, &key(5)).await);
    c.execute("INSERT INTO kv (id, v) VALUES ($1, 'eleven')", &[&11i64]).await.unwrap();
    assert_eq!(text(c, &key(11)).await, "eleven");
    assert!(is_hit(&e, c, &key(2)).await);

    // A write that moves a row to another key invalidates the whole table.
    c.batch_execute("UPDATE kv SET id = 12 WHERE id = 5").await.unwrap();
    assert_eq!(text(c, &key(12)).await, "v5");
    assert_eq!(text(c, &key(5)).await, "");
    // A write whose key pgcache cannot read (a cast) too.
    e.cached(c, &key(2)).await;
    c.batch_execute("UPDATE kv SET v = 'x2' WHERE id = 2::numeric").await.unwrap();
    assert_eq!(text(c, &key(2)).await, "x2");
    // And one in a transaction: seen at once by the writer, by others at commit.
    let other = e.client().await;
    e.cached(&other, &key(2)).await;
    c.batch_execute("BEGIN; UPDATE kv SET v = 'tx' WHERE id = 2").await.unwrap();
    assert_eq!(text(&other, &key(2)).await, "x2");
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(text(&other, &key(2)).await, "tx");
    // An upsert arbitrated on the key changes that key's row only.
    e.cached(c, &key(9)).await;
    c.execute("INSERT INTO kv (id, v) VALUES ($1, 'up') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", &[&2i64])
        .await
        .unwrap();
    assert_eq!(text(&other, &key(2)).await, "up");
    assert!(is_hit(&e, c, &key(9)).await, "an upsert of key 2 left key 9 cached");
    // Counted apart from the table-wide ones.
    let keyed = e.proxy.metric("pgcache_key_invalidations_total{table=\"kv\"}").await;
    let all = e.proxy.metric("pgcache_invalidations_total{table=\"kv\"}").await;
    assert!(keyed >= 7.0 && all > keyed, "{keyed} keyed of {all} invalidations of kv");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_whose_writes_may_move_keys_invalidate_whole() {
    let e = env().await;
    let c = e.client().await;
    // A BEFORE trigger moves the row from key 1 to key 101.
    assert_eq!(e.cached(&c, "SELECT v FROM moved WHERE id = 101").await, "");
    c.batch_execute("UPDATE moved SET v = 'moved' WHERE id = 1").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM moved WHERE id = 101").await, "moved");
    // Joined writes: `moved.id = 101` pins the other table's key, not kv's (and kv has no key 101).
    assert_eq!(e.cached(&c, "SELECT v FROM kv WHERE id = 7").await, "v7");
    c.batch_execute("UPDATE kv SET v = 'joined' FROM moved WHERE moved.id = 101 AND kv.id = 7").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM kv WHERE id = 7").await, "joined");
    assert_eq!(e.cached(&c, "SELECT v FROM kv WHERE id = 8").await, "v8");
    c.batch_execute("DELETE FROM kv USING moved WHERE moved.id = 101 AND kv.id = 8").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM kv WHERE id = 8").await, "");
    // A cascading foreign key: deleting one parent key changes the child table.
    check(&e, "SELECT count(*) FROM child WHERE id = 10", "DELETE FROM parent WHERE id = 1", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_by_key_can_be_turned_off() {
    let e = cache_env(PgCluster::shared(), "inval", SCHEMA, RULES, |c| c.cache.invalidate_by_key = false).await;
    let c = e.client().await;
    e.cached(&c, "SELECT v FROM kv WHERE id = 2").await;
    c.batch_execute("UPDATE kv SET v = 'x1' WHERE id = 1").await.unwrap();
    assert!(!is_hit(&e, &c, "SELECT v FROM kv WHERE id = 2").await, "by table: a write to key 1 clears key 2");
}

/// A UUID parameter, sent in binary as drivers do.
#[derive(Debug)]
struct Uuid(u128);

impl tokio_postgres::types::ToSql for Uuid {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::UUID
    }

    tokio_postgres::types::to_sql_checked!();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_keys_invalidate_by_key_in_any_spelling() {
    let e = env().await;
    let c = e.client().await;
    let one = "SELECT v FROM uk WHERE id = '00000000-0000-0000-0000-000000000001'";
    let two = "SELECT v FROM uk WHERE id = '00000000-0000-0000-0000-000000000002'";
    e.cached(&c, one).await;
    e.cached(&c, two).await;
    let by_param = c.prepare("SELECT v FROM uk WHERE id = $1").await.unwrap();
    let param = |n: u128| {
        let (c, by_param) = (&c, &by_param);
        async move { c.query_one(by_param, &[&Uuid(n)]).await.unwrap().get::<_, String>(0) }
    };
    assert_eq!(param(3).await, "u3");
    // Another spelling of key 1 (no hyphens, upper case, braces): the same key.
    c.batch_execute("UPDATE uk SET v = 'x1' WHERE id = '{0000000000000000000000000000000A}'").await.unwrap();
    assert!(is_hit(&e, &c, one).await, "a write to another key left key 1 cached");
    c.batch_execute("UPDATE uk SET v = 'x1' WHERE id = '{00000000000000000000000000000001}'").await.unwrap();
    assert_eq!(text(&c, one).await, "x1");
    assert!(is_hit(&e, &c, two).await, "a write to key 1 left key 2 cached");
    // A binary parameter.
    c.execute("UPDATE uk SET v = 'x3' WHERE id = $1", &[&Uuid(3)]).await.unwrap();
    assert_eq!(param(3).await, "x3");
    assert!(is_hit(&e, &c, two).await, "a write to key 3 left key 2 cached");
}
