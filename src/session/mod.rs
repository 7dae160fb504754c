//! One client session, from its StartupMessage to its close.
//!
//! ```text
//! StartupMessage ──(login; backend leased)──▶ Relaying ──Terminate/EOF──▶ Closed
//!                                               │ shutdown: at rest ──▶ 57P01, Closed
//!                                               │ error ──▶ ErrorResponse, Closed
//!                                               │ backend lost while idle ──▶ Detached
//!                      Relaying ◀──(new backend, settings replayed)── Detached
//!                      Relaying ──transaction over (transaction pooling)──▶ Detached
//!                      Relaying ──transaction over (session pooling, replicas)──▶ Detached,
//!                                                        the backend kept as the session's home
//!   Detached, nothing read from the client ──▶ Resting (a compact struct; no future of its own)
//!                      Detached ◀──the client speaks── Resting
//! ```
//!
//! The protocol state is the [`core`]'s (pure, unit-tested); the [`relay`] does the I/O and
//! feeds it ([`drive`]) with the facts only the shared state has: write effects
//! ([`effects`]) and cache decisions ([`decide`]). When the session ends its backend goes back
//! to the pool only if it is at rest; a backend left mid-query is cancelled and closed. It uses
//! the front end ([`crate::frontend`]) and what every connection shares
//! ([`crate::context`]); it knows nothing of the admin console.

mod adopt;
mod answer;
pub mod auth;
pub mod core;
mod decide;
mod detached;
mod drive;
pub mod effects;
mod memo;
pub mod refresh;
pub mod relay;
mod replay;
pub mod shared;
pub mod warm;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::backend::connection::{SessionState, StartupParams};
use crate::backend::{Lease, PoolKey, Prepared, Reset};
use crate::config::PoolMode;
use crate::context::Context;
use crate::protocol::backend::{PgError, negotiate_protocol_version};
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::Startup;

use self::core::Core;
use self::core::flow::Flow;
use self::core::settings::Settings;
use self::core::tracker::Tracker;
use crate::frontend::{self, Client, SessionError};

/// The startup parameters sessions hold, by their contents.
static STARTUPS: shared::Shared<Vec<(String, String)>> = shared::Shared::new();

/// The pool keys sessions hold (one per database and user, however many sessions).
static KEYS: shared::Shared<PoolKey> = shared::Shared::new();

/// Derives the pool key and the backend startup parameters from the client's StartupMessage.
/// The client's parameters pass unchanged and in order; a missing user or database is taken
/// from the upstream URL.
fn backend_startup(ctx: &Context, startup: &Startup) -> Result<(PoolKey, StartupParams, Vec<String>), SessionError> {
    if startup.param("replication").is_some_and(|v| v != "false" && v != "off" && v != "0") {
        return Err(SessionError::Refused(PgError::fatal(
            SqlState::FEATURE_NOT_SUPPORTED,
            "pgcache does not proxy replication connections; connect to Postgres directly",
        )));
    }
    let upstream = &ctx.config().upstream;
    let mut params: Vec<(String, String)> = Vec::with_capacity(startup.params.len() + 2);
    let mut unsupported = Vec::new();
    for (k, v) in &startup.params {
        if k.starts_with("_pq_.") {
            unsupported.push(k.clone());
        } else {
            params.push((k.clone(), v.clone()));
        }
    }
    let user = startup.param("user").filter(|u| !u.is_empty()).unwrap_or(&upstream.user).to_owned();
    let database = startup.param("database").filter(|d| !d.is_empty()).unwrap_or(&upstream.dbname).to_owned();
    if startup.param("user").is_none_or(str::is_empty) {
        params.retain(|(k, _)| k != "user");
        params.insert(0, ("user".into(), user.clone()));
    }
    if startup.param("database").is_none_or(str::is_empty) {
        params.retain(|(k, _)| k != "database");
        params.insert(1, ("database".into(), database.clone()));
    }
    // Shared: most clients of a pool start alike, and each keeps its parameters for its life.
    Ok((PoolKey { database, user }, STARTUPS.get(params), unsupported))
}

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
        let result = loop {
            let stretch = Box::pin(async { Ok(session.run(ctx, client).await) });
            let resting = match frontend::guard(stretch).await {
                Err(e) => break Err(e),
                Ok(Stretch::Over(result)) => break result,
                Ok(Stretch::Resting) => Session::rest(session),
            };
            let woken = Woken { shutdown: ctx.shutdown.cancelled(), stream: &client.stream }.await;
            session = Session::wake(resting);
            if let Err(e) = woken {
                break Err(e.into());
            }
        };
        // Guarded as the stretches are (it needs no future of its own).
        let finishing = std::panic::AssertUnwindSafe(|| session.finish(ctx, client, result));
        std::panic::catch_unwind(finishing).unwrap_or_else(|panic| Err(frontend::error::panicked(panic)))
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

