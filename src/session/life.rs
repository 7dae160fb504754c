//! A session's life between its StartupMessage and its end ([`serve`]): logged in
//! ([`Session::open`]), then stretches of work ([`Session::run`]: relaying with a backend, or
//! without one in [`super::detached`]), each a boxed future of its own; between transactions
//! without a backend it rests as a compact struct ([`super::core::rest`]) until its client
//! speaks; at its end its backend and pins are given back ([`Session::finish`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::connection::StartupParams;
use crate::backend::{Lease, PoolKey, Prepared, Reset};
use crate::config::PoolMode;
use crate::context::Context;
use crate::frontend::{self, Client, SessionError};
use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::Startup;

use super::core::Core;
use super::core::flow::Flow;
use super::core::settings::Settings;
use super::core::tracker::Tracker;
use super::handover::{changed_parameters, give_back, hand_back, leave};
use super::login::{KEYS, backend_startup, log_in};
use super::{adopt, core, detached, memo, relay};

/// Serves a client session from its StartupMessage to its end: logs in (leasing a backend),
/// welcomes the client, and relays until one side ends.
///
/// Between transactions without a backend (transaction pooling), until the client speaks, the
/// session waits as a compact struct ([`Session`] with its core at rest, [`core::rest`]):
/// what it does at work lives in futures boxed for the stretch and dropped before it waits
/// (see bench/idle.sh).
// An async fn would keep its arguments twice in its future (see below).
#[allow(clippy::manual_async_fn)]
pub fn serve<'a>(
    ctx: &'a Arc<Context>,
    client: &'a mut Client,
    startup: Box<Startup>,
) -> impl Future<Output = Result<(), SessionError>> + Send + 'a {
    // An async block rather than an async fn: its arguments are not copied into its future
    // a second time.
    async move {
        // Each stretch is a future of its own, boxed and guarded ([`frontend::guard`]: a panic
        // becomes an error for the client, and what the stretch held is dropped — a leased backend
        // closed): this one keeps only what waits between stretches.
        let opening = Box::pin(Session::open(ctx, client, startup));
        let mut session = Box::new(frontend::guard(opening).await?);
        let mut shutdown_at_rest = false;
        let result = loop {
            let stretch = Box::pin(async { Ok(session.run(ctx, client).await) });
            let resting = match frontend::guard(stretch).await {
                Err(e) => break Err(e),
                Ok(Stretch::Over(result)) => break result,
                Ok(Stretch::Resting) => Session::rest(session),
            };
            let woken = Woken { shutdown: ctx.shutdown.cancelled(), stream: &client.stream }.await;
            session = Session::wake(resting);
            match woken {
                Err(e) => break Err(e.into()),
                // Ended here, not by the next stretch: that one reads its client first, and a
                // client that always has a request ready would be answered, rest and wake
                // again without end. (Told by the caller, as any error this returns: this
                // future keeps no error, nor a report's future, while every idle client waits.)
                Ok(Wake::Shutdown) => {
                    shutdown_at_rest = true;
                    break Ok(relay::Ending::ClientLeft);
                }
                Ok(Wake::Spoke) => {}
            }
        };
        // Guarded as the stretches are (it needs no future of its own).
        let finishing = std::panic::AssertUnwindSafe(|| session.finish(ctx, client, result));
        std::panic::catch_unwind(finishing).unwrap_or_else(|panic| Err(frontend::error::panicked(panic)))?;
        if shutdown_at_rest {
            return Err(SessionError::Shutdown);
        }
        Ok(())
    }
}

pin_project_lite::pin_project! {
    /// What a session at rest waits for: its client's socket to be readable, or shutdown —
    /// whichever comes first. A future of its own, as small as what it holds (`select!` keeps
    /// more), since every idle client waits with one.
    struct Woken<'a> {
        #[pin]
        shutdown: tokio_util::sync::WaitForCancellationFuture<'a>,
        stream: &'a crate::net::Stream,
    }
}

/// Why a session at rest woke.
enum Wake {
    Spoke,
    Shutdown,
}

