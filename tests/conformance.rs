//! Conformance: the same conversation, directly with Postgres and through pgcache, must give
//! the client the same messages, byte for byte (after start-up, where pgcache hands out its
//! own cancel key).

mod common;

use common::raw::{self, Msg, RawConn, batch, bind, describe, execute, parse, query, sync};
use common::{PgCluster, Proxy};

const SETUP: &str = "
    CREATE TABLE uniq (id int PRIMARY KEY, v text);
    INSERT INTO uniq VALUES (1, 'one');
    CREATE TABLE series AS SELECT g AS n, md5(g::text) AS h FROM generate_series(1, 50) g;
";

const TYPES: &str = "SELECT 1::int2 AS a, 2::int4, 3::int8, 1.50::numeric, 0.1::float4, 0.1::float8, \
     'NaN'::float8, 'x'::text, '\\x00ff'::bytea, true, '{\"a\": 1}'::json, '{\"b\": 2}'::jsonb, \
     ARRAY[1,2,NULL]::int4[], '{\"x\",\"y z\"}'::text[], '2024-01-02 03:04:05.678+00'::timestamptz, \
     '1 day 02:03:04'::interval, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, NULL::int, \
     '2024-02-29'::date, 12.5::money";

struct Pair {
    direct: RawConn,
    proxied: RawConn,
}

impl Pair {
    async fn open(cluster: &PgCluster, proxy: &Proxy, db: &str, extra: &[(&str, &str)]) -> Pair {
        let user = cluster.superuser();
        let direct_addr = format!("{}:{}", cluster.host, cluster.port).parse().unwrap();
        let direct = RawConn::connect(direct_addr, &user, db, extra).await;
        let proxied = RawConn::connect(proxy.addr, &user, db, extra).await;
        assert_eq!(direct.params, proxied.params, "ParameterStatus at start-up");
        Pair { direct, proxied }
    }

    /// Sends the same frames to both and asserts identical answers; returns them.
    async fn same(&mut self, what: &str, frames: &[u8], readies: usize) -> Vec<Msg> {
        let d = self.direct.exchange(frames, readies).await;
        let p = tokio::time::timeout(std::time::Duration::from_secs(10), self.proxied.exchange(frames, readies))
            .await
            .unwrap_or_else(|_| panic!("{what}: pgcache did not answer; Postgres sent {d:?}"));
        assert_eq!(d, p, "{what}: transcripts differ");
        d
    }
}