impl Future for Woken<'_> {
    type Output = std::io::Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if this.shutdown.poll(cx).is_ready() {
            return std::task::Poll::Ready(Ok(()));
        }
        this.stream.poll_read_ready(cx)
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
    handle: crate::context::cancel::CancelHandle,
    registered: crate::stats::ClientGuard,
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
            registered,
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
            registered,
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
        let handle = ctx.cancels.register();
        handle.set_backend(Some((lease.conn_ref().key, lease.pool().endpoint().clone())));
        let registered = ctx.stats.client(client.peer, &key);
        client.send(&frontend::welcome(&lease.conn_ref().params, handle.pid, handle.secret)).await?;
        tracing::info!(peer = %client.peer, user = %key.user, database = %key.database, "client connected");
        Ok(Session {
            core,
            key,
            params,
            memo: memo::Assessments::default(),
            reported: lease.conn_ref().params.clone(),
            lease: Some(lease),
            home: None,
            idle: detached::Why::Lost,
            behind: None,
            handle,
            registered,
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
            let Some(mut attached) = self.lease.take() else {
                self.handle.set_backend(None);
                self.registered.backend_pid.store(0, std::sync::atomic::Ordering::Relaxed);
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
            self.registered.backend_pid.store(attached.conn_ref().key.pid as i64, std::sync::atomic::Ordering::Relaxed);
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
                    self.registered.backend_pid.store(0, std::sync::atomic::Ordering::Relaxed);
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

/// Negotiates the protocol version if the client asked for more, waits while pgcache is
/// paused, and logs the client in (leasing a backend), within `client.startup_timeout`.
async fn log_in(
    ctx: &Arc<Context>,
    client: &mut Client,
    negotiate: bool,
    unsupported: Vec<String>,
    key: &PoolKey,
    params: &StartupParams,
) -> Result<Lease, SessionError> {
    if negotiate {
        let mut out = BytesMut::new();
        negotiate_protocol_version(unsupported, &mut out);
        client.send(&out).await?;
    }
    ctx.wait_while_paused().await;
    let login = tokio::time::timeout(ctx.config().client.startup_timeout, auth::login(client, ctx, key, params));
    tokio::select! {
        r = login => r.unwrap_or(Err(SessionError::StartupTimeout)),
        _ = ctx.shutdown.cancelled() => Err(SessionError::Shutdown),
    }
}

/// ParameterStatus messages for values a backend reports differently from what the client
/// was last told (`reported`, brought up to date). `reported` shares the map of the backend
/// it was last brought up to date with (an idle client holds a pointer, not a copy); a name
/// only an earlier backend reported is then forgotten, and told again if it comes back.
fn changed_parameters(reported: &mut Arc<BTreeMap<String, String>>, new: &Arc<BTreeMap<String, String>>) -> BytesMut {
    let mut out = BytesMut::new();
    if Arc::ptr_eq(reported, new) {
        return out;
    }
    for (name, value) in new.iter() {
        if reported.get(name) != Some(value) {
            crate::protocol::backend::parameter_status_msg(name, value, &mut out);
        }
    }
    *reported = new.clone();
    out
}

/// Transaction pooling: gives the backend back at the end of a client's transaction (see
/// [`leave`]).
fn hand_back(ctx: &Context, key: &PoolKey, mut lease: Lease, core: &mut Core) {
    leave(ctx, &mut lease, key, core);
    ctx.stats.metrics.handoff();
    lease.release(Reset::None);
}

/// Writes down on the backend what the client left on it at the end of a transaction — its
/// settings (whoever takes it next compares them with its own) and the statements pgcache
/// prepared there.
fn leave(ctx: &Context, lease: &mut Lease, key: &PoolKey, core: &mut Core) {
    let pool = lease.pool().clone();
    let settings = &core.flow.settings;
    let conn = lease.conn();
    // What the session leaves on the backend, as far as it is known. A session that changed
    // nothing since it was given the backend leaves it as it was given; one whose settings
    // were read back leaves exactly those; anything else (a probe that failed, custom
    // settings set under names pgcache cannot know) leaves it unknown, to be reset before
    // anyone else uses it.
    conn.state = match settings.replay(&key.user) {
        _ if settings.unknowable() => SessionState::Unknown,
        Some(replay) => SessionState::Known(replay),
        None if !core.flow.settings_touched && !settings.known() => std::mem::take(&mut conn.state),
        None => SessionState::Unknown,
    };
    conn.verified = settings.verified().cloned();
    conn.defined.extend(settings.customs().iter().cloned());
    conn.prepared = core.server.take();
    if let Some(prepared) = &conn.prepared {
        pool.accept(prepared.names(), ctx.catalog.epoch());
    }
}

/// Returns the backend to the pool if it is at rest; otherwise cancels what it runs and
/// closes it.
fn give_back(mut lease: Lease, core: &Core) {
    lease.conn().defined.extend(core.flow.settings.customs().iter().cloned());
    let track = &core.tracker;
    if core.at_rest() {
        lease.release(if track.used { Reset::Discard } else { Reset::None });
        return;
    }
    if !track.between_requests() {
        let endpoint = lease.pool().endpoint().clone();
        let key = lease.conn_ref().key;
        tokio::spawn(async move {
            let _ = endpoint.cancel(key).await;
        });
    }
    lease.release(Reset::Close);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_at_rest_is_a_small_struct() {
        // What ten thousand idle clients each keep besides their socket and task (bench/idle.sh):
        // the core at rest, not at work.
        let (rest, work) = (size_of::<Session<core::rest::Rest>>(), size_of::<Session<Core>>());
        assert!(rest <= 384, "{rest} bytes");
        assert!(rest * 2 < work, "{rest} bytes at rest, {work} at work");
    }

    fn map(pairs: &[(&str, &str)]) -> Arc<BTreeMap<String, String>> {
        Arc::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn a_client_is_told_only_what_its_new_backend_reports_differently() {
        let first = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        let mut reported = first.clone();
        assert!(changed_parameters(&mut reported, &first).is_empty(), "the same backend");
        let equal = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        assert!(changed_parameters(&mut reported, &equal).is_empty(), "another backend, same values");
        let other = map(&[("DateStyle", "ISO, MDY"), ("TimeZone", "Europe/Paris")]);
        let mut told = changed_parameters(&mut reported, &other);
        assert!(Arc::ptr_eq(&reported, &other), "shares the backend's map");
        let f = crate::protocol::frame::take_frame(&mut told, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), b'S');
        assert_eq!(
            crate::protocol::backend::parameter_status(f.body()).unwrap(),
            ("TimeZone".into(), "Europe/Paris".into())
        );
        assert!(told.is_empty(), "one message: the value that changed");
    }
}
