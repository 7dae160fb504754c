//! The shared second-level cache on Redis or Valkey (`--l2 redis://...`): on an L1 miss an
//! instance looks here before Postgres, a fill from Postgres is written to both, an L2 hit
//! fills L1. Entries are the wire bytes L1 keeps, with the rule's TTL (and stale windows).
//!
//! **Coherence lives in Redis.** Every relation (and name, key slot, and "everything") has a
//! *version* key holding a random value. An entry's Redis key is the hash of its cache key and
//! the current values of every version it depends on, read in the same round trip as the entry
//! (one Lua script): once any of them moves, the entry can never be found again. A write moves
//! the versions of what it changed to new random values *before* its completion (or its
//! COMMIT's ReadyForQuery) reaches the client, so no read that starts after it — on any
//! instance — finds the old entry; a fill that read the versions before the write stores its
//! result under versions nobody reads any more (the fill race, closed without a
//! compare-and-set). Versions are random, never counters: a version key that is missing
//! (Redis restarted empty, evicted) is created with a fresh value, which makes every entry
//! stored under the old one unreachable — nothing old can come back. Instances that hear of a
//! write from another instance or a bypass trigger (the peers' channel) move the same versions
//! again, so writes an instance could not announce to Redis (Redis was slow for it) and writes
//! that bypass pgcache reach the L2 within the peers' window, as they reach every L1.
//!
//! **Failing open.** Every call has a short timeout (`l2.timeout`); after `l2.failures`
//! consecutive errors the breaker opens and the L2 is not used for `l2.cooldown`, then tried
//! once. An instance that could not move a version after a write opens its breaker at once
//! (its own next reads must not find what the write made old). While the L2 is unused,
//! L1 and Postgres answer, and no client sees an error.
//!
//! Why the `redis` crate (redis-rs 1.x): actively released, BSD-licensed, a multiplexed
//! connection that pipelines the concurrent requests of every session on one socket, a
//! `ConnectionManager` that reconnects in the background, RESP2/RESP3, TLS (`rediss://`) with
//! rustls without forcing a crypto provider (pgcache uses `ring` only), and cluster support
//! should it be needed. `fred` offers much the same but has had no release since early 2025.
//! (research: `l2-and-replicas.md`.) Redis Cluster is not supported: one script reads keys of
//! many relations, which a cluster would spread over slots.

mod keys;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use redis::aio::ConnectionManager;

use crate::config::L2Config;
use crate::metrics::{self as m, Metrics};

pub use keys::{Moved, Version, versions_of_effects, versions_of_read};

/// At most this many versions wait for a retried move; past it, everything is moved.
const MAX_PENDING: usize = 10_000;

