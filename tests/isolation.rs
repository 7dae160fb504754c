//! Transaction pooling isolates every client: a differential oracle. Clients share one or two
//! backends through pgcache, each running a random sequence of what changes a session — `SET`,
//! `RESET`, `RESET ALL`, `SET LOCAL`, `SET ROLE`, `RESET ROLE`, `set_config`, custom settings,
//! `DISCARD ALL`, settings changed inside a function, startup options — in and out of
//! transactions, in pipelines, disconnecting at random. Each client has a shadow: a direct
//! connection to Postgres that runs the same statements. After every statement the client's
//! observable state (every setting, `current_user`, `session_user`, the custom settings) must
//! equal its shadow's; with a cache-everything rule, so must the rows of setting-dependent
//! SELECTs. With pgcache's isolation turned off, the same oracle reports violations.

mod common;

use std::time::Duration;

use common::{PgCluster, Proxy, cache_env};
use pgcache::config::{Config, PoolMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, SimpleQueryMessage};

const TIME_ZONES: [&str; 4] = ["UTC", "Asia/Kathmandu", "America/New_York", "Europe/Paris"];
const CUSTOM: [&str; 2] = ["app.tenant", "app.other"];
const ROLES: [&str; 2] = ["iso_r1", "iso_r2"];
const OPTIONS: [&str; 4] = ["", "-c TimeZone=America/New_York", "-c app.tenant=9", "-c statement_timeout=777"];

/// What a session shows: every setting, the roles, and the custom settings it set itself
/// (one another client defined on a backend reads as '' there instead of NULL: Postgres
/// cannot undefine it; see the README's limits). An extension's settings at their defaults
/// (`plpgsql.*` appear once a backend has run a PL/pgSQL function) say which libraries a
/// backend loaded, not what a session set: they are left out.
fn state(named: &[&str]) -> String {
    let customs = named.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    format!(
        "SELECT name || '=' || setting FROM pg_catalog.pg_settings \
           WHERE NOT (name LIKE '%.%' AND source = 'default') \
         UNION ALL SELECT 'current_user=' || current_user UNION ALL SELECT 'session_user=' || session_user \
         UNION ALL SELECT n || '=' || coalesce(pg_catalog.current_setting(n, true), '<unset>') \
           FROM unnest(array[{customs}]::text[]) n ORDER BY 1"
    )
}

/// SELECTs whose rows depend on the session's settings (cached under a cache-everything rule).
const DEPENDENT: [&str; 2] =
    ["SELECT '2024-01-01 00:00:00+00'::timestamptz::text", "SELECT current_user::text, current_setting('DateStyle')"];

/// ... and on a custom setting the client set.
const DEPENDENT_CUSTOM: &str = "SELECT coalesce(current_setting('app.tenant', true), '-') AS tenant";

/// The outcome of a statement: its rows as text, or its SQLSTATE.
async fn outcome(c: &Client, sql: &str) -> Result<Vec<String>, String> {
    match c.simple_query(sql).await {
        Ok(msgs) => Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_owned()).collect::<Vec<_>>().join(","))
                }
                _ => None,
            })
            .collect()),
        Err(e) => Err(e.code().map(|c| c.code().to_owned()).unwrap_or_else(|| format!("no SQLSTATE: {e}"))),
    }
}

/// One client through pgcache and its shadow straight to Postgres.
struct Pair {
    proxied: Client,
    direct: Client,
    /// Custom settings this client has named itself (a function may set only those: see the
    /// README's limits).
    named: Vec<&'static str>,
    options: &'static str,
}

