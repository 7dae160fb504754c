//! One database's link to the other instances: a connection of its own that `LISTEN`s on the
//! channel and `NOTIFY`s it.
//!
//! ```text
//! Starting ──connected, LISTEN done──▶ Listening ──connection lost / own heartbeats not
//!    │                                     ▲        coming back / Postgres restarted──▶ Down
//!    └──cannot connect──▶ Down ──backoff, reconnect, LISTEN done (epoch moves)──┘
//! ```
//!
//! Every time it starts listening the database's epoch moves: whatever was cached for it
//! before may have missed a message. While listening it publishes what sessions queued (at
//! most once per `coalesce`), a heartbeat when it has had nothing to say for `heartbeat`, and
//! applies what the others send; an instance silent for `dead_after` may have died with
//! invalidations unsent, so the database's epoch moves then too.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::metrics as m;
use crate::query::Relation;
use crate::query::point::KeyValue;

use super::message::{self, Message};
use super::{Link, LinkState, Peers};

/// Why serving a connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Catalog(#[from] crate::query::catalog::CatalogError),
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the connection closed")]
    Closed,
    #[error("this instance's own heartbeats stopped coming back")]
    Deaf,
}

pub(super) async fn run(peers: Arc<Peers>, link: Arc<Link>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = match connect(&peers, &link).await {
            Ok((client, notifications)) => {
                backoff = Duration::from_millis(100);
                serve(&peers, &link, &client, notifications).await
            }
            Err(e) => Err(e),
        };
        link.set_state(LinkState::Down);
        peers.stats.metrics.gauge(m::PEER_LISTENING, &[("database", &link.database)]).set(0.0);
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(database = %link.database, error = %e, "peer invalidation is not listening; caching for this database is off until it is");
                link.seen.lock().last_error = Some(e.to_string());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = peers.closing.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Connects, starts forwarding notifications, and listens. From here on messages are not
/// missed, so whatever was cached before for this database is dropped.
async fn connect(peers: &Peers, link: &Link) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), LinkError> {
    let name = format!("pgcache peers {}", peers.instance);
    let (client, mut connection) = peers.catalog.open(&link.database, &name).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && tx.send(n).is_err()
            {
                return;
            }
        }
    });
    client.batch_execute(&format!("LISTEN {}", peers.config.channel)).await?;
    peers.generations.bump_database(&link.database);
    {
        let mut seen = link.seen.lock();
        seen.listening_since = Some(SystemTime::now());
        seen.instances.clear();
        seen.last_error = None;
        if link.state.borrow().eq(&LinkState::Down) {
            seen.resyncs += 1;
            peers.stats.metrics.counter(m::PEER_RESYNCS, &[]).increment(1);
        }
    }
    link.set_state(LinkState::Listening);
    peers.stats.metrics.gauge(m::PEER_LISTENING, &[("database", &link.database)]).set(1.0);
    tracing::info!(database = %link.database, channel = %peers.config.channel, "peer invalidation listening");
    Ok((client, rx))
}

/// Publishes, heartbeats and applies messages until the connection fails (an error) or the
/// server closes (Ok, after a goodbye).
async fn serve(
    peers: &Peers,
    link: &Link,
    client: &Client,
    mut notifications: mpsc::UnboundedReceiver<Notification>,
) -> Result<(), LinkError> {
    let config = &peers.config;
    let mut tick = tokio::time::interval(config.heartbeat.min(config.dead_after / 4));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let connected = Instant::now();
    let mut last_sent = Instant::now() - config.heartbeat;
    let mut heard_self = Instant::now();
    loop {
        tokio::select! {
            n = notifications.recv() => match n {
                Some(n) => {
                    if receive(peers, link, n.payload()).await {
                        heard_self = Instant::now();
                    }
                }
                None => return Err(LinkError::Closed),
            },
            _ = link.wake.notified() => {
                // Gather what else arrives within the coalescing window into the same message.
                let wait = config.coalesce.saturating_sub(last_sent.elapsed());
                tokio::time::sleep(wait).await;
                if flush(peers, link, client).await? {
                    last_sent = Instant::now();
                }
            }
            _ = tick.tick() => {
                if flush(peers, link, client).await? {
                    last_sent = Instant::now();
                } else if last_sent.elapsed() >= config.heartbeat {
                    send(peers, link, client, &[heartbeat(peers, link, false)]).await?;
                    last_sent = Instant::now();
                }
                if connected.elapsed() > config.dead_after && heard_self.elapsed() > config.dead_after {
                    return Err(LinkError::Deaf);
                }
                bury_the_silent(peers, link);
            }
            _ = peers.closing.cancelled() => {
                flush(peers, link, client).await?;
                send(peers, link, client, &[heartbeat(peers, link, true)]).await?;
                return Ok(());
            }
        }
    }
}