/// The lookup, in one round trip: each version (created with the given fresh value if it is
/// missing), then the entry stored under all of them — unless that is the key the caller
/// already holds an entry for (the last argument), which needs no value.
const LOOKUP: &str = r#"
local parts = {ARGV[1]}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  if not v then
    v = ARGV[i + 1]
    redis.call('SET', k, v)
  end
  parts[#parts + 1] = v
end
local key = ARGV[#ARGV - 1] .. redis.sha1hex(table.concat(parts, '|'))
if key == ARGV[#ARGV] then
  return {key, false}
end
return {key, redis.call('GET', key)}
"#;

/// What the L2 holds for a request.
#[derive(Debug)]
pub enum Lookup {
    /// An entry, and how old it is.
    Hit { value: Stored, key: String },
    /// Nothing: a fill may be stored under this key (the versions as they are now).
    Miss { key: String },
    /// The key the caller holds an entry for is still the current one: nothing it depends on
    /// moved since that entry was computed.
    Current,
    /// The L2 is not in use (breaker open, not connected, an error).
    Unavailable,
}

/// An entry as stored: the L1 entry's wire bytes and how long ago it was computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub age: Duration,
    pub rows: u64,
    pub row_description: Bytes,
    pub body: Bytes,
}

/// A stored value as is ...
const MAGIC: &[u8; 4] = b"PGC1";
/// ... and with its RowDescription and body compressed (LZ4, the raw size in front).
const MAGIC_LZ4: &[u8; 4] = b"PGZ1";
const HEADER: usize = 24;

impl Stored {
    /// The stored form: magic, when it was computed (ms since the epoch), rows, the
    /// RowDescription's length, then the RowDescription and the body — compressed when they
    /// are larger than `compress_above` bytes (0: never) and compression saves something.
    pub fn encode(&self, compress_above: u64) -> Bytes {
        let raw = self.row_description.len() + self.body.len();
        let mut out = BytesMut::with_capacity(HEADER + raw);
        out.put_slice(MAGIC);
        let computed = now_ms().saturating_sub(self.age.as_millis() as u64);
        out.put_u64(computed);
        out.put_u64(self.rows);
        out.put_u32(self.row_description.len() as u32);
        if compress_above > 0 && raw as u64 > compress_above {
            let mut both = Vec::with_capacity(raw);
            both.extend_from_slice(&self.row_description);
            both.extend_from_slice(&self.body);
            let packed = lz4_flex::compress_prepend_size(&both);
            if packed.len() < raw {
                out[..4].copy_from_slice(MAGIC_LZ4);
                out.put_slice(&packed);
                return out.freeze();
            }
        }
        out.put_slice(&self.row_description);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// The value `raw` holds, if it is one (a compressed one only up to `max_bytes` unpacked).
    pub fn decode(mut raw: Bytes, max_bytes: u64) -> Option<Stored> {
        if raw.len() < HEADER || !(&raw[..4] == MAGIC || &raw[..4] == MAGIC_LZ4) {
            return None;
        }
        let compressed = &raw[..4] == MAGIC_LZ4;
        raw.advance(4);
        let computed = raw.get_u64();
        let rows = raw.get_u64();
        let rd = raw.get_u32() as usize;
        if compressed {
            let unpacked = u32::from_le_bytes(raw.get(..4)?.try_into().ok()?) as u64;
            if unpacked > max_bytes {
                return None;
            }
            raw = Bytes::from(lz4_flex::decompress_size_prepended(&raw).ok()?);
        }
        if raw.len() < rd {
            return None;
        }
        let row_description = raw.split_to(rd);
        let age = Duration::from_millis(now_ms().saturating_sub(computed));
        Some(Stored { age, rows, row_description, body: raw })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The breaker: closed while calls succeed; open for the cool-down after too many failures.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    /// Until when it is open (ms since the L2 was made; 0: closed).
    open_until: AtomicU64,
}

/// Calls by outcome, for `SHOW L2`.
#[derive(Debug, Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    stores: AtomicU64,
    bumps: AtomicU64,
}

/// The shared L2.
pub struct L2 {
    config: L2Config,
    counts: Counts,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    breaker: Breaker,
    started: Instant,
    metrics: Arc<Metrics>,
    /// Versions whose move failed, retried until it lands ([`L2::bump`]).
    pending: parking_lot::Mutex<std::collections::BTreeSet<Version>>,
    retrying: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for L2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L2({})", self.config.describe())
    }
}

/// What `SHOW L2` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2State {
    pub server: String,
    pub connected: bool,
    pub breaker_open: bool,
    pub consecutive_failures: u32,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub stores: u64,
    pub version_bumps: u64,
}

impl L2 {
    /// The L2 for `config`; it connects in the background (and keeps reconnecting), so a Redis
    /// that is down at start only means the L2 is not used yet.
    pub fn start(config: L2Config, metrics: Arc<Metrics>, shutdown: tokio_util::sync::CancellationToken) -> Arc<L2> {
        let l2 = Arc::new(L2 {
            config,
            counts: Counts::default(),
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(LOOKUP),
            breaker: Breaker::default(),
            started: Instant::now(),
            metrics,
            pending: Default::default(),
            retrying: Default::default(),
        });
        let me = l2.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                match me.connect().await {
                    Ok(conn) => {
                        me.conn.store(Some(Arc::new(conn)));
                        tracing::info!(server = %me.config.describe(), "L2 connected");
                        return;
                    }
                    Err(e) => tracing::warn!(server = %me.config.describe(), error = %e, "L2 not reachable; retrying"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
        l2
    }

    async fn connect(&self) -> redis::RedisResult<ConnectionManager> {
        let client = redis::Client::open(self.config.url.expose())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(self.config.timeout.max(Duration::from_millis(100))))
            .set_number_of_retries(1);
        ConnectionManager::new_with_config(client, config).await
    }

    pub fn state(&self) -> L2State {
        L2State {
            server: self.config.describe(),
            connected: self.conn.load().is_some(),
            breaker_open: self.breaker_open(),
            consecutive_failures: self.breaker.failures.load(Ordering::Relaxed),
            hits: self.counts.hits.load(Ordering::Relaxed),
            misses: self.counts.misses.load(Ordering::Relaxed),
            errors: self.counts.errors.load(Ordering::Relaxed),
            stores: self.counts.stores.load(Ordering::Relaxed),
            version_bumps: self.counts.bumps.load(Ordering::Relaxed),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn breaker_open(&self) -> bool {
        self.breaker.open_until.load(Ordering::Acquire) > self.now_ms()
    }

    /// The connection, unless the breaker is open.
    fn usable(&self) -> Option<ConnectionManager> {
        if self.breaker_open() {
            self.metrics.counter(m::L2_SKIPPED, &[]).increment(1);
            return None;
        }
        self.conn.load_full().map(|c| (*c).clone())
    }

    fn succeeded(&self) {
        self.breaker.failures.store(0, Ordering::Relaxed);
        self.breaker.open_until.store(0, Ordering::Release);
        self.metrics.gauge(m::L2_BREAKER_OPEN, &[]).set(0.0);
    }

    /// A failed or late call: counted; enough of them (or one that matters, `now`) open the
    /// breaker for the cool-down.
    fn failed(&self, why: &str, now: bool) {
        self.metrics.counter(m::L2_ERRORS, &[]).increment(1);
        self.counts.errors.fetch_add(1, Ordering::Relaxed);
        let n = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if now || n >= self.config.failures {
            let until = self.now_ms() + self.config.cooldown.as_millis() as u64;
            if self.breaker.open_until.swap(until, Ordering::AcqRel) <= self.now_ms() {
                tracing::warn!(reason = why, cooldown = ?self.config.cooldown, "L2 breaker open: not used for a while");
            }
            self.metrics.gauge(m::L2_BREAKER_OPEN, &[]).set(1.0);
        }
    }

    /// Looks `base` up under the current values of `versions`. `held`: the key of an entry the
    /// caller holds already (L1's), answered [`Lookup::Current`] if it still is the key.
    pub async fn lookup(&self, base: &[u8], versions: &[Version], held: Option<&str>) -> Lookup {
        let Some(mut conn) = self.usable() else { return Lookup::Unavailable };
        let prefix = &self.config.prefix;
        let versions = if self.config.check_versions { versions } else { &[] };
        let mut invocation = self.script.prepare_invoke();
        for v in versions {
            invocation.key(v.key(prefix));
        }
        invocation.arg(hex(&keys::digest(base)));
        for _ in versions {
            invocation.arg(fresh());
        }
        invocation.arg(format!("{prefix}e:"));
        invocation.arg(held.unwrap_or(""));
        let started = Instant::now();
        let call = invocation.invoke_async::<(String, Option<Vec<u8>>)>(&mut conn);
        let result = tokio::time::timeout(self.config.timeout, call).await;
        self.metrics.histogram(m::L2_DURATION, &[("op", "lookup")]).record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok((key, Some(raw)))) => {
                self.succeeded();
                match Stored::decode(Bytes::from(raw), self.config.max_value_bytes) {
                    Some(value) => {
                        self.metrics.counter(m::L2_HITS, &[]).increment(1);
                        self.counts.hits.fetch_add(1, Ordering::Relaxed);
                        Lookup::Hit { value, key }
                    }
                    None => {
                        self.metrics.counter(m::L2_MISSES, &[]).increment(1);
                        self.counts.misses.fetch_add(1, Ordering::Relaxed);
                        Lookup::Miss { key }
                    }
                }
            }
            Ok(Ok((key, None))) if Some(key.as_str()) == held => {
                self.succeeded();
                Lookup::Current
            }
            Ok(Ok((key, None))) => {
                self.succeeded();
                self.metrics.counter(m::L2_MISSES, &[]).increment(1);
                self.counts.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss { key }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "L2 lookup failed");
                self.failed("lookup failed", false);
                Lookup::Unavailable
            }
            Err(_) => {
                self.failed("lookup timed out", false);
                Lookup::Unavailable
            }
        }
    }

    /// Stores an entry under `key` (from [`Lookup::Miss`]) for `ttl`, in the background;
    /// results over `l2.max_value_bytes` are not stored, those over `l2.compress_above` are
    /// compressed.
    pub fn store(self: &Arc<Self>, key: String, value: Stored, ttl: Duration) {
        let raw = (value.row_description.len() + value.body.len()) as u64;
        if raw > self.config.max_value_bytes || ttl.is_zero() {
            return;
        }
        let encoded = value.encode(self.config.compress_above);
        let me = self.clone();
        tokio::spawn(async move {
            let Some(mut conn) = me.usable() else { return };
            let started = Instant::now();
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(encoded.as_ref()).arg("PX").arg(ttl.as_millis() as u64);
            let set = cmd.query_async::<()>(&mut conn);
            match tokio::time::timeout(me.config.timeout.max(Duration::from_millis(50)), set).await {
                Ok(Ok(())) => {
                    me.succeeded();
                    me.metrics.counter(m::L2_STORES, &[]).increment(1);
                    me.counts.stores.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(_)) => me.failed("store failed", false),
                Err(_) => me.failed("store timed out", false),
            }
            me.metrics.histogram(m::L2_DURATION, &[("op", "store")]).record(started.elapsed().as_secs_f64());
        });
    }

    /// Moves `versions` to fresh values (a write changed what they guard). Returns whether it
    /// took effect; if not, the breaker opens at once, so this instance does not read what the
    /// write made old, and the move is retried in the background until it lands (the other
    /// instances also move the versions when they hear of the write from the peers).
    pub async fn bump(self: &Arc<Self>, versions: &[Version]) -> bool {
        if versions.is_empty() {
            return true;
        }
        if self.set_fresh(versions).await {
            return true;
        }
        self.failed("a write's versions could not be moved", true);
        self.retry_later(versions);
        false
    }

    /// Queues versions whose move failed, and starts the task that retries them.
    fn retry_later(self: &Arc<Self>, versions: &[Version]) {
        {
            let mut pending = self.pending.lock();
            pending.extend(versions.iter().cloned());
            if pending.len() > MAX_PENDING {
                // Too much to remember: move everything instead.
                *pending = std::collections::BTreeSet::from([Version::All]);
            }
        }
        if self.retrying.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                tokio::time::sleep(delay).await;
                let versions: Vec<Version> = std::mem::take(&mut *me.pending.lock()).into_iter().collect();
                if versions.is_empty() {
                    me.retrying.store(false, Ordering::Release);
                    // A failure queued just now, after the take, would find the task running.
                    if me.pending.lock().is_empty() || me.retrying.swap(true, Ordering::AcqRel) {
                        return;
                    }
                    continue;
                }
                if me.set_fresh(&versions).await {
                    tracing::info!(versions = versions.len(), "L2 versions moved after an earlier failure");
                    delay = Duration::from_millis(50);
                } else {
                    me.pending.lock().extend(versions);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        });
    }

    /// `MSET`s `versions` to fresh values; whether it took effect.
    async fn set_fresh(&self, versions: &[Version]) -> bool {
        let Some(mut conn) = self.conn.load_full().map(|c| (*c).clone()) else {
            return false;
        };
        let mut cmd = redis::cmd("MSET");
        for v in versions {
            cmd.arg(v.key(&self.config.prefix)).arg(fresh());
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.config.timeout, cmd.query_async::<()>(&mut conn)).await;
        self.metrics.histogram(m::L2_DURATION, &[("op", "bump")]).record(started.elapsed().as_secs_f64());
        let moved = matches!(result, Ok(Ok(())));
        if moved {
            self.metrics.counter(m::L2_BUMPS, &[]).increment(versions.len() as u64);
            self.counts.bumps.fetch_add(versions.len() as u64, Ordering::Relaxed);
        }
        moved
    }
}

