//! A protocol fuzzer: many clients send random and half-valid message sequences — every
//! frontend message type, bad lengths, unknown types, unknown statement and portal names,
//! Flush without Sync, COPY data out of place, disconnects at random points — with no rules
//! and with a rule that caches everything. Seeded and bounded in time. pgcache must never
//! panic, a control client must keep getting answers throughout, and no session or backend may
//! outlive its client.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{PgCluster, Proxy, rules_dir};
use pgcache::protocol::frame::put_frame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: u64 = 12;
const RUN_FOR: Duration = Duration::from_secs(8);

const SQL: &[&str] = &[
    "SELECT 1",
    "SELECT id, v FROM fuzz WHERE id = $1",
    "SELECT id, v FROM fuzz WHERE id = 3",
    "SELECT count(*) FROM fuzz",
    "SELECT pg_sleep(0.02)",
    "SELECT 1/0",
    "SELECT $1::int + $2::int",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SET search_path = public",
    "SELECT set_config('app.x', '1', false)",
    "INSERT INTO fuzz VALUES (100, 'x') ON CONFLICT (id) DO UPDATE SET v = 'y'",
    "UPDATE fuzz SET v = v WHERE id = 1",
    "COPY fuzz FROM STDIN",
    "COPY fuzz TO STDOUT",
    "LISTEN fuzz_chan",
    "NOTIFY fuzz_chan, 'p'",
    "SELEKT nonsense",
    "",
    "SELECT 'x'::regclass",
    "CREATE TEMP TABLE t_fuzz (a int)",
    "DISCARD ALL",
    "SELECT repeat('z', 100000)",
];

