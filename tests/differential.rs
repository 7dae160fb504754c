//! Differential testing: a corpus of real SQL (`tests/corpus/*.sql`) runs statement by
//! statement straight to Postgres and through pgcache with a rule that caches every SELECT
//! (row-level security opted in), each side in a database of its own built the same way, and
//! every result must be identical: rows (text in the simple protocol, raw binary values in the
//! extended protocol), command tags, and errors (SQLSTATE and message). Every read runs twice
//! through pgcache, so cache hits are compared too.
//!
//! The corpus format is plain SQL; a line `-- @session NAME [user=ROLE] [options=...]` switches
//! to (and on first use opens) a session of that name on both sides, so tenants, roles and
//! settings can be told apart. To grow the corpus, add statements or files: anything whose
//! result does not depend on when or where it runs (no `now()`, `random()`, OIDs, pids).

mod common;

use std::collections::HashMap;

use common::{PgCluster, Proxy, rules_dir};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Any value as its raw bytes.
struct Raw(Vec<u8>);
impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// What a statement returned, comparable across the two sides.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Rows { columns: Vec<String>, rows: Vec<Vec<Option<String>>>, tags: Vec<u64> },
    Binary { columns: Vec<(String, Type)>, rows: Vec<Vec<Option<Vec<u8>>>> },
    Error { code: String, message: String },
}

fn error(e: tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(db) => Outcome::Error { code: db.code().code().to_owned(), message: db.message().to_owned() },
        None => Outcome::Error { code: "client".into(), message: e.to_string() },
    }
}

async fn simple(c: &Client, sql: &str) -> Outcome {
    match c.simple_query(sql).await {
        Ok(msgs) => {
            let (mut columns, mut rows, mut tags) = (Vec::new(), Vec::new(), Vec::new());
            for m in msgs {
                match m {
                    SimpleQueryMessage::RowDescription(d) => columns = d.iter().map(|c| c.name().to_owned()).collect(),
                    SimpleQueryMessage::Row(r) => {
                        rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                    }
                    SimpleQueryMessage::CommandComplete(n) => tags.push(n),
                    _ => {}
                }
            }
            Outcome::Rows { columns, rows, tags }
        }
        Err(e) => error(e),
    }
}

async fn extended(c: &Client, sql: &str) -> Outcome {
    match c.query(sql, &[]).await {
        Ok(rows) => Outcome::Binary {
            columns: rows
                .first()
                .map(|r| r.columns().iter().map(|c| (c.name().to_owned(), c.type_().clone())).collect())
                .unwrap_or_default(),
            rows: rows
                .iter()
                .map(|r| (0..r.len()).map(|i| r.get::<_, Option<Raw>>(i).map(|v| v.0)).collect())
                .collect(),
        },
        Err(e) => error(e),
    }
}

/// One side: a URL with `USER` where the role goes, and sessions by name.
struct Side {
    url: String,
    sessions: HashMap<String, Client>,
}

impl Side {
    async fn session(&mut self, name: &str, user: &str, options: Option<&str>) -> &Client {
        if !self.sessions.contains_key(name) {
            let mut url = self.url.replace("USER", user);
            if let Some(o) = options {
                url += &format!("&options={}", o.replace(' ', "%20").replace('=', "%3D"));
            }
            self.sessions.insert(name.to_owned(), common::proxy::connect(&url).await);
        }
        &self.sessions[name]
    }
}

/// Whether a statement only reads (run twice through pgcache and in both protocols), judged by
/// the parser (not by pgcache's own classifier, which is what is under test).
fn is_read(sql: &str) -> bool {
    let Ok(tree) = pg_query::parse(sql, 0) else { return false };
    let lower = sql.to_ascii_lowercase();
    tree.statement_types().iter().all(|t| *t == "SelectStmt")
        && tree.dml_tables().is_empty()
        && !lower.contains("set_config")
        && !lower.contains("nextval")
        && !lower.contains("set_who")
        && !lower.contains("fx_bump")
        && !lower.contains(" into ")
}

struct Directive {
    session: String,
    user: Option<String>,
    options: Option<String>,
}