fn heartbeat(peers: &Peers, link: &Link, bye: bool) -> String {
    message::encode(&Message {
        v: 1,
        i: peers.instance.clone(),
        d: link.database.clone(),
        t: message::now_micros(),
        h: !bye,
        bye,
        ..Message::default()
    })
}

/// Publishes what is pending, if anything. Whatever could not be sent is kept for the next
/// connection.
async fn flush(peers: &Peers, link: &Link, client: &Client) -> Result<bool, LinkError> {
    let (pending, calls) = std::mem::take(&mut *link.pending.lock());
    if pending.is_empty() {
        return Ok(false);
    }
    let payloads = message::payloads(&peers.instance, &link.database, &pending);
    if let Err(e) = send(peers, link, client, &payloads).await {
        let mut kept = link.pending.lock();
        kept.0.merge(pending);
        kept.1 += calls;
        return Err(e);
    }
    let metrics = &peers.stats.metrics;
    metrics.counter(m::PEER_SENT, &[]).increment(payloads.len() as u64);
    metrics.counter(m::PEER_COALESCED, &[]).increment(calls.saturating_sub(payloads.len() as u64));
    Ok(true)
}

/// Sends payloads in one transaction (several, when a publication had to be split).
async fn send(peers: &Peers, link: &Link, client: &Client, payloads: &[String]) -> Result<(), LinkError> {
    let mut sql = String::new();
    for p in payloads {
        let p = match &peers.seal {
            Some(seal) => seal.seal(p),
            None => p.clone(),
        };
        // The channel is a validated identifier; the payload a literal with quotes doubled
        // (the connection keeps standard_conforming_strings on, its default).
        sql += &format!("SELECT pg_catalog.pg_notify('{}', '{}');", peers.config.channel, p.replace('\'', "''"));
    }
    client.batch_execute(&sql).await?;
    link.seen.lock().sent += payloads.len() as u64;
    Ok(())
}

/// Applies one notification. Returns whether it was this instance's own.
async fn receive(peers: &Peers, link: &Link, payload: &str) -> bool {
    // Unsealed, its own publications (the keys of every write it saw) are known by how they
    // begin, not decoded only to be dropped. (Sealed ones are opened first: the seal is what
    // says who sent them.)
    if peers.seal.is_none() && payload.starts_with(peers.own_prefix.as_str()) {
        link.seen.lock().last_message = Some(SystemTime::now());
        return true;
    }
    // With the fleet's secret, only what it sealed is read: a role that can NOTIFY the channel
    // cannot invalidate, flush or play an instance.
    let opened = match &peers.seal {
        Some(seal) => seal.open(payload),
        None => Some(payload),
    };
    let Some(msg) = opened.and_then(message::decode) else {
        peers.stats.metrics.counter(m::PEER_REJECTED, &[]).increment(1);
        tracing::debug!(
            len = payload.len(),
            "a message on the invalidation channel was not sealed by the fleet; dropped"
        );
        return false;
    };
    if msg.d != link.database {
        return false;
    }
    if peers.seal.is_some()
        && msg.i != message::TRIGGER
        && !peers.replays.lock().first(payload, msg.t, message::now_micros())
    {
        peers.stats.metrics.counter(m::PEER_REJECTED, &[]).increment(1);
        tracing::debug!(from = %msg.i, "a sealed message heard before, or too old or new to tell; dropped");
        return false;
    }
    link.seen.lock().last_message = Some(SystemTime::now());
    if msg.i == peers.instance {
        return true;
    }
    {
        let mut seen = link.seen.lock();
        seen.received += 1;
        if msg.bye {
            seen.instances.remove(&msg.i);
        } else if msg.i != message::TRIGGER {
            seen.instances.insert(msg.i.clone(), Instant::now());
        }
    }
    if msg.h || msg.bye {
        return false;
    }
    let metrics = &peers.stats.metrics;
    metrics.counter(m::PEER_RECEIVED, &[]).increment(1);
    let delay = (message::now_micros() - msg.t).max(0) as f64 / 1e6;
    metrics.histogram(m::PEER_DELAY, &[]).record(delay);
    apply(peers, &link.database, &msg).await;
    false
}