const NAMES: &[&str] = &["", "s1", "s2", "nope", "p1"];

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// One message: mostly well formed, sometimes not.
fn message(rng: &mut StdRng) -> Vec<u8> {
    let pick = |rng: &mut StdRng, v: &[&'static str]| v[rng.random_range(0..v.len())];
    let mut body = Vec::new();
    let tag = match rng.random_range(0..16) {
        0 | 1 => {
            cstr(&mut body, pick(rng, SQL));
            b'Q'
        }
        2 | 3 => {
            cstr(&mut body, pick(rng, NAMES));
            cstr(&mut body, pick(rng, SQL));
            let n = rng.random_range(0..3u16);
            body.extend_from_slice(&n.to_be_bytes());
            for _ in 0..n {
                body.extend_from_slice(&(if rng.random_bool(0.5) { 23u32 } else { 0 }).to_be_bytes());
            }
            b'P'
        }
        4 | 5 => {
            cstr(&mut body, pick(rng, NAMES));
            cstr(&mut body, pick(rng, NAMES));
            body.extend_from_slice(&0u16.to_be_bytes());
            let n = rng.random_range(0..3u16);
            body.extend_from_slice(&n.to_be_bytes());
            for _ in 0..n {
                let v = rng.random_range(0..10).to_string();
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            body.extend_from_slice(&1u16.to_be_bytes());
            body.extend_from_slice(&(rng.random_range(0..2) as i16).to_be_bytes());
            b'B'
        }
        6 | 7 => {
            body.push(if rng.random_bool(0.5) { b'S' } else { b'P' });
            cstr(&mut body, pick(rng, NAMES));
            if rng.random_bool(0.5) { b'D' } else { b'C' }
        }
        8 | 9 => {
            cstr(&mut body, pick(rng, NAMES));
            body.extend_from_slice(&rng.random_range(0..3i32).to_be_bytes());
            b'E'
        }
        10 | 11 => b'S',
        12 => b'H',
        13 => {
            body.extend_from_slice(b"42\tfrom copy\n");
            [b'd', b'c', b'f'][rng.random_range(0..3)]
        }
        14 => {
            // An unknown or out-of-place type with random bytes.
            let len = rng.random_range(0..40);
            body.extend((0..len).map(|_| rng.random::<u8>()));
            [b'F', b'p', b'z', 0u8, b'!'][rng.random_range(0..5)]
        }
        _ => {
            // A truncated Bind or a Parse with a short body.
            body.extend_from_slice(b"\0\0\x00");
            if rng.random_bool(0.5) { b'B' } else { b'P' }
        }
    };
    let mut out = BytesMut::new();
    put_frame(&mut out, tag, &body);
    let mut out = out.to_vec();
    match rng.random_range(0..40) {
        // A length that lies: too small, impossible, or huge.
        0 => out[1..5].copy_from_slice(&3i32.to_be_bytes()),
        1 => out[1..5].copy_from_slice(&(i32::MAX).to_be_bytes()),
        2 => out.truncate(out.len().saturating_sub(1).max(5)),
        _ => {}
    }
    out
}

/// One fuzzing client: connects, sends batches of random messages while draining whatever
/// comes back, and leaves at a random point (Terminate, or just closing the socket).
async fn fuzz_client(addr: std::net::SocketAddr, db: String, seed: u64, until: Instant, sessions: Arc<AtomicU64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    while Instant::now() < until {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { continue };
        let mut startup = BytesMut::new();
        let user = PgCluster::shared_or_superuser();
        postgres_protocol::message::frontend::startup_message(
            [("user", user.as_str()), ("database", db.as_str())],
            &mut startup,
        )
        .expect("no NUL in the names");
        if s.write_all(&startup).await.is_err() {
            continue;
        }
        sessions.fetch_add(1, Ordering::Relaxed);
        let (mut rd, mut wr) = s.into_split();
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        for _ in 0..rng.random_range(1..30) {
            let mut batch = Vec::new();
            for _ in 0..rng.random_range(1..8) {
                batch.extend(message(&mut rng));
            }
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        }
        if rng.random_bool(0.3) {
            let _ = wr.write_all(b"X\0\0\0\x04").await;
        }
        drop(wr);
        if rng.random_bool(0.5) {
            drain.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
        }
    }
}

async fn fuzz(rules: Option<&str>, mode: pgcache::config::PoolMode) {
    // Panics in pgcache's tasks (they run on the runtime's worker threads; a test's own
    // assertions run on its test thread) are counted.
    static PANICS: AtomicU64 = AtomicU64::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("tokio-runtime-worker") {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
    let cluster = PgCluster::shared();
    let db = cluster.create_db("fuzz").await;
    let admin = cluster.admin(&db).await;
    admin
        .batch_execute("CREATE TABLE fuzz (id int PRIMARY KEY, v text); INSERT INTO fuzz SELECT g, 'v' || g FROM generate_series(1, 10) g;")
        .await
        .unwrap();
    let dir = rules_dir(&[("r.toml", rules.unwrap_or(""))]);
    let mut config = Proxy::config(cluster);
    config.rules = dir.path().to_owned();
    config.rules_explicit = true;
    config.pool.max_size = 8;
    config.pool.mode = mode;
    config.pool.acquire_timeout = Duration::from_millis(500);
    config.client.max_message_bytes = 1 << 20;
    let proxy = Proxy::start(config).await;
    let user = cluster.superuser();

    // The control client: its own pool (another user), a query every 50 ms that must answer.
    // (Both tests may create the role at once: one of them finds it exists.)
    let _ = admin.batch_execute("CREATE ROLE fuzz_control LOGIN").await;
    admin.batch_execute("GRANT SELECT ON fuzz TO fuzz_control").await.unwrap();
    let control = proxy.connect(&db, "fuzz_control").await;
    let until = Instant::now() + RUN_FOR;
    let sessions = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for seed in 0..CLIENTS {
        tasks.push(tokio::spawn(fuzz_client(proxy.addr, db.clone(), seed, until, sessions.clone())));
    }
    let mut answered = 0;
    while Instant::now() < until {
        let got = tokio::time::timeout(Duration::from_secs(3), control.query_one("SELECT count(*) FROM fuzz", &[]))
            .await
            .expect("the control client got no answer within 3 s")
            .expect("the control client's query failed");
        assert!(got.get::<_, i64>(0) >= 10);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    drop(control);
    assert!(answered > 20, "the control client answered {answered} times");
    assert!(sessions.load(Ordering::Relaxed) > 50, "the fuzzers opened {} sessions", sessions.load(Ordering::Relaxed));
    // Every fuzzing client is gone: so must be its session, and its backend must be idle in
    // the pool or closed.
    let settled = common::eventually(Duration::from_secs(10), || {
        proxy.shared.clients.list().is_empty() && proxy.shared.pools.all().iter().all(|p| p.stats().active == 0)
    })
    .await;
    let pools: Vec<_> = proxy.shared.pools.all().iter().map(|p| (p.key.clone(), p.stats())).collect();
    assert!(
        settled,
        "sessions or backends outlived their clients: {} clients, pools {pools:?}",
        proxy.shared.clients.list().len()
    );
    let busy: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND state NOT IN ('idle')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(busy, 0, "no backend is left running or in a transaction");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "pgcache panicked");
    // pgcache still serves new clients.
    let c = proxy.connect(&db, &user).await;
    assert_eq!(c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_message_sequences_without_rules() {
    fuzz(None, pgcache::config::PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_message_sequences_with_everything_cached() {
    fuzz(
        Some("[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"60s\"\n"),
        pgcache::config::PoolMode::Session,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_message_sequences_in_transaction_pooling_with_everything_cached() {
    fuzz(
        Some("[[rule]]\nname = \"all\"\nmatch = { pattern = \".\" }\nttl = \"60s\"\n"),
        pgcache::config::PoolMode::Transaction,
    )
    .await;
}