/// A fresh version value: 16 random bytes, hex.
fn fresh() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_round_trip() {
        let v = Stored {
            age: Duration::from_millis(1500),
            rows: 3,
            row_description: Bytes::from_static(b"T\0\0\0\x04"),
            body: Bytes::from_static(b"D...C..."),
        };
        let back = Stored::decode(v.encode(0), 1 << 20).unwrap();
        assert_eq!((back.rows, &back.row_description, &back.body), (3, &v.row_description, &v.body));
        assert!(back.age >= Duration::from_millis(1500) && back.age < Duration::from_secs(3));
        assert!(Stored::decode(Bytes::from_static(b"nope"), 1 << 20).is_none());
    }

    #[test]
    fn large_values_are_compressed_and_bounded_when_unpacked() {
        let v = Stored {
            age: Duration::ZERO,
            rows: 1000,
            row_description: Bytes::from_static(b"T\0\0\0\x04"),
            body: Bytes::from("D\0\0\0\x10 the same row ".repeat(1000)),
        };
        let raw = v.row_description.len() + v.body.len();
        let packed = v.encode(1024);
        assert_eq!(&packed[..4], MAGIC_LZ4);
        assert!(packed.len() < raw / 4, "{} bytes for {raw}", packed.len());
        let back = Stored::decode(packed.clone(), 1 << 20).unwrap();
        assert_eq!((&back.row_description, &back.body), (&v.row_description, &v.body));
        assert!(Stored::decode(packed.clone(), raw as u64 - 1).is_none(), "larger than allowed unpacked");
        assert!(Stored::decode(packed.slice(..packed.len() - 10), 1 << 20).is_none(), "truncated");
        assert_eq!(&v.encode(0)[..4], MAGIC, "not compressed when off");
        assert_eq!(&v.encode(raw as u64)[..4], MAGIC, "nor at or below the threshold");
    }
}
