//! Key safety: two clients that could see different rows or bytes never share an entry, and
//! results that depend on the time or on volatile functions are never cached.

mod common;

use common::{CacheEnv, PgCluster, cache_env, executions, text};

const RULES: &str = r#"
[[rule]]
name = "everything"
match = { pattern = "(?i)select" }
ttl = "10m"
"#;

async fn env(schema: &str) -> CacheEnv {
    cache_env(PgCluster::shared(), "keys", schema, RULES, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_row_level_security_see_their_own_rows() {
    let roles = ["alice", "bob"].map(|r| format!("{r}_{}", std::process::id()));
    let e = env(&format!(
        "CREATE TABLE docs (owner text, body text);
         INSERT INTO docs VALUES ('{a}', 'for alice'), ('{b}', 'for bob');
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON docs USING (owner = current_user);
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{a}') THEN CREATE ROLE {a} LOGIN; END IF;
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{b}') THEN CREATE ROLE {b} LOGIN; END IF;
         END $$;
         GRANT SELECT ON docs TO {a}, {b};",
        a = roles[0],
        b = roles[1]
    ))
    .await;
    let sql = "SELECT body FROM docs";
    let alice = e.proxy.connect(&e.db, &roles[0]).await;
    let bob = e.proxy.connect(&e.db, &roles[1]).await;
    for _ in 0..3 {
        assert_eq!(text(&alice, sql).await, "for alice");
        assert_eq!(text(&bob, sql).await, "for bob");
    }
    // The same role switched with SET ROLE is keyed by the role in effect.
    let admin_via_proxy = e.proxy.connect(&e.db, "postgres").await;
    admin_via_proxy.batch_execute(&format!("SET ROLE {}", roles[1])).await.unwrap();
    assert_eq!(text(&admin_via_proxy, sql).await, "for bob");
    admin_via_proxy.batch_execute(&format!("SET ROLE {}", roles[0])).await.unwrap();
    assert_eq!(text(&admin_via_proxy, sql).await, "for alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_path_time_zone_and_formats_are_in_the_key() {
    let e = env("CREATE SCHEMA s1; CREATE SCHEMA s2;
         CREATE TABLE s1.v (x text); INSERT INTO s1.v VALUES ('in s1');
         CREATE TABLE s2.v (x text); INSERT INTO s2.v VALUES ('in s2');
         CREATE TABLE stamps (at timestamptz); INSERT INTO stamps VALUES ('2024-01-01 12:00:00+00');")
    .await;
    let c1 = e.proxy.connect(&e.db, "postgres").await;
    let c2 = e.proxy.connect(&e.db, "postgres").await;
    c1.batch_execute("SET search_path = s1, public").await.unwrap();
    c2.batch_execute("SET search_path = s2, public").await.unwrap();
    for _ in 0..2 {
        assert_eq!(text(&c1, "SELECT x FROM v").await, "in s1");
        assert_eq!(text(&c2, "SELECT x FROM v").await, "in s2");
    }
    c1.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    c2.batch_execute("SET TimeZone = 'America/New_York'").await.unwrap();
    for _ in 0..2 {
        assert_eq!(text(&c1, "SELECT at FROM stamps").await, "2024-01-01 12:00:00+00");
        assert_eq!(text(&c2, "SELECT at FROM stamps").await, "2024-01-01 07:00:00-05");
    }
    // Text (simple) and binary (tokio-postgres) results of the same SQL.
    let row = c1.query_one("SELECT at FROM stamps", &[]).await.unwrap();
    let at: std::time::SystemTime = row.get(0);
    assert_eq!(at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1_704_110_400);
    assert_eq!(text(&c1, "SELECT at FROM stamps").await, "2024-01-01 12:00:00+00");
    // Startup parameters count too.
    let url = format!("{}&options=-c%20TimeZone%3DAsia%2FTokyo", e.proxy.url(&e.db, "postgres"));
    let tokyo = common::proxy::connect(&url).await;
    assert_eq!(text(&tokyo, "SELECT at FROM stamps").await, "2024-01-01 21:00:00+09");
}

/// Sessions of one database and user share what was decided of a statement, but only under
/// the same search path: a rule naming `s1.v` caches `SELECT x FROM v` for the session whose
/// path finds `s1.v`, and never for the one whose path finds `s2.v`, whichever decides first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_one_pool_share_decisions_only_under_the_same_search_path() {
    let rules = "[[rule]]\nname = \"s1 only\"\nmatch = { tables = [\"s1.v\"] }\nttl = \"10m\"\n";
    let e = cache_env(
        PgCluster::shared(),
        "shared_decisions",
        "CREATE SCHEMA s1; CREATE SCHEMA s2;
         CREATE TABLE s1.v (x text); INSERT INTO s1.v VALUES ('in s1');
         CREATE TABLE s2.v (x text); INSERT INTO s2.v VALUES ('in s2');",
        rules,
        |_| {},
    )
    .await;
    let sql = "SELECT x FROM v WHERE x IS NOT NULL";
    let (one, two) = (e.proxy.connect(&e.db, "postgres").await, e.proxy.connect(&e.db, "postgres").await);
    one.batch_execute("SET search_path = s1, public").await.unwrap();
    two.batch_execute("SET search_path = s2, public").await.unwrap();
    // The session that may not cache decides first; the one that may, second; then both again.
    let before = executions(&e.admin, "FROM v WHERE x IS NOT NULL").await;
    for _ in 0..3 {
        assert_eq!(text(&two, sql).await, "in s2");
        assert_eq!(text(&one, sql).await, "in s1");
    }
    // s2's three reads, and s1's first: s1's other two were answered from the cache.
    assert_eq!(executions(&e.admin, "FROM v WHERE x IS NOT NULL").await - before, 4);
    // A third session of the pool, with s1's path, is served what s1's decided.
    let three = e.proxy.connect(&e.db, "postgres").await;
    three.batch_execute("SET search_path = s1, public").await.unwrap();
    assert_eq!(text(&three, sql).await, "in s1");
    assert_eq!(executions(&e.admin, "FROM v WHERE x IS NOT NULL").await - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_dependent_and_volatile_results_are_never_cached() {
    let e = env("CREATE TABLE n (x int); INSERT INTO n VALUES (1);
         CREATE FUNCTION bump() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
         CREATE FUNCTION lucky(int, int) RETURNS bool LANGUAGE sql VOLATILE AS 'SELECT $1 = $2 AND random() >= 0';
         CREATE OPERATOR ~=~ (LEFTARG = int, RIGHTARG = int, FUNCTION = lucky);")
    .await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    for (sql, shape) in [
        ("SELECT x, now() FROM n", "now()"),
        ("SELECT x, random() FROM n", "random()"),
        ("SELECT x, bump() FROM n", "bump()"),
        ("SELECT x, current_timestamp FROM n", "current_timestamp FROM"),
        ("SELECT x FROM n WHERE now() > '2000-01-01'", "WHERE now() >"),
        ("SELECT 'now'::timestamptz > '2000-01-01', x FROM n", "::timestamptz >"),
        // A user-defined operator runs its (volatile) function.
        ("SELECT x FROM n WHERE x ~=~ 1", "WHERE x ~=~"),
    ] {
        let before = executions(&e.admin, shape).await;
        for _ in 0..3 {
            text(&c, sql).await;
        }
        assert_eq!(executions(&e.admin, shape).await - before, 3, "{sql} must reach Postgres every time");
    }
    // A text parameter value meaning "now" is not cached either.
    let mut raw = common::raw::RawConn::connect(e.proxy.addr, "postgres", &e.db, &[]).await;
    let before = executions(&e.admin, "WHERE $1::timestamptz >").await;
    for _ in 0..3 {
        use common::raw::{batch, bind, execute, parse, sync};
        let sql = "SELECT x FROM n WHERE $1::timestamptz > '2000-01-01'";
        let got = raw
            .exchange(&batch(&[parse("", sql, &[]), bind("", "", &[Some("now")], &[]), execute("", 0), sync()]), 1)
            .await;
        assert_eq!(got.iter().filter(|m| m.tag == b'D').count(), 1);
    }
    assert_eq!(executions(&e.admin, "WHERE $1::timestamptz >").await - before, 3);
}

/// A tenant table whose policy reads a custom setting, PostgREST/Supabase style: one shared
/// role, the tenant in `app.tenant`.
fn tenant_schema(role: &str) -> String {
    format!(
        "CREATE TABLE docs (tenant int, body text);
         INSERT INTO docs VALUES (1, 'tenant 1 row'), (2, 'tenant 2 row');
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY by_tenant ON docs USING (tenant = current_setting('app.tenant')::int);
         DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role} LOGIN; END IF;
         END $$;
         GRANT SELECT ON docs TO {role};"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_tables_are_not_cached_unless_the_rule_opts_in() {
    let role = format!("tenant_app_{}", std::process::id());
    let e = env(&tenant_schema(&role)).await;
    let c = e.proxy.connect(&e.db, &role).await;
    c.batch_execute("SET app.tenant = '1'").await.unwrap();
    let before = executions(&e.admin, "SELECT body FROM docs").await;
    for _ in 0..3 {
        assert_eq!(text(&c, "SELECT body FROM docs").await, "tenant 1 row");
    }
    assert_eq!(executions(&e.admin, "SELECT body FROM docs").await - before, 3, "an RLS table reaches Postgres");
    let other = e.proxy.connect(&e.db, &role).await;
    other.batch_execute("SET app.tenant = '2'").await.unwrap();
    assert_eq!(text(&other, "SELECT body FROM docs").await, "tenant 2 row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keyed_on_a_custom_setting_never_see_each_others_rows() {
    let role = format!("tenant_rls_{}", std::process::id());
    let rules =
        "[[rule]]\nname = \"tenants\"\nmatch = { tables = [\"docs\"] }\nttl = \"10m\"\nallow_row_security = true\n";
    let e = cache_env(PgCluster::shared(), "keys", &tenant_schema(&role), rules, |_| {}).await;
    let sql = "SELECT body FROM docs";
    // SET in the session.
    let one = e.proxy.connect(&e.db, &role).await;
    one.batch_execute("SET app.tenant = '1'").await.unwrap();
    assert_eq!(text(&one, sql).await, "tenant 1 row");
    let before = executions(&e.admin, sql).await;
    assert_eq!(text(&one, sql).await, "tenant 1 row");
    assert_eq!(executions(&e.admin, sql).await, before, "with the opt-in, a tenant's repeat is a hit");
    let two = e.proxy.connect(&e.db, &role).await;
    two.batch_execute("SET app.tenant = '2'").await.unwrap();
    assert_eq!(text(&two, sql).await, "tenant 2 row");
    // The tenant in the startup packet.
    let url = format!("{}&options=-c%20app.tenant%3D2", e.proxy.url(&e.db, &role));
    let startup = common::proxy::connect(&url).await;
    assert_eq!(text(&startup, sql).await, "tenant 2 row");
    // Transaction-local set_config, as PostgREST does it per request.
    let rest = e.proxy.connect(&e.db, &role).await;
    for tenant in [1, 2, 1, 2] {
        let got = text(
            &rest,
            &format!("BEGIN; SELECT set_config('app.tenant', '{tenant}', true); SELECT body FROM docs; COMMIT"),
        )
        .await;
        assert_eq!(got, format!("{tenant};tenant {tenant} row"));
    }
    // After the transaction the local setting is gone: Postgres refuses to read it, and so
    // must the cache (the entry keyed on tenant 2 must not answer).
    let err = rest.simple_query(sql).await.expect_err("app.tenant is unset again");
    assert!(err.to_string().contains("invalid input syntax") || err.code().is_some(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_changes_the_key_like_set_does() {
    let e = env("CREATE SCHEMA s1; CREATE SCHEMA s2;
         CREATE TABLE s1.t (v text); INSERT INTO s1.t VALUES ('in s1');
         CREATE TABLE s2.t (v text); INSERT INTO s2.t VALUES ('in s2');")
    .await;
    let c = e.proxy.connect(&e.db, "postgres").await;
    c.batch_execute("SET search_path = s1").await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM t").await, "in s1");
    assert_eq!(text(&c, "SELECT v FROM t").await, "in s1");
    text(&c, "SELECT set_config('search_path', 's2', false)").await;
    assert_eq!(text(&c, "SELECT v FROM t").await, "in s2");
    // Through the extended protocol too.
    c.query("SELECT set_config('search_path', 's1', false)", &[]).await.unwrap();
    assert_eq!(text(&c, "SELECT v FROM t").await, "in s1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planner_settings_are_part_of_the_key() {
    let e = env("CREATE TABLE grp AS SELECT (g * 7919) % 100 AS k FROM generate_series(1, 1000) g; ANALYZE grp;").await;
    let user = PgCluster::shared_or_superuser();
    let sql = "SELECT k, count(*) FROM grp GROUP BY k";
    let hashed = e.proxy.connect(&e.db, &user).await;
    text(&hashed, sql).await;
    text(&hashed, sql).await;
    let sorted = e.proxy.connect(&e.db, &user).await;
    sorted.batch_execute("SET enable_hashagg = off").await.unwrap();
    let direct = common::proxy::connect(&PgCluster::shared().url(&e.db, &user)).await;
    direct.batch_execute("SET enable_hashagg = off").await.unwrap();
    assert_eq!(text(&sorted, sql).await, text(&direct, sql).await, "rows in the order this session's plan gives");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literals_read_through_the_catalog_are_not_cached() {
    let e = env("CREATE TABLE tbl (a int); CREATE TYPE mood AS ENUM ('ok');").await;
    let user = PgCluster::shared_or_superuser();
    let c = e.proxy.connect(&e.db, &user).await;
    let direct = common::proxy::connect(&PgCluster::shared().url(&e.db, &user)).await;
    for (sql, fragment) in [
        ("SELECT 'tbl'::regclass::oid", "$1::regclass::oid"),
        ("SELECT CAST('tbl' AS regclass)::oid::int8", "AS regclass"),
        ("SELECT regclass 'tbl' = 'tbl'::regclass", "= $2::regclass"),
        ("SELECT 'mood'::regtype::oid", "::regtype"),
        ("SELECT '{tbl}'::regclass[]", "::regclass[]"),
        ("SELECT 'tbl'::text::regclass::oid", "::text::regclass"),
    ] {
        let before = executions(&e.admin, fragment).await;
        text(&c, sql).await;
        text(&c, sql).await;
        assert_eq!(executions(&e.admin, fragment).await - before, 2, "{sql} must reach Postgres every time");
    }
    let sql = "SELECT 'tbl'::regclass::oid";
    text(&c, sql).await;
    c.batch_execute("DROP TABLE tbl; CREATE TABLE tbl (a int)").await.unwrap();
    assert_eq!(text(&c, sql).await, text(&direct, sql).await, "the OID of the new table");
    // Literals whose reading depends only on settings (which the key holds) stay cacheable.
    let before = executions(&e.admin, "::timestamptz").await;
    for _ in 0..3 {
        text(&c, "SELECT '2024-01-01 00:00:00+00'::timestamptz, '{1,2}'::int[], 'ok'::mood").await;
    }
    assert_eq!(executions(&e.admin, "::timestamptz").await - before, 1, "cached after the first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_shared_across_roles_shares_between_a_superuser_and_other_roles() {
    let reader = format!("shared_reader_{}", std::process::id());
    let e = cache_env(
        PgCluster::shared(),
        "keys_shared",
        &format!(
            "CREATE TABLE catalog_items (id int, name text); INSERT INTO catalog_items VALUES (1, 'lamp');
             CREATE TABLE private_items (id int, name text); INSERT INTO private_items VALUES (1, 'key');
             DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{reader}') THEN CREATE ROLE {reader} LOGIN; END IF;
             END $$;
             GRANT SELECT ON catalog_items, private_items TO {reader};"
        ),
        "[[rule]]\nname = \"shared\"\nmatch = { tables = [\"catalog_items\"] }\nttl = \"10m\"\nshare_across_roles = true\n\n\
         [[rule]]\nname = \"per-role\"\nmatch = { tables = [\"private_items\"] }\nttl = \"10m\"\n",
        |_| {},
    )
    .await;
    let superuser = e.proxy.connect(&e.db, "postgres").await;
    let other = e.proxy.connect(&e.db, &reader).await;
    // The superuser sees settings other roles do not (shared_preload_libraries, ...): they
    // cannot change a result, so they do not split the key.
    assert_eq!(text(&superuser, "SELECT name FROM catalog_items").await, "lamp");
    assert_eq!(text(&superuser, "SELECT name FROM private_items").await, "key");
    let (shared, private) =
        (executions(&e.admin, "FROM catalog_items").await, executions(&e.admin, "FROM private_items").await);
    assert_eq!(text(&other, "SELECT name FROM catalog_items").await, "lamp");
    assert_eq!(text(&other, "SELECT name FROM private_items").await, "key");
    assert_eq!(executions(&e.admin, "FROM catalog_items").await, shared, "shared across roles: a hit");
    assert_eq!(executions(&e.admin, "FROM private_items").await, private + 1, "per role: the other role's own fill");
}
