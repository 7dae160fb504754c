//! The data path in-process, without pgbench: a raw client sends prepared-statement executions
//! (Bind/Execute/Sync, the messages drivers send) and reads the answers up to ReadyForQuery,
//! through pgcache with a rule (every execution a cache hit; and, with keys never asked
//! before, every one a miss), through pgcache without rules (pass-through), and to Postgres
//! directly; and the simple protocol's miss against pass-through, with a new text per key. Each is measured one request at a time (the round
//! trip a client waits for) and 64 requests pipelined in one write (which amortizes the socket
//! wake-ups and leaves mostly pgcache's own work per statement).
//!
//! Needs PostgreSQL's server binaries (a throwaway cluster is started), or an existing server
//! in `PGCACHE_TEST_DATABASE_URL`. Run: `cargo bench --bench relay`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgcache::config::Config;
use pgcache::context::Context;
use pgcache::demo::cluster::{Cluster, Options};
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const KEYS: i32 = 1000;
const PIPELINE: usize = 64;
const SQL: &str = "SELECT abalance FROM bench_accounts WHERE aid = $1";

/// A raw protocol client with one prepared statement.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    next: i32,
    /// Its keys: `first`, `first + 1`, … cycling after `keys` of them.
    first: i32,
    keys: i32,
    /// The simple protocol: each execution a Query with the key inlined (a new text per key).
    simple: bool,
}

impl Client {
    async fn connect(addr: SocketAddr, first: i32, keys: i32, simple: bool) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = Client { stream, buf: BytesMut::with_capacity(64 * 1024), next: 0, first, keys, simple };
        let mut out = BytesMut::new();
        frontend::startup_message([("user", "postgres"), ("database", "postgres")], &mut out).unwrap();
        c.stream.write_all(&out).await.unwrap();
        c.until_ready(1).await;
        out.clear();
        frontend::parse("s", SQL, [23], &mut out).unwrap();
        frontend::sync(&mut out);
        c.stream.write_all(&out).await.unwrap();
        c.until_ready(1).await;
        c
    }

    /// Reads until `n` ReadyForQuery messages have arrived; panics on an ErrorResponse.
    async fn until_ready(&mut self, mut n: usize) {
        while n > 0 {
            while self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize + 1;
                if self.buf.len() < len {
                    break;
                }
                let tag = self.buf[0];
                assert_ne!(tag, b'E', "error from the server: {:?}", String::from_utf8_lossy(&self.buf[..len]));
                self.buf.advance(len);
                if tag == b'Z' {
                    n -= 1;
                    if n == 0 {
                        return;
                    }
                }
            }
            if self.stream.read_buf(&mut self.buf).await.unwrap() == 0 {
                panic!("server closed the connection");
            }
        }
    }

    /// Sends `n` executions of the statement (each Bind/Execute/Sync) and waits for them all.
    async fn execute(&mut self, n: usize) {
        let mut out = BytesMut::new();
        for _ in 0..n {
            let aid = self.first + self.next % self.keys;
            self.next += 1;
            if self.simple {
                frontend::query(&SQL.replace("$1", &aid.to_string()), &mut out).unwrap();
                continue;
            }
            frontend::bind(
                "",
                "s",
                [1],
                [aid],
                |v, buf| {
                    buf.extend_from_slice(&v.to_be_bytes());
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(IsNull::No)
                },
                [1],
                &mut out,
            )
            .map_err(|_| "bind")
            .unwrap();
            frontend::execute("", 0, &mut out).unwrap();
            frontend::sync(&mut out);
        }
        self.stream.write_all(&out).await.unwrap();
        self.until_ready(n).await;
    }
}

/// pgcache in-process in front of `upstream`, with the rules in `rules` (if any).
async fn proxy(upstream: &str, rules: Option<&std::path::Path>) -> (SocketAddr, CancellationToken) {
    let mut config = Config::for_upstream(upstream).unwrap();
    config.listen = "127.0.0.1:0".parse().unwrap();
    // The raw client speaks no authentication; the throwaway cluster trusts loopback anyway.
    config.auth.method = pgcache::config::AuthMethod::Trust;
    match rules {
        Some(dir) => {
            config.rules = dir.to_owned();
            config.rules_explicit = true;
        }
        None => {
            config.rules = "/nonexistent/pgcache-bench-rules".into();
            config.rules_explicit = false;
        }
    }
    let listener = pgcache::server::bind(&config).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let ctx: Arc<Context> = Context::new(config, shutdown.clone()).unwrap();
    tokio::spawn(pgcache::server::run(listener, ctx));
    (addr, shutdown)
}

fn bench(c: &mut Criterion) {
    let cluster;
    let upstream = match std::env::var("PGCACHE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            cluster = Cluster::start(&Options { watchdog: true, ..Default::default() }).expect("a throwaway cluster");
            cluster
                .psql(
                    "postgres",
                    "DROP TABLE IF EXISTS bench_accounts; \
                     CREATE TABLE bench_accounts (aid int PRIMARY KEY, abalance int NOT NULL); \
                     INSERT INTO bench_accounts SELECT g, g % 100 FROM generate_series(1, 1000) g; ANALYZE bench_accounts;",
                )
                .unwrap();
            cluster.url("postgres")
        }
    };
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(
        rules.path().join("bench.toml"),
        "[[rule]]\nname = \"accounts\"\nmatch = { tables = [\"bench_accounts\"] }\nttl = \"1h\"\n",
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let direct: SocketAddr = {
        let up: pgcache::config::Upstream = upstream.parse().unwrap();
        let pgcache::config::Host::Tcp(host) = up.host else { panic!("the bench needs a TCP upstream") };
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), up.port)).unwrap().next().unwrap()
    };
    let (cached, stop_cached) = rt.block_on(proxy(&upstream, Some(rules.path())));
    let (passthrough, stop_pass) = rt.block_on(proxy(&upstream, None));

    // "miss": the rule's instance asked for keys no row has and never asked before (each a
    // look-up that misses, then Postgres; the rule's admission soon stores none of them):
    // against "pass-through", what a rule costs a workload it does not help.
    // The simple protocol's pair: a new text per key through both instances (as pgbench -S
    // -M simple over many accounts sends), so each pays for classifying new texts alike.
    let never = i32::MAX - 1_000_001;
    let targets = [
        ("prepared select, hit", cached, 1, KEYS, false),
        ("prepared select, miss", cached, 1_000_001, never, false),
        ("prepared select, pass-through", passthrough, 1, KEYS, false),
        ("prepared select, direct", direct, 1, KEYS, false),
        ("simple select, miss", cached, 1_000_001, never, true),
        ("simple select, pass-through", passthrough, 1_000_001, never, true),
    ];
    for (name, addr, first, keys, simple) in targets {
        let mut client = rt.block_on(Client::connect(addr, first, keys, simple));
        // Warm: every key cached (for the hit target), plans and pools ready. In pipelines of
        // moderate size: a client that writes without reading can deadlock any server.
        for _ in 0..(2 * KEYS as usize).div_ceil(PIPELINE) {
            rt.block_on(client.execute(PIPELINE));
        }
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(1));
        group.bench_function("one at a time", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client.execute(1).await;
                    }
                    start.elapsed()
                })
            })
        });
        group.throughput(Throughput::Elements(PIPELINE as u64));
        group.bench_function(format!("{PIPELINE} pipelined"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client.execute(PIPELINE).await;
                    }
                    start.elapsed()
                })
            })
        });
        group.finish();
    }
    stop_cached.cancel();
    stop_pass.cancel();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(100)).await });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