impl Future for Woken<'_> {
    type Output = std::io::Result<Wake>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if this.shutdown.poll(cx).is_ready() {
            return std::task::Poll::Ready(Ok(Wake::Shutdown));
        }
        this.stream.poll_read_ready(cx).map_ok(|()| Wake::Spoke)
    }
}

/// How a stretch of a session's life ended.
enum Stretch {
    /// Without a backend between transactions, nothing read from the client yet: wait.
    Resting,
    /// The session is over.
    Over(Result<relay::Ending, SessionError>),
}

/// A session between its login and its end; `C` is its protocol core, at work ([`Core`]) or at
/// rest between transactions ([`core::rest::Rest`]).
struct Session<C> {
    core: C,
    key: Arc<PoolKey>,
    params: StartupParams,
    memo: memo::Assessments,
    /// The parameters the client was last told of ([`changed_parameters`]).
    reported: Arc<BTreeMap<String, String>>,
    lease: Option<Box<Lease>>,
    /// Session pooling with replicas: the session's own backend on the primary, while the
    /// session is between transactions or on a replica.
    home: Option<Box<Lease>>,
    /// Why the session is without a backend, when it is.
    idle: detached::Why,
    /// On a replica: the client's messages behind the read sent there, read after it.
    behind: Option<Box<BytesMut>>,
    /// Its entry among the connected clients (`SHOW CLIENTS`; cancels).
    handle: crate::context::clients::ClientHandle,
    started: Instant,
    pooling_transactions: bool,
    keeps_backend: bool,
}

impl Session<Core> {
    /// The session at rest; its box at work is given back (not kept while it waits).
    fn rest(session: Box<Session<Core>>) -> Box<Session<core::rest::Rest>> {
        Box::new(session.with_core(Core::rest))
    }
}

impl Session<core::rest::Rest> {
    /// The session at work again.
    fn wake(session: Box<Session<core::rest::Rest>>) -> Box<Session<Core>> {
        Box::new(session.with_core(core::rest::Rest::wake))
    }
}

impl<C> Session<C> {
    /// The same session with its core changed by `f`.
    fn with_core<D>(self, f: impl FnOnce(C) -> D) -> Session<D> {
        let Session {
            core,
            key,
            params,
            memo,
            reported,
            lease,
            home,
            idle,
            behind,
            handle,
            started,
            pooling_transactions,
            keeps_backend,
        } = self;
        Session {
            core: f(core),
            key,
            params,
            memo,
            reported,
            lease,
            home,
            idle,
            behind,
            handle,
            started,
            pooling_transactions,
            keeps_backend,
        }
    }
}

impl Session<Core> {
    /// Logs the client in (leasing a backend, reset to what its startup packet says) and
    /// welcomes it.
    async fn open(
        ctx: &Arc<Context>,
        client: &mut Client,
        startup: Box<Startup>,
    ) -> Result<Session<Core>, SessionError> {
        let started = Instant::now();
        let (key, params, unsupported) = backend_startup(ctx, &startup)?;
        let key = KEYS.get(key);
        // Boxed: what logging in waits with is not kept for the session's life; nor is room for
        // a lease while the session waits without one (see bench/idle.sh).
        let logging_in =
            Box::pin(log_in(ctx, client, startup.minor > 0 || !unsupported.is_empty(), unsupported, &key, &params));
        let mut lease = Box::new(logging_in.await?);
        drop(startup);
        let pooling_transactions = ctx.config().pool.mode_for(&key.database, &key.user) == PoolMode::Transaction;
        // Session pooling with replicas: the session leaves its backend between transactions, as
        // in transaction pooling, so that a read may go to a replica, but keeps it (`home`).
        let keeps_backend = !pooling_transactions && !ctx.replicas.is_empty();
        let mut core = Core::new(Flow {
            database: Arc::from(key.database.as_str()),
            transaction_pooling: pooling_transactions || keeps_backend,
            keeps_backend,
            settings: Settings::at_startup(&params),
            ..Flow::default()
        });
        // A new session starts as its startup packet says, whoever used the backend before.
        let wanted = adopt::Wanted::session(ctx, Vec::new(), &mut core.flow.settings);
        let adopting = Box::pin(adopt::adopt(lease.conn(), wanted));
        if let Err(e) = adopting.await {
            lease.release(Reset::Close);
            return Err(SessionError::Refused(PgError::fatal(
                SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("pgcache: could not reset a backend connection for the session: {e}"),
            )));
        }
        let handle = ctx.clients.register(Some((client.peer, &key)));
        handle.set_backend(Some((lease.conn_ref().key, lease.pool().endpoint().clone())));
        client.send(&frontend::welcome(&lease.conn_ref().params, handle.pid, handle.secret)).await?;
        tracing::info!(peer = %client.peer, user = %key.user, database = %key.database, "client connected");
        let memo = memo::Assessments::new(ctx.verdicts.book(&key));
        Ok(Session {
            core,
            key,
            params,
            memo,
            reported: lease.conn_ref().params.clone(),
            lease: Some(lease),
            home: None,
            idle: detached::Why::Lost,
            behind: None,
            handle,
            started,
            pooling_transactions,
            keeps_backend,
        })
    }