async fn setup() -> (&'static PgCluster, Proxy, String) {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("conf").await;
    cluster.admin(&db).await.batch_execute(SETUP).await.unwrap();
    (cluster, Proxy::with_defaults(cluster).await, db)
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_protocol_transcripts_match_postgres() {
    let (cluster, proxy, db) = setup().await;
    let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
    let types = p.same("types as text", &query(TYPES), 1).await;
    assert_eq!(tags(&types), "TDCZ");
    p.same("multi-statement string", &query("SELECT 1; SELECT 'two'::text AS t; SELECT NULL"), 1).await;
    let empty = p.same("empty query", &query(""), 1).await;
    assert_eq!(tags(&empty), "IZ");
    p.same("only a semicolon", &query(";"), 1).await;
    let syntax = p.same("syntax error with position", &query("SELEC 1"), 1).await;
    assert!(String::from_utf8_lossy(&syntax[0].body).contains("P1\0"), "{syntax:?}");
    let dup = p.same("unique violation", &query("INSERT INTO uniq VALUES (1, 'again')"), 1).await;
    let body = String::from_utf8_lossy(&dup[0].body).into_owned();
    assert!(body.contains("C23505") && body.contains("nuniq_pkey"), "{body}");
    let notice = p.same("notice", &query("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$"), 1).await;
    assert_eq!(tags(&notice), "NCZ");
    p.same("ParameterStatus on SET", &query("SET application_name = 'conformance'"), 1).await;
    p.same("rows from a table", &query("SELECT * FROM series ORDER BY n"), 1).await;
    p.same("extra_float_digits", &query("SET extra_float_digits = 3; SELECT 0.1::float8, 1e100::float4"), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_match_postgres() {
    let (cluster, proxy, db) = setup().await;
    let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
    // Each side writes its own temp table, so the two sessions never wait on each other.
    p.same("temp table", &query("CREATE TEMP TABLE tt (id int PRIMARY KEY)"), 1).await;
    let begin = p.same("begin", &query("BEGIN"), 1).await;
    assert_eq!(begin.last().unwrap().body.as_ref(), b"T");
    p.same("insert in transaction", &query("INSERT INTO tt VALUES (2)"), 1).await;
    p.same("rollback", &query("ROLLBACK"), 1).await;
    p.same("rolled back row is gone", &query("SELECT count(*) FROM tt"), 1).await;
    p.same("begin", &query("BEGIN"), 1).await;
    let failed = p.same("error in transaction", &query("SELECT 1/0"), 1).await;
    assert_eq!(failed.last().unwrap().body.as_ref(), b"E");
    let aborted = p.same("statement in failed transaction", &query("SELECT 1"), 1).await;
    assert!(String::from_utf8_lossy(&aborted[0].body).contains("25P02"));
    p.same("rollback failed", &query("ROLLBACK"), 1).await;
    p.same(
        "commit path",
        &query("BEGIN; CREATE TEMP TABLE t(x int); INSERT INTO t VALUES (1); COMMIT; SELECT x + 0 AS x FROM t"),
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_transcripts_match_postgres() {
    let (cluster, proxy, db) = setup().await;
    let mut p =
        Pair::open(cluster, &proxy, &db, &[("extra_float_digits", "3"), ("TimeZone", "America/New_York")]).await;

    let binary = batch(&[parse("", TYPES, &[]), bind("", "", &[], &[1]), describe(b'P', ""), execute("", 0), sync()]);
    let got = p.same("types in binary", &binary, 1).await;
    assert_eq!(tags(&got), "12TDCZ");
    let text = batch(&[parse("", TYPES, &[]), bind("", "", &[], &[0]), describe(b'P', ""), execute("", 0), sync()]);
    p.same("types in text", &text, 1).await;

    p.same(
        "named statement",
        &batch(&[parse("s1", "SELECT n, h FROM series WHERE n = $1", &[23]), describe(b'S', "s1"), sync()]),
        1,
    )
    .await;
    for i in 1..=50 {
        let v = i.to_string();
        let frames = batch(&[bind("", "s1", &[Some(&v)], &[1, 0]), execute("", 0), sync()]);
        p.same("prepared statement reused", &frames, 1).await;
    }

    let pipeline = batch(&[
        parse("", "SELECT $1::int + 1", &[]),
        bind("", "", &[Some("41")], &[]),
        execute("", 0),
        bind("", "s1", &[Some("7")], &[]),
        execute("", 0),
        sync(),
        parse("", "SELECT count(*) FROM series", &[]),
        bind("", "", &[], &[]),
        execute("", 0),
        sync(),
    ]);
    let got = p.same("pipelined batches", &pipeline, 2).await;
    assert_eq!(tags(&got), "12DC2DCZ12DCZ");

    let with_error = batch(&[
        parse("", "SELECT 1/0", &[]),
        bind("", "", &[], &[]),
        execute("", 0),
        bind("", "s1", &[Some("1")], &[]),
        execute("", 0),
        sync(),
    ]);
    let got = p.same("error skips to Sync", &with_error, 1).await;
    // 1/0 is folded while planning, so Bind fails and everything up to Sync is skipped.
    assert_eq!(tags(&got), "1EZ");

    let portal = batch(&[
        query("BEGIN").as_ref().into(),
        parse("p", "SELECT n FROM series ORDER BY n", &[]),
        bind("cur", "p", &[], &[]),
        execute("cur", 20),
        execute("cur", 20),
        execute("cur", 20),
        sync(),
        query("COMMIT").as_ref().into(),
    ]);
    let got = p.same("portal with row limit", &portal, 3).await;
    assert_eq!(got.iter().filter(|m| m.tag == b's').count(), 2, "two PortalSuspended");

    let closes =
        batch(&[raw::close(b'S', "s1"), raw::close(b'P', "nope"), sync(), bind("", "s1", &[Some("1")], &[]), sync()]);
    let got = p.same("close statement, then use it", &closes, 2).await;
    assert_eq!(tags(&got), "33ZEZ");

    // Flush without Sync: answers arrive, no ReadyForQuery until the Sync.
    let flushed = batch(&[parse("", "SELECT 5", &[]), bind("", "", &[], &[]), execute("", 0), raw::flush()]);
    p.direct.send(&flushed).await;
    p.proxied.send(&flushed).await;
    let mut d = Vec::new();
    let mut q = Vec::new();
    for _ in 0..4 {
        d.push(p.direct.recv().await);
        q.push(p.proxied.recv().await);
    }
    assert_eq!(d, q, "flush");
    assert_eq!(tags(&d), "12DC");
    p.same("sync after flush", &sync(), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_transcripts_match_postgres() {
    let (cluster, proxy, db) = setup().await;
    let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
    let out = p.same("copy out", &query("COPY (SELECT n, h FROM series ORDER BY n) TO STDOUT"), 1).await;
    assert_eq!(out.iter().filter(|m| m.tag == b'd').count(), 50);
    p.same("temp table", &query("CREATE TEMP TABLE c (n int, h text)"), 1).await;
    for conn in [&mut p.direct, &mut p.proxied] {
        conn.send(&query("COPY c FROM STDIN")).await;
        assert_eq!(conn.recv().await.tag, b'G');
        let mut data = BytesMutExt::new();
        for i in 0..1000 {
            data.push(raw::frame(b'd', format!("{i}\tx{i}\n").as_bytes()));
        }
        data.push(raw::frame(b'c', &[]));
        conn.send(&data.0).await;
    }
    let d = p.direct.until_ready(1).await;
    let q = p.proxied.until_ready(1).await;
    assert_eq!(d, q, "copy in");
    assert_eq!(String::from_utf8_lossy(&d[0].body), "COPY 1000\0");
    p.same("copied rows", &query("SELECT count(*), sum(n) FROM c"), 1).await;
    // CopyFail from the client aborts the COPY with an error.
    for conn in [&mut p.direct, &mut p.proxied] {
        conn.send(&query("COPY c FROM STDIN")).await;
        assert_eq!(conn.recv().await.tag, b'G');
        conn.send(&raw::frame(b'f', b"client gave up\0")).await;
    }
    assert_eq!(p.direct.until_ready(1).await, p.proxied.until_ready(1).await, "copy fail");
}

struct BytesMutExt(bytes::BytesMut);
impl BytesMutExt {
    fn new() -> Self {
        BytesMutExt(bytes::BytesMut::new())
    }
    fn push(&mut self, b: bytes::BytesMut) {
        self.0.extend_from_slice(&b);
    }
}

/// Any column as its raw wire bytes, whatever its type.
struct RawValue(Vec<u8>);
impl<'a> tokio_postgres::types::FromSql<'a> for RawValue {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw.to_vec()))
    }
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

async fn raw_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<Vec<u8>>>> {
    let rows = client.query(sql, &[]).await.unwrap();
    rows.iter().map(|r| (0..r.len()).map(|i| r.get::<_, Option<RawValue>>(i).map(|v| v.0)).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_values_match_in_binary_and_text() {
    let (cluster, proxy, db) = setup().await;
    let user = cluster.superuser();
    let direct = common::proxy::connect(&cluster.url(&db, &user)).await;
    let proxied = proxy.connect(&db, &user).await;
    assert_eq!(raw_rows(&direct, TYPES).await, raw_rows(&proxied, TYPES).await, "binary values");
    let text = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| {
        msgs.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect::<Vec<_>>())
                }
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        text(direct.simple_query(TYPES).await.unwrap()),
        text(proxied.simple_query(TYPES).await.unwrap()),
        "text values"
    );
    let e1 = direct.query("SELECT * FROM missing_table", &[]).await.unwrap_err();
    let e2 = proxied.query("SELECT * FROM missing_table", &[]).await.unwrap_err();
    let (d, p) = (e1.as_db_error().unwrap(), e2.as_db_error().unwrap());
    assert_eq!((d.code(), d.message(), d.position()), (p.code(), p.message(), p.position()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_apply_and_reset_returns_to_them() {
    let (cluster, proxy, db) = setup().await;
    let user = cluster.superuser();
    let url = format!(
        "{}&options=-c%20intervalstyle%3Diso_8601%20-c%20search_path%3Dpg_catalog&application_name=myapp",
        proxy.url(&db, &user)
    );
    let c = common::proxy::connect(&url).await;
    assert_eq!(one(&c, "SHOW intervalstyle").await, "iso_8601");
    assert_eq!(one(&c, "SHOW search_path").await, "pg_catalog");
    assert_eq!(one(&c, "SHOW application_name").await, "myapp");
    c.batch_execute("SET intervalstyle = postgres; SET application_name = other").await.unwrap();
    assert_eq!(one(&c, "SHOW intervalstyle").await, "postgres");
    c.batch_execute("RESET intervalstyle; RESET application_name").await.unwrap();
    assert_eq!(one(&c, "SHOW intervalstyle").await, "iso_8601", "RESET returns to the startup value");
    assert_eq!(one(&c, "SHOW application_name").await, "myapp");
    c.batch_execute("SET DateStyle = German").await.unwrap();
    c.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(one(&c, "SHOW intervalstyle").await, "iso_8601", "RESET ALL returns to the startup value");
    drop(c);

    // A client without those options gets a connection started without them.
    let plain = proxy.connect(&db, &user).await;
    assert_eq!(one(&plain, "SHOW intervalstyle").await, "postgres");
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    for m in c.simple_query(sql).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return r.get(0).unwrap_or("NULL").to_owned();
        }
    }
    panic!("no row from {sql}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_is_reused_and_reset() {
    let (cluster, proxy, db) = setup().await;
    let user = cluster.superuser();
    let first = proxy.connect(&db, &user).await;
    let pid = one(&first, "SELECT pg_backend_pid()").await;
    first
        .batch_execute("SET work_mem = '7MB'; CREATE TEMP TABLE scratch(x int); PREPARE q AS SELECT 1; LISTEN chan; SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    drop(first);
    assert!(
        common::eventually(std::time::Duration::from_secs(5), || proxy
            .shared
            .pools
            .all()
            .iter()
            .any(|p| p.stats().idle == 1))
        .await
    );
    let second = proxy.connect(&db, &user).await;
    assert_eq!(one(&second, "SELECT pg_backend_pid()").await, pid, "the backend was reused");
    assert_eq!(one(&second, "SHOW work_mem").await, "4MB", "settings were reset");
    assert_eq!(one(&second, "SELECT count(*) FROM pg_prepared_statements").await, "0");
    assert_eq!(one(&second, "SELECT to_regclass('pg_temp.scratch') IS NULL").await, "t");
    assert_eq!(one(&second, "SELECT count(*) FROM pg_listening_channels()").await, "0");
    assert_eq!(one(&second, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_passes_through_untouched() {
    let (cluster, proxy, db) = setup().await;
    let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
    // FunctionCall (fast path) of int4abs (oid 1397) with one binary int4 argument.
    let mut body = 1397i32.to_be_bytes().to_vec();
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&(-5i32).to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    let got = p.same("function call", &raw::frame(b'F', &body), 1).await;
    assert_eq!(tags(&got), "VZ");
    assert_eq!(&got[0].body[4..], &5i32.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_protocol_minor_is_negotiated_down_to_3_0() {
    let (cluster, proxy, _db) = setup().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut body = ((3 << 16) | 2i32).to_be_bytes().to_vec();
    for part in ["user", &cluster.superuser(), "database", "postgres", "_pq_.made_up", "1", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&packet).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut first = None;
    while first.is_none() {
        s.read_buf(&mut buf).await.unwrap();
        first = pgcache::protocol::frame::take_frame(&mut buf, 1 << 20).unwrap();
    }
    let first = first.unwrap();
    assert_eq!(first.tag(), b'v', "NegotiateProtocolVersion first");
    assert_eq!(&first.body()[..8], &[0, 0, 0, 0, 0, 0, 0, 1], "3.0 and one unsupported option");
    assert_eq!(&first.body()[8..], b"_pq_.made_up\0");
}

impl Pair {
    /// Sends the same frames to both and compares the next `n` messages (no Sync needed).
    async fn same_n(&mut self, what: &str, frames: &[u8], n: usize) -> Vec<Msg> {
        self.direct.send(frames).await;
        self.proxied.send(frames).await;
        let (mut d, mut p) = (Vec::new(), Vec::new());
        for _ in 0..n {
            d.push(self.direct.recv().await);
            p.push(tokio::time::timeout(std::time::Duration::from_secs(5), self.proxied.recv()).await.unwrap_or_else(
                |_| panic!("{what}: pgcache did not answer; Postgres sent {d:?}, pgcache so far {p:?}"),
            ));
        }
        assert_eq!(d, p, "{what}: transcripts differ");
        d
    }
}

/// The extended protocol's error paths, with and without the cache in play.
async fn error_paths(p: &mut Pair) {
    // asyncpg after an error in a transaction: Parse/Describe/Flush gets the error, then
    // Sync, then a simple ROLLBACK.
    p.same("begin", &query("BEGIN"), 1).await;
    p.same(
        "failing statement",
        &batch(&[parse("", "SELECT 1/0", &[]), bind("", "", &[], &[]), execute("", 0), sync()]),
        1,
    )
    .await;
    let flushed = p
        .same_n(
            "parse after error, flushed",
            &batch(&[parse("a1", "SELECT 2", &[]), describe(b'S', "a1"), raw::flush()]),
            1,
        )
        .await;
    assert_eq!(tags(&flushed), "E");
    let synced = p.same("sync after the flushed error", &sync(), 1).await;
    assert_eq!(synced.last().unwrap().body.as_ref(), b"E");
    let rolled = p.same("rollback after the flushed error", &query("ROLLBACK"), 1).await;
    assert_eq!(tags(&rolled), "CZ");

    // An error in the middle of pipelined batches: the rest of its batch is skipped, the
    // next batch runs.
    let pipelined = batch(&[
        parse("", "SELECT n FROM series WHERE n = 1", &[]),
        bind("", "", &[], &[]),
        execute("", 0),
        parse("", "SELECT n / 0 FROM series", &[]),
        bind("", "", &[], &[]),
        execute("", 0),
        parse("", "SELECT n FROM series WHERE n = 2", &[]),
        bind("", "", &[], &[]),
        execute("", 0),
        sync(),
        parse("", "SELECT n FROM series WHERE n = 3", &[]),
        bind("", "", &[], &[]),
        describe(b'P', ""),
        execute("", 0),
        sync(),
    ]);
    let got = p.same("error mid-pipeline", &pipelined, 2).await;
    assert_eq!(tags(&got), "12DC12EZ12TDCZ");

    // Everything after a failed Parse is skipped up to Sync.
    let after_parse = batch(&[
        parse("bad", "SELEKT 1", &[]),
        describe(b'S', "bad"),
        bind("", "bad", &[], &[]),
        execute("", 0),
        raw::close(b'S', "bad"),
        sync(),
        bind("", "bad", &[], &[]),
        sync(),
    ]);
    let got = p.same("after a failed parse", &after_parse, 2).await;
    assert_eq!(tags(&got), "EZEZ");

    // An error while a portal is suspended.
    let suspended = batch(&[
        query("BEGIN").as_ref().into(),
        parse("susp", "SELECT 10 / (5 - g) FROM generate_series(1, 10) g", &[]),
        bind("cur", "susp", &[], &[]),
        execute("cur", 2),
        sync(),
        execute("cur", 10),
        sync(),
        query("ROLLBACK").as_ref().into(),
    ]);
    let got = p.same("error in a suspended portal", &suspended, 4).await;
    assert!(tags(&got).contains("DDsZ") && tags(&got).contains("EZ"), "{}", tags(&got));

    // A statement that may be a cache hit or fill in the same batch as an error, twice.
    for round in 0..2 {
        let mixed = batch(&[
            parse("", "SELECT h FROM series WHERE n = 7", &[]),
            bind("", "", &[], &[]),
            describe(b'P', ""),
            execute("", 0),
            parse("", "SELECT missing_column FROM series", &[]),
            bind("", "", &[], &[]),
            execute("", 0),
            sync(),
            parse("", "SELECT h FROM series WHERE n = 7", &[]),
            bind("", "", &[], &[]),
            execute("", 0),
            sync(),
        ]);
        let got = p.same(&format!("hit or fill beside an error, round {round}"), &mixed, 2).await;
        assert_eq!(tags(&got), "12TDCEZ12DCZ");
        // An error before the cacheable statement in its batch.
        let before = batch(&[
            parse("", "SELECT 1/0", &[]),
            bind("", "", &[], &[]),
            execute("", 0),
            parse("", "SELECT h FROM series WHERE n = 8", &[]),
            bind("", "", &[], &[]),
            execute("", 0),
            sync(),
            query("SELECT h FROM series WHERE n = 8").as_ref().into(),
        ]);
        let got = p.same(&format!("error before a cacheable statement, round {round}"), &before, 2).await;
        assert_eq!(tags(&got), "1EZTDCZ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_error_paths_match_postgres() {
    let (cluster, proxy, db) = setup().await;
    let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
    error_paths(&mut p).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_error_paths_match_postgres_with_everything_cached() {
    let cluster = PgCluster::shared();
    let db = cluster.create_db("conf").await;
    cluster.admin(&db).await.batch_execute(SETUP).await.unwrap();
    let dir =
        common::rules_dir(&[("all.toml", "[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"60s\"\n")]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    let proxy = Proxy::start(config).await;
    let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
    error_paths(&mut p).await;
    let hits = proxy.shared.stats.totals().hits;
    assert!(hits >= 2, "the second round was answered from the cache ({hits} hits)");
}

/// Requests answered whole from the cache — the short way taken while the backend is idle (or,
/// in transaction pooling, while the session has none) — match Postgres too: a named statement
/// parsed by such a batch is there when a later request needs the backend, a second Parse of
/// its name is refused, and a simple Query hit ends as Postgres ends it.
async fn answered_whole(p: &mut Pair) {
    const SQL: &str = "SELECT h FROM series WHERE n = $1";
    let read = |name: &str, n: &str| {
        batch(&[parse(name, SQL, &[23]), bind("", name, &[Some(n)], &[]), describe(b'P', ""), execute("", 0), sync()])
    };
    p.same("fill", &read("", "3"), 1).await;
    let got = p.same("a named statement parsed by a cached batch", &read("w1", "3"), 1).await;
    assert_eq!(tags(&got), "12TDCZ");
    let got = p.same("its name parsed again", &read("w1", "3"), 1).await;
    assert_eq!(tags(&got), "EZ", "42P05 from Postgres");
    // Refused, so the name keeps its statement (not this one's text, nor its cached results).
    let other = batch(&[parse("w1", "SELECT n FROM series WHERE n = $1", &[23]), sync()]);
    let got = p.same("its name parsed again with other text", &other, 1).await;
    assert_eq!(tags(&got), "EZ");
    let fill_other = batch(&[
        parse("", "SELECT n FROM series WHERE n = $1", &[23]),
        bind("", "", &[Some("3")], &[]),
        execute("", 0),
        sync(),
    ]);
    p.same("the other text, cached", &fill_other, 1).await;
    p.same("the other text, from the cache", &fill_other, 1).await;
    let bound = batch(&[bind("", "w1", &[Some("3")], &[]), execute("", 0), sync()]);
    p.same("the name still runs its own statement", &bound, 1).await;
    let later = batch(&[describe(b'S', "w1"), bind("", "w1", &[Some("4")], &[]), execute("", 0), sync()]);
    let got = p.same("the statement, when the backend needs it", &later, 1).await;
    assert_eq!(tags(&got), "tT2DCZ");
    for round in 0..3 {
        p.same(
            &format!("reused, round {round}"),
            &batch(&[bind("", "w1", &[Some("3")], &[]), execute("", 0), sync()]),
            1,
        )
        .await;
        p.same(&format!("simple query, round {round}"), &query("SELECT h FROM series WHERE n = 5"), 1).await;
    }
    let got = p.same("a transaction after them", &query("BEGIN; SELECT h FROM series WHERE n = 5; COMMIT"), 1).await;
    assert_eq!(tags(&got), "CTDCCZ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_whole_from_the_cache_match_postgres() {
    for mode in [pgcache::config::PoolMode::Session, pgcache::config::PoolMode::Transaction] {
        let cluster = PgCluster::shared();
        let db = cluster.create_db("conf").await;
        cluster.admin(&db).await.batch_execute(SETUP).await.unwrap();
        let rule = "[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"60s\"\n";
        let dir = common::rules_dir(&[("all.toml", rule)]);
        let mut config = Proxy::config(cluster);
        config.rules = dir.path().to_owned();
        config.rules_explicit = true;
        config.pool.mode = mode;
        let proxy = Proxy::start(config).await;
        let mut p = Pair::open(cluster, &proxy, &db, &[]).await;
        answered_whole(&mut p).await;
        let hits = proxy.shared.stats.totals().hits;
        assert!(hits >= 7, "{mode:?}: the repeated reads were answered from the cache ({hits} hits)");
    }
}