async fn connect(url: &str, options: &str) -> Client {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    if !options.is_empty() {
        config.options(options);
    }
    let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

struct Oracle {
    proxy_url: String,
    direct_url: String,
    rng: StdRng,
    pairs: Vec<Pair>,
    /// Compare the rows of setting-dependent SELECTs too (a cache-everything rule is loaded).
    dependent: bool,
    checks: usize,
    violations: Vec<String>,
    log: Vec<String>,
}

impl Oracle {
    async fn pair(&mut self) -> Pair {
        let options = OPTIONS[self.rng.random_range(0..OPTIONS.len())];
        let named = if options.contains("app.tenant") { vec!["app.tenant"] } else { Vec::new() };
        let proxied = connect(&self.proxy_url, options).await;
        let direct = connect(&self.direct_url, options).await;
        Pair { proxied, direct, named, options }
    }

    fn pick<T: Copy>(&mut self, of: &[T]) -> T {
        of[self.rng.random_range(0..of.len())]
    }

    /// A random statement that changes (or reads) session state; `in_tx`: inside BEGIN. With
    /// the custom setting it defines, if any.
    fn statement(&mut self, client: usize, in_tx: bool) -> (String, Option<&'static str>) {
        let tz = self.pick(&TIME_ZONES);
        let custom = self.pick(&CUSTOM);
        let role = self.pick(&ROLES);
        let n = self.rng.random_range(1..5);
        let choice = self.rng.random_range(0..if in_tx { 19 } else { 17 });
        let named = &self.pairs[client].named;
        let mut defines = None;
        let sql = match choice {
            0 => format!("SET TimeZone = '{tz}'"),
            1 => format!("SET statement_timeout = {}", n * 1000),
            2 => format!("SET search_path = {}", ["public", "s1, public", "\"$user\", public"][n % 3]),
            3 => format!("SET DateStyle = '{}'", ["ISO, MDY", "German", "SQL, DMY"][n % 3]),
            4 => {
                defines = Some(custom);
                format!("SET {custom} = 'v{n}'")
            }
            5 => format!("RESET {}", ["TimeZone", "statement_timeout", "app.tenant", "DateStyle"][n % 4]),
            6 => "RESET ALL".into(),
            7 => format!("SET ROLE {role}"),
            8 => "RESET ROLE".into(),
            9 => {
                defines = Some(custom);
                format!("SELECT set_config('{custom}', 'w{n}', false)")
            }
            10 => format!("SELECT set_config('TimeZone', '{tz}', false)"),
            11 => "DISCARD ALL".into(),
            12 => format!("SET TimeZone = '{tz}'; SELECT 1"),
            13 => format!("SELECT 1; SET statement_timeout = {}", n * 111),
            // Inside a function: a built-in setting, and a custom setting the client named.
            14 => format!("SELECT iso_set('TimeZone', '{tz}')"),
            15 => match named.first() {
                Some(name) => format!("SELECT iso_set('{name}', 'f{n}')"),
                None => format!("SELECT iso_set('work_mem', '{}MB')", n * 2),
            },
            16 => "SELECT 1".into(),
            17 => format!("SET LOCAL TimeZone = '{tz}'"),
            _ => {
                defines = Some(custom);
                format!("SELECT set_config('{custom}', 'l{n}', true)")
            }
        };
        (sql, defines)
    }

    /// A random statement run on both sides; a custom setting it defined (it succeeded
    /// straight to Postgres) is the client's from then on.
    async fn step(&mut self, client: usize, in_tx: bool) {
        let (sql, defines) = self.statement(client, in_tx);
        if self.run(client, &sql).await
            && let Some(name) = defines
            && !self.pairs[client].named.contains(&name)
        {
            self.pairs[client].named.push(name);
        }
    }

    /// Runs `sql` on both sides of `client` and compares the outcomes; whether it succeeded
    /// straight to Postgres.
    async fn run(&mut self, client: usize, sql: &str) -> bool {
        let pair = &self.pairs[client];
        let (a, b) = tokio::join!(outcome(&pair.proxied, sql), outcome(&pair.direct, sql));
        self.log.push(format!("client {client} ({}): {sql}", pair.options));
        if a != b {
            self.violations.push(format!("{sql}: through pgcache {a:?}, direct {b:?}"));
        }
        b.is_ok()
    }

    /// Compares what `client` observes with its shadow.
    async fn check(&mut self, client: usize) {
        self.checks += 1;
        let pair = &self.pairs[client];
        let state = state(&pair.named);
        let (a, b) = tokio::join!(outcome(&pair.proxied, &state), outcome(&pair.direct, &state));
        if a != b {
            let diff = match (&a, &b) {
                (Ok(a), Ok(b)) => {
                    let only_a: Vec<_> = a.iter().filter(|r| !b.contains(r)).collect();
                    let only_b: Vec<_> = b.iter().filter(|r| !a.contains(r)).collect();
                    format!("through pgcache {only_a:?}, direct {only_b:?}")
                }
                _ => format!("through pgcache {a:?}, direct {b:?}"),
            };
            let last = self.log.iter().rev().take(6).rev().cloned().collect::<Vec<_>>().join(" | ");
            self.violations.push(format!("client {client} state differs: {diff}; after: {last}"));
        }
        if self.dependent {
            for sql in DEPENDENT {
                self.run(client, sql).await;
            }
            if self.pairs[client].named.contains(&"app.tenant") {
                self.run(client, DEPENDENT_CUSTOM).await;
            }
        }
    }

    /// `steps` random steps over `clients` clients.
    async fn drive(&mut self, clients: usize, steps: usize) {
        for _ in 0..clients {
            let p = self.pair().await;
            self.pairs.push(p);
        }
        for _ in 0..steps {
            let client = self.rng.random_range(0..clients);
            match self.rng.random_range(0..10) {
                // Disconnect (just after a change, or not) and come back as a new client.
                0 => {
                    if self.rng.random_bool(0.5) {
                        self.step(client, false).await;
                    }
                    let fresh = self.pair().await;
                    self.log.push(format!("client {client} reconnects with options {:?}", fresh.options));
                    self.pairs[client] = fresh;
                }
                // A transaction of a few statements, committed or rolled back.
                1 | 2 => {
                    self.run(client, "BEGIN").await;
                    for _ in 0..self.rng.random_range(1..4) {
                        self.step(client, true).await;
                        self.check(client).await;
                    }
                    let end = if self.rng.random_bool(0.7) { "COMMIT" } else { "ROLLBACK" };
                    self.run(client, end).await;
                }
                // Two statements pipelined: the second sent before the first is answered.
                3 => {
                    let ((first, _), (second, _)) = (self.statement(client, false), self.statement(client, false));
                    let pair = &self.pairs[client];
                    let ((a1, a2), (b1, b2)) = tokio::join!(
                        async { tokio::join!(outcome(&pair.proxied, &first), outcome(&pair.proxied, &second)) },
                        async { tokio::join!(outcome(&pair.direct, &first), outcome(&pair.direct, &second)) },
                    );
                    self.log.push(format!("client {client}: pipelined {first} / {second}"));
                    if (a1.is_ok(), a2.is_ok()) != (b1.is_ok(), b2.is_ok()) {
                        self.violations.push(format!("pipeline {first} / {second}: {a1:?} {a2:?} vs {b1:?} {b2:?}"));
                    }
                }
                _ => self.step(client, false).await,
            }
            self.check(client).await;
        }
    }
}

/// Transaction pooling with `backends` connections, isolation on or off.
fn tune(c: &mut Config, backends: usize, isolate: bool) {
    c.pool.mode = PoolMode::Transaction;
    c.pool.max_size = backends;
    c.pool.acquire_timeout = Duration::from_secs(20);
    c.pool.isolate_sessions = isolate;
}

fn config(cluster: &PgCluster, backends: usize, isolate: bool) -> Config {
    let mut c = Proxy::config(cluster);
    tune(&mut c, backends, isolate);
    c
}

/// Roles, a schema and a function that sets any setting for the session.
const SCHEMA: &str = "
    DO $$ BEGIN CREATE ROLE iso_r1; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
    DO $$ BEGIN CREATE ROLE iso_r2; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
    CREATE SCHEMA IF NOT EXISTS s1;
    CREATE FUNCTION iso_set(name text, value text) RETURNS text LANGUAGE plpgsql VOLATILE AS
      $$ BEGIN RETURN set_config(name, value, false); END $$;";

async fn oracle(prefix: &str, backends: usize, isolate: bool, rules: Option<&str>, seed: u64) -> Oracle {
    let cluster = PgCluster::shared();
    let user = cluster.superuser();
    let (proxy, db, dir) = match rules {
        Some(rules) => {
            let env = cache_env(cluster, prefix, SCHEMA, rules, |c| tune(c, backends, isolate)).await;
            (env.proxy, env.db, Some(env.dir))
        }
        None => {
            let db = cluster.create_db(prefix).await;
            cluster.admin(&db).await.batch_execute(SCHEMA).await.unwrap();
            (Proxy::start(config(cluster, backends, isolate)).await, db, None)
        }
    };
    let mut o = Oracle {
        proxy_url: proxy.url(&db, &user),
        direct_url: cluster.url(&db, &user),
        rng: StdRng::seed_from_u64(seed),
        pairs: Vec::new(),
        dependent: rules.is_some(),
        checks: 0,
        violations: Vec::new(),
        log: Vec::new(),
    };
    o.drive(4, 150).await;
    drop(o.pairs.drain(..));
    drop(dir);
    proxy.shutdown().await;
    o
}

fn report(o: &Oracle) -> String {
    let shown: Vec<_> = o.violations.iter().take(5).cloned().collect();
    format!("{} violations in {} checks, first: {shown:#?}", o.violations.len(), o.checks)
}

const CACHE_ALL: &str = r#"
[[rule]]
name = "all"
match = { pattern = "." }
ttl = "60s"
allow_stable_functions = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_sees_only_its_own_session_over_one_backend() {
    for seed in [1, 2] {
        let o = oracle("iso_one", 1, true, None, seed).await;
        assert!(o.violations.is_empty(), "seed {seed}: {}", report(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_sees_only_its_own_session_over_two_backends() {
    let o = oracle("iso_two", 2, true, None, 3).await;
    assert!(o.violations.is_empty(), "{}", report(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_follow_each_clients_own_settings() {
    for (backends, seed) in [(1, 4), (2, 5)] {
        let o = oracle("iso_cache", backends, true, Some(CACHE_ALL), seed).await;
        assert!(o.violations.is_empty(), "{backends} backends, seed {seed}: {}", report(&o));
    }
}

/// The negative control: the same oracle, with pgcache handing backends over as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_sees_leaks_when_isolation_is_off() {
    let o = oracle("iso_off", 1, false, None, 1).await;
    assert!(o.violations.len() >= 5, "the oracle must catch leaks: {}", report(&o));
    let o = oracle("iso_off_cache", 1, false, Some(CACHE_ALL), 4).await;
    assert!(o.violations.len() >= 5, "the oracle must catch leaks with the cache: {}", report(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn soak() {
    let seeds: u64 = std::env::var("SOAK_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    for seed in 100..100 + seeds {
        for (backends, rules) in [(1, None), (2, None), (1, Some(CACHE_ALL)), (2, Some(CACHE_ALL))] {
            let o = oracle("iso_soak", backends, true, rules, seed).await;
            assert!(
                o.violations.is_empty(),
                "{backends} backends, seed {seed}, rules {}: {}",
                rules.is_some(),
                report(&o)
            );
        }
    }
    let o = oracle("iso_off", 1, false, None, 1).await;
    eprintln!("off: {}", report(&o));
}