    /// Relays, with a backend or without one, until the session is over or waits between
    /// transactions without a backend with nothing read from the client.
    async fn run(&mut self, ctx: &Arc<Context>, client: &mut Client) -> Stretch {
        let key = &self.key;
        let core = &mut self.core;
        loop {
            // (Every way here without a backend has already told the clients' registry so: a
            // released or lost backend, or a wake from rest, which only a released one leads to.)
            let Some(mut attached) = self.lease.take() else {
                let (idle, home) = (self.idle, &mut self.home);
                let waiting =
                    Box::pin(detached::run(ctx, key, &self.params, client, &mut core.flow, &mut self.memo, idle, home));
                let outcome = match idle {
                    detached::Why::Lost => {
                        ctx.stats.detached(1.0);
                        let outcome = waiting.await;
                        ctx.stats.detached(-1.0);
                        outcome
                    }
                    detached::Why::Pooled => waiting.await,
                };
                match outcome {
                    Ok(detached::Outcome::OnReplica { lease: new, replica, behind: rest }) => {
                        // The client is not told of the replica's own parameters (`in_hot_standby`
                        // on, its version): it is connected to the primary, whose settings the
                        // session carries there.
                        core.tracker = Tracker { used: true, ..Tracker::default() };
                        core.flow.replica = Some(replica);
                        self.behind = Some(Box::new(rest));
                        self.lease = Some(new);
                        continue;
                    }
                    Ok(detached::Outcome::Reattached(new)) => {
                        if idle == detached::Why::Lost {
                            tracing::info!(peer = %client.peer, user = %key.user, "session moved to a new backend connection");
                        }
                        let told = changed_parameters(&mut self.reported, &new.conn_ref().params);
                        if let Err(e) = client.send(&told).await {
                            return Stretch::Over(Err(e));
                        }
                        core.tracker = Tracker { used: true, ..Tracker::default() };
                        self.lease = Some(new);
                        continue;
                    }
                    Ok(detached::Outcome::Resting) => return Stretch::Resting,
                    Ok(detached::Outcome::ClientLeft) => return Stretch::Over(Ok(relay::Ending::ClientLeft)),
                    Err(e) => {
                        // No relay to tell the client: say it here (e.g. 57P01 at shutdown).
                        let report = Box::pin(frontend::report(client, &e));
                        report.await;
                        return Stretch::Over(Ok(relay::Ending::ClientLeft));
                    }
                }
            };
            // Transaction pooling: statements go to this backend under their server names.
            if core.flow.transaction_pooling && core.server.is_none() {
                let max = ctx.config().pool.max_prepared_statements;
                core.server = Some(attached.conn().prepared.take().unwrap_or_else(|| Prepared::new(max)));
            }
            self.handle.set_backend(Some((attached.conn_ref().key, attached.pool().endpoint().clone())));
            // Boxed, like the other long-lived futures here: a session waiting between
            // transactions keeps only what it waits with (see bench/idle.sh).
            let relaying = Box::pin(relay::run(ctx, key, &self.params, client, attached.conn(), core, &mut self.memo));
            let result = relaying.await;
            attached.conn().status = core.tracker.status;
            let on_replica = core.flow.replica.take().is_some();
            if let Some(rest) = self.behind.take() {
                // The relay read nothing more from the client while on the replica.
                client.rbuf.extend_from_slice(&rest);
            }
            match result {
                Ok(relay::Ending::BackendLost) => {
                    self.handle.set_backend(None);
                    ctx.stats.backend_error();
                    tracing::warn!(peer = %client.peer, user = %key.user, "backend connection lost; the session continues without one");
                    if !on_replica {
                        changed_parameters(&mut self.reported, &attached.conn_ref().params);
                    }
                    core.server = None;
                    attached.release(Reset::Close);
                    self.idle = detached::Why::Lost;
                    continue;
                }
                Ok(relay::Ending::Released) => {
                    // A cancel from now on finds nothing to cancel: this backend may soon run
                    // another session's query; nor is it the client's any more (SHOW CLIENTS).
                    self.handle.set_backend(None);
                    if !on_replica {
                        changed_parameters(&mut self.reported, &attached.conn_ref().params);
                    }
                    if self.keeps_backend && !on_replica {
                        leave(ctx, &mut attached, key, core);
                        self.home = Some(attached);
                    } else {
                        hand_back(ctx, key, *attached, core);
                    }
                    // What the client is owed goes out before it waits without a backend.
                    if !core.to_client.is_empty() {
                        let flushed = async {
                            client.stream.write_all_buf(&mut core.to_client).await?;
                            client.stream.flush().await
                        };
                        if let Err(e) = flushed.await {
                            return Stretch::Over(Err(e.into()));
                        }
                    }
                    // An idle client keeps little: its buffers grow again when it speaks.
                    core.shrink();
                    self.idle = detached::Why::Pooled;
                    if client.rbuf.is_empty() {
                        client.rbuf = BytesMut::new();
                        return Stretch::Resting;
                    }
                    continue;
                }
                _ => {}
            }
            // What pgcache prepared on the backend stays known with it (a reset clears both).
            attached.conn().prepared = core.server.take();
            // No cancel may reach the backend once another session can have it.
            self.handle.set_backend(None);
            give_back(*attached, core);
            return Stretch::Over(result);
        }
    }

