//! The replica monitor: every `replica.check_interval` (and at most every 2 ms while reads
//! wait for a sample after their session's write), the primary's WAL insert and flush positions
//! (numbered on the [`WalClock`](crate::cache::generation::WalClock) before it is asked for)
//! and then, side by side, each replica's `pg_is_in_recovery()` and
//! `pg_last_wal_replay_lsn()`. A replica that does not answer within `check_timeout`, is not
//! in recovery, or is further behind than `max_lag_bytes` (or has lacked WAL the primary had for
//! longer than `max_lag_time`) is taken out of routing until a
//! check finds it well again. It logs in as the upstream URL's user, over one connection per
//! server, opened again after a failure.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::backend::Endpoint;
use crate::cache::generation::WalClock;
use crate::config::Upstream;

use super::{Replicas, State};

/// The least time between checks asked for by reads waiting on a sample.
const EAGER_GAP: std::time::Duration = std::time::Duration::from_millis(2);

/// Runs until `shutdown`.
pub async fn run(
    replicas: Arc<Replicas>,
    primary: Arc<Endpoint>,
    upstream: Upstream,
    clock: Arc<WalClock>,
    shutdown: CancellationToken,
) {
    let config = replicas.config().clone();
    let mut primary_client: Option<Client> = None;
    let mut clients: Vec<Option<Client>> = replicas.nodes.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(config.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // Sooner when a read waits for a sample (a session's own write), at most every
            // EAGER_GAP.
            _ = replicas.wanted.notified() => {
                tokio::time::sleep_until(last + EAGER_GAP).await;
            }
            _ = shutdown.cancelled() => return,
        }
        last = tokio::time::Instant::now();
        let sample = clock.start_sample();
        let asked =
            tokio::time::timeout(config.check_timeout, primary_position(&mut primary_client, &primary, &upstream));
        // Without the primary's position a replica's lag is not known: none gets reads.
        let primary_known = match asked.await {
            Ok(Ok((insert, flush))) => {
                replicas.sampled(sample, insert, flush);
                true
            }
            Ok(Err(e)) => {
                primary_client = None;
                tracing::debug!(error = %e, "replica monitor: the primary's WAL position could not be read");
                false
            }
            Err(_) => {
                primary_client = None;
                false
            }
        };
        let checks = replicas.nodes.iter().zip(clients.iter_mut()).map(|(node, client)| {
            let check = replay_position(client, node.pools.endpoint(), &upstream);
            tokio::time::timeout(config.check_timeout, check)
        });
        let results = join_all(checks).await;
        for (i, result) in results.into_iter().enumerate() {
            let result = result.unwrap_or_else(|_| Err(format!("no answer within {:?}", config.check_timeout)));
            match result {
                Ok(replay) if !primary_known => replicas.set_state(
                    i,
                    State::Lagging,
                    Some(replay),
                    Some("the primary's WAL position could not be read: lag unknown".into()),
                ),
                Ok(replay) => {
                    let lag = replicas.primary_position().map_or(0, |p| p.saturating_sub(replay));
                    let lag_time = replicas.lag_time(i, replay);
                    let late = config.max_lag_time.is_some_and(|max| lag_time > max);
                    let state = if lag > config.max_lag_bytes || late { State::Lagging } else { State::Up };
                    replicas.set_state(i, state, Some(replay), None);
                }
                Err(e) => {
                    clients[i] = None;
                    replicas.set_state(i, State::Down, None, Some(e));
                }
            }
        }
    }
}

async fn connect(endpoint: &Endpoint, upstream: &Upstream) -> Result<Client, String> {
    let stream = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut config = tokio_postgres::Config::new();
    config
        .user(&upstream.user)
        .dbname(&upstream.dbname)
        .application_name("pgcache replica monitor")
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(p) = &upstream.password {
        config.password(p.expose());
    }
    let (client, connection) = config.connect_raw(stream, NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "replica monitor connection ended");
        }
    });
    Ok(client)
}

/// The client in `slot`, connecting if there is none (or it closed).
async fn client<'a>(
    slot: &'a mut Option<Client>,
    endpoint: &Endpoint,
    upstream: &Upstream,
) -> Result<&'a Client, String> {
    if slot.as_ref().is_none_or(Client::is_closed) {
        *slot = Some(connect(endpoint, upstream).await?);
    }
    Ok(slot.as_ref().expect("just connected"))
}

/// The primary's WAL insert and flush positions.
async fn primary_position(
    slot: &mut Option<Client>,
    endpoint: &Endpoint,
    upstream: &Upstream,
) -> Result<(u64, u64), String> {
    let c = client(slot, endpoint, upstream).await?;
    let sql = "SELECT pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()";
    let row = c.query_one(sql, &[]).await.map_err(|e| e.to_string())?;
    Ok((u64::from(row.get::<_, PgLsn>(0)), u64::from(row.get::<_, PgLsn>(1))))
}

/// The replica's replay position, as far as what it shows goes ([`next_record_start`]).
async fn replay_position(slot: &mut Option<Client>, endpoint: &Endpoint, upstream: &Upstream) -> Result<u64, String> {
    let c = client(slot, endpoint, upstream).await?;
    let sql = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), current_setting('wal_block_size')::int8, \
               (SELECT setting::int8 FROM pg_catalog.pg_settings WHERE name = 'wal_segment_size')";
    let row = c.query_one(sql, &[]).await.map_err(|e| e.to_string())?;
    if !row.get::<_, bool>(0) {
        return Err("not in recovery (promoted, or not a standby)".into());
    }
    let replay = row.get::<_, Option<PgLsn>>(1).map(u64::from).ok_or("no replay position")?;
    let (block, segment) = (row.get::<_, i64>(2) as u64, row.get::<_, i64>(3) as u64);
    Ok(next_record_start(replay, block, segment))
}

/// Where the record after the one ending at `end` can start: WAL records start 8-byte
/// aligned, and after the page header when that is a page's start (a longer one at a
/// segment's). `pg_last_wal_replay_lsn()` is the end of the last record replayed, while the
/// primary's positions are where the next record will go; a replica that has replayed
/// everything shows up to 7 bytes (or a page header) less, and a read waiting for it would wait
/// for the next write. Nothing can lie between `end` and this position, so a replica past it
/// has replayed every record before it.
fn next_record_start(end: u64, block: u64, segment: u64) -> u64 {
    let aligned = end.next_multiple_of(8);
    match (block, segment) {
        (0, _) | (_, 0) => aligned,
        _ if aligned.is_multiple_of(segment) => aligned + 40,
        _ if aligned.is_multiple_of(block) => aligned + 24,
        _ => aligned,
    }
}

#[cfg(test)]
mod tests {
    use super::next_record_start;

    #[test]
    fn a_replay_position_counts_up_to_where_the_next_record_can_start() {
        let (block, segment) = (8192, 16 << 20);
        assert_eq!(next_record_start(0x1000_0010, block, segment), 0x1000_0010, "aligned");
        assert_eq!(next_record_start(0x1000_0011, block, segment), 0x1000_0018, "padding");
        assert_eq!(next_record_start(8192 * 3 - 4, block, segment), 8192 * 3 + 24, "a page header");
        assert_eq!(next_record_start(segment * 2 - 2, block, segment), segment * 2 + 40, "a segment's");
    }
}