/// Bumps the generations another instance's message names — and the shared L2's versions of
/// the same, so a write the L2 did not hear of from its writer (a bypass trigger's, or an
/// instance's that could not reach Redis) reaches it too.
async fn apply(peers: &Peers, database: &str, msg: &Message) {
    let mut relations = Vec::new();
    let mut keyed = Vec::new();
    let whole = apply_local(peers, database, msg, &mut relations, &mut keyed).await;
    if let Some(l2) = &peers.l2 {
        use crate::l2::Moved;
        let moved = if whole {
            vec![Moved::Database]
        } else {
            let mut moved: Vec<Moved> = msg.n.iter().map(|n| Moved::Name(n)).collect();
            moved.push(Moved::Relations(&relations));
            moved.extend(keyed.iter().map(|(r, v): &(Relation, Vec<KeyValue>)| Moved::Keys { relation: r, values: v }));
            moved
        };
        l2.bump(&crate::l2::versions_of_effects(database, moved)).await;
    }
}

/// [`apply`] to this instance's generations; the relations (written everywhere, and at keys)
/// it resolved go to `written` and `keyed_out`. Returns whether the whole database was dropped.
async fn apply_local(
    peers: &Peers,
    database: &str,
    msg: &Message,
    written: &mut Vec<Relation>,
    keyed_out: &mut Vec<(Relation, Vec<KeyValue>)>,
) -> bool {
    let g = &peers.generations;
    if msg.a {
        g.bump_database(database);
        peers.stats.all_invalidated();
        return true;
    }
    for name in &msg.n {
        g.bump_name(name);
        peers.stats.table_written(name);
    }
    if msg.r.is_empty() {
        return false;
    }
    match peers.catalog.relations_by_oid(database, &msg.r).await {
        Ok(relations) => {
            for (oid, r) in msg.r.iter().zip(&relations) {
                match r {
                    Some(r) => {
                        // Written only at keys (`k`), when every key reads; else everywhere.
                        let keyed = msg.k.iter().find(|(k, _, _)| k == oid).and_then(|(_, column, values)| {
                            let values: Option<Vec<_>> = values.iter().map(|v| message::key_value(v)).collect();
                            values.map(|v| (column, v))
                        });
                        match keyed {
                            Some((column, values)) => {
                                g.bump_keys(r, column, &values);
                                peers.stats.keys_written(&r.name, &values);
                                keyed_out.push((r.clone(), values));
                            }
                            None => {
                                g.bump_relations(std::slice::from_ref(r));
                                written.push(r.clone());
                            }
                        }
                        peers.stats.table_written(&r.name);
                    }
                    // A relation this instance cannot find (dropped, or not visible to its
                    // login): whatever it was, fail closed.
                    None => {
                        g.bump_database(database);
                        return true;
                    }
                }
            }
            false
        }
        Err(e) => {
            tracing::warn!(database, error = %e, "cannot resolve relations another instance wrote; dropping the database's entries");
            g.bump_database(database);
            true
        }
    }
}

/// Instances silent for longer than `dead_after` may have died between a commit and its
/// publication: everything cached for the database goes.
fn bury_the_silent(peers: &Peers, link: &Link) {
    let mut seen = link.seen.lock();
    let dead_after = peers.config.dead_after;
    let before = seen.instances.len();
    seen.instances.retain(|_, heard| heard.elapsed() <= dead_after);
    if seen.instances.len() < before {
        seen.resyncs += 1;
        drop(seen);
        tracing::warn!(database = %link.database, "another pgcache instance went silent; dropping everything cached for the database");
        peers.generations.bump_database(&link.database);
        peers.stats.metrics.counter(m::PEER_RESYNCS, &[]).increment(1);
    }
}