    /// Ends the session: its home backend reset and released, the pool's pins undone, the
    /// end logged.
    fn finish(
        self,
        ctx: &Arc<Context>,
        client: &Client,
        result: Result<relay::Ending, SessionError>,
    ) -> Result<(), SessionError> {
        let Session { core, key, home, started, pooling_transactions, .. } = self;
        if let Some(home) = home {
            // At rest, but it may hold what pgcache does not track (a temporary table or an
            // advisory lock taken in a function, `currval`): reset as a session's backend is.
            home.release(Reset::Discard);
        }
        if pooling_transactions {
            let pool = ctx.pools.get(&key);
            let held = crate::query::Held::ALL.into_iter().filter(|h| core.flow.holds.holds(*h));
            held.for_each(|h| pool.pinned(h.label(), false));
            if core.flow.settings_pinned {
                pool.pinned("settings", false);
            }
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(peer = %client.peer, user = %key.user, database = %key.database, duration_ms, "client disconnected");
        match result {
            Ok(_) | Err(SessionError::ClientIo(_)) => Ok(()),
            // A panic caught in a stretch: the client is told (XX000) by the caller.
            Err(e @ SessionError::Internal(_)) => Err(e),
            // The relay already told the client.
            Err(e) => {
                if e.is_noteworthy() {
                    tracing::warn!(peer = %client.peer, error = %e, "session ended with an error");
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_at_rest_is_a_small_struct() {
        // What ten thousand idle clients each keep besides their socket and task (bench/idle.sh):
        // the core at rest, not at work.
        let (rest, work) = (size_of::<Session<core::rest::Rest>>(), size_of::<Session<Core>>());
        assert!(rest <= 304, "{rest} bytes");
        assert!(rest * 2 < work, "{rest} bytes at rest, {work} at work");
    }
}