fn directive(line: &str) -> Option<Directive> {
    let rest = line.trim().strip_prefix("-- @session")?;
    let mut words = rest.split_whitespace();
    let session = words.next()?.to_owned();
    let (mut user, mut options) = (None, None);
    let rest: Vec<&str> = words.collect();
    let joined = rest.join(" ");
    if let Some(i) = joined.find("options=") {
        options = Some(joined[i + 8..].to_owned());
    }
    for w in joined[..joined.find("options=").unwrap_or(joined.len())].split_whitespace() {
        if let Some(u) = w.strip_prefix("user=") {
            user = Some(u.to_owned());
        }
    }
    Some(Directive { session, user, options })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sql_corpus_gives_the_same_results_through_pgcache() {
    let cluster = PgCluster::shared();
    let superuser = cluster.superuser();
    let admin = cluster.admin("postgres").await;
    admin
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'diff_app') THEN CREATE ROLE diff_app LOGIN; END IF;
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'diff_other') THEN CREATE ROLE diff_other LOGIN; END IF;
             END $$;",
        )
        .await
        .unwrap();
    let direct_db = cluster.create_db("diff_direct").await;
    let cached_db = cluster.create_db("diff_cached").await;
    let dir = rules_dir(&[(
        "all.toml",
        "[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"10m\"\nallow_row_security = true\n",
    )]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    let proxy = Proxy::start(config).await;
    let mut direct = Side { url: cluster.url(&direct_db, "USER"), sessions: HashMap::new() };
    let mut cached = Side { url: proxy.url(&cached_db, "USER"), sessions: HashMap::new() };

    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&corpus).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let (mut statements, mut reads) = (0, 0);
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "sql")) {
        let text = std::fs::read_to_string(file).unwrap();
        let mut current = Directive { session: "main".into(), user: None, options: None };
        let mut chunk = String::new();
        let mut chunks: Vec<(String, Option<String>, Option<String>, String)> = Vec::new();
        for line in text.lines() {
            if let Some(d) = directive(line) {
                chunks.push((
                    current.session.clone(),
                    current.user.clone(),
                    current.options.clone(),
                    std::mem::take(&mut chunk),
                ));
                current = d;
            } else {
                chunk.push_str(line);
                chunk.push('\n');
            }
        }
        chunks.push((current.session, current.user, current.options, chunk));
        for (session, user, options, sql) in chunks {
            let user = user.unwrap_or_else(|| superuser.clone());
            let parts = pg_query::split_with_parser(&sql).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for stmt in parts.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
                statements += 1;
                let where_ = format!("{} [{session}]: {stmt}", file.file_name().unwrap().to_string_lossy());
                let d = direct.session(&session, &user, options.as_deref()).await;
                let want = simple(d, stmt).await;
                let c = cached.session(&session, &user, options.as_deref()).await;
                assert_eq!(simple(c, stmt).await, want, "{where_}");
                // A read that succeeded runs again (a hit, if it was cached) and through the
                // extended protocol. (A failed one is not repeated: in a transaction block the
                // repeat would only meet the aborted transaction.)
                if is_read(stmt) && !matches!(want, Outcome::Error { .. }) {
                    reads += 1;
                    assert_eq!(simple(c, stmt).await, want, "{where_} (again, from the cache)");
                    let d = direct.session(&session, &user, options.as_deref()).await;
                    let want = extended(d, stmt).await;
                    let c = cached.session(&session, &user, options.as_deref()).await;
                    assert_eq!(extended(c, stmt).await, want, "{where_} (extended protocol)");
                    if !matches!(want, Outcome::Error { .. }) {
                        assert_eq!(extended(c, stmt).await, want, "{where_} (extended protocol, again)");
                    }
                }
            }
        }
    }
    let t = proxy.shared.stats.totals();
    eprintln!(
        "{statements} statements, {reads} reads; pgcache: {} hits, {} misses, {} passthrough",
        t.hits, t.misses, t.passthrough
    );
    assert!(statements > 150 && t.hits > 100, "{statements} statements, {} hits", t.hits);
}

/// Extended-protocol exchanges as real clients send them, byte for byte through a
/// cache-everything rule: every answer, an error included, comes where Postgres sends it (psql's
/// `\gdesc` prepares, then describes: a syntax error belongs to the Parse, with its position).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_exchanges_answer_each_message_where_postgres_does() {
    use common::raw::{RawConn, batch, bind, describe, execute, parse, query, sync};
    let cluster = PgCluster::shared();
    let db = cluster.create_db("diff_raw").await;
    cluster
        .admin(&db)
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    let dir = rules_dir(&[("all.toml", "[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"10m\"\n")]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    let proxy = Proxy::start(config).await;
    let user = cluster.superuser();
    let mut direct =
        RawConn::connect(format!("{}:{}", cluster.host, cluster.port).parse().unwrap(), &user, &db, &[]).await;
    let mut proxied = RawConn::connect(proxy.addr, &user, &db, &[]).await;
    let select = "SELECT v FROM t WHERE id = $1";
    let exchanges: Vec<(&str, Vec<u8>)> = vec![
        // Fill the cache first, so the later exchanges could be answered from it.
        (
            "a cached read",
            batch(&[
                parse("", select, &[]),
                bind("", "", &[Some("1")], &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ])
            .to_vec(),
        ),
        (
            "the same, a hit",
            batch(&[
                parse("", select, &[]),
                bind("", "", &[Some("1")], &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ])
            .to_vec(),
        ),
        ("\\gdesc of invalid SQL: Parse", batch(&[parse("", "SELECT 1 + ", &[]), sync()]).to_vec()),
        ("\\gdesc of invalid SQL: Describe", batch(&[describe(b'S', ""), sync()]).to_vec()),
        ("\\gdesc of a cached read: Parse", batch(&[parse("", select, &[]), sync()]).to_vec()),
        ("\\gdesc of a cached read: Describe", batch(&[describe(b'S', ""), sync()]).to_vec()),
        ("a Parse of an unknown table", batch(&[parse("", "SELECT * FROM nowhere", &[]), sync()]).to_vec()),
        ("a named Parse, alone", batch(&[parse("s1", select, &[]), sync()]).to_vec()),
        ("the named statement, a hit", batch(&[bind("", "s1", &[Some("1")], &[]), execute("", 0), sync()]).to_vec()),
    ];
    for (what, frames) in exchanges {
        let d = direct.exchange(&frames, 1).await;
        let p = proxied.exchange(&frames, 1).await;
        assert_eq!(d, p, "{what}: transcripts differ");
    }
    // Pipelined simple queries (tokio-postgres sends the next one once it has read an error):
    // a cached read behind a statement that fails its transaction gets 25P02, as from Postgres.
    let read = query("SELECT v FROM t WHERE id = 1");
    for _ in 0..2 {
        let (d, p) = (direct.exchange(&read, 1).await, proxied.exchange(&read, 1).await);
        assert_eq!(d, p, "a simple read, then a hit");
    }
    let pipelined = batch(&[query("BEGIN"), query("SELECT 1/0"), read.clone(), query("ROLLBACK")]).to_vec();
    let d = direct.exchange(&pipelined, 4).await;
    let p = proxied.exchange(&pipelined, 4).await;
    assert_eq!(d, p, "a cached read pipelined behind a failing statement of its transaction");
    assert!(proxy.shared.stats.totals().hits >= 2, "the reads were served from the cache");
}
