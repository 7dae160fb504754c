//! The accept loop, the client limit, shutdown and drain (the shape of mini-redis's server):
//! the caller binds the listener (port 0 in tests) and owns the shutdown token; one task per
//! connection; accept errors back off; on shutdown the listener closes, sessions finish their
//! running statements and are told 57P01 at a quiet moment, and after the drain timeout the
//! rest are closed.
//!
//! Once the front end has opened a connection, the server routes it: to the admin console
//! (the virtual database `console.database`) or to a session. It is the only module that knows
//! both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::Config;
use crate::context::Context;
use crate::frontend::{self, SessionError};
use crate::net::{Peer, Stream};
use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;
use crate::protocol::startup::Startup;
use crate::session;

mod trim;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: String,
    source: std::io::Error,
}

/// Where clients connect: the TCP address, and the Unix socket when one is configured.
pub struct Listeners {
    tcp: TcpListener,
    unix: Option<(UnixListener, PathBuf)>,
}

impl Listeners {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The Unix socket's path, if there is one.
    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, path)| path.as_path())
    }

    async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        let unix = async {
            match &self.unix {
                Some((listener, _)) => listener.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.tcp.accept() => r.map(|(tcp, peer)| (Stream::Tcp(tcp), Peer::Tcp(peer))),
            r = unix => r.map(|(unix, _)| (Stream::Unix(unix), Peer::Unix)),
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the configured listen address, and the Unix socket (named after the port bound)
/// when a directory is configured for it.
pub async fn bind(config: &Config) -> Result<Listeners, BindError> {
    let failed = |addr: String| move |source| BindError { addr, source };
    let tcp = TcpListener::bind(config.listen).await.map_err(failed(config.listen.to_string()))?;
    let port = tcp.local_addr().map_err(failed(config.listen.to_string()))?.port();
    let unix = match config.unix_socket(port) {
        Some(path) => Some((bind_unix(&path).await.map_err(failed(path.display().to_string()))?, path)),
        None => None,
    };
    Ok(Listeners { tcp, unix })
}

/// Binds a Unix socket at `path`, replacing a socket file left by a process that is gone (as
/// Postgres does; one that still answers is another server's, and is left alone), open to
/// every local user as Postgres's is by default: Postgres authenticates the login.
async fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another server listens there"));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// Accepts clients on `listeners` until `shared.shutdown` is cancelled, then drains.
pub async fn run(listeners: Listeners, ctx: Arc<Context>) {
    let sessions = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(ctx.config().client.max_connections));
    let upkeep = tokio::spawn(maintain(ctx.clone()));
    let watch = tokio::spawn(ctx.rules.clone().watch(Duration::from_secs(1)));
    let warming = session::warm::start(&ctx);
    let monitor = (!ctx.replicas.is_empty()).then(|| {
        tokio::spawn(crate::replica::monitor::run(
            ctx.replicas.clone(),
            ctx.pools.endpoint().clone(),
            ctx.config().upstream.clone(),
            ctx.generations.clock.clone(),
            ctx.shutdown.clone(),
        ))
    });
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listeners.accept() => r,
            _ = ctx.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let permit = limit.clone().try_acquire_owned().ok();
                sessions.spawn(connection(Box::new(Accepted { ctx: ctx.clone(), stream, peer, permit })));
            }
            Err(e) => {
                // Usually EMFILE: wait for connections to close rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listeners);
    sessions.close();
    tracing::info!(sessions = sessions.len(), "shutting down: draining sessions");
    if tokio::time::timeout(ctx.config().drain_timeout, sessions.wait()).await.is_err() {
        tracing::warn!(sessions = sessions.len(), "drain timeout passed: closing remaining sessions");
        ctx.force_close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
    }
    upkeep.abort();
    watch.abort();
    if let Some(w) = warming {
        w.abort();
    }
    if let Some(m) = monitor {
        m.abort();
    }
    // What the sessions filled is written down for the next start (cache.warm_file).
    session::warm::save(&ctx);
    // After the sessions: what they wrote last is published, then the other instances are
    // told this one is leaving (so its silence is not taken for a crash).
    ctx.peers.close().await;
    ctx.pools.close().await;
    ctx.replicas.close().await;
    tracing::info!("shutdown complete");
}

/// A connection just accepted, for its task.
struct Accepted {
    ctx: Arc<Context>,
    stream: Stream,
    peer: Peer,
    /// `None` when the client limit is reached.
    permit: Option<OwnedSemaphorePermit>,
}

/// Serves one accepted connection.
///
/// Its future is the task's for the connection's life, idle clients' included (see
/// bench/idle.sh): its argument is a pointer (arguments are kept throughout), and what it
/// awaits besides the session — which waits between its stretches here — is boxed, each in a
/// statement of its own (a temporary or a binding still in scope at an await keeps its room
/// in the future, even once moved).
// An async fn would keep its arguments twice in its future (see below).
#[allow(clippy::manual_async_fn)]
fn connection(accepted: Box<Accepted>) -> impl Future<Output = ()> + Send {
    // An async block rather than an async fn: its argument is not copied a second time.
    async move {
        let Accepted { ctx, stream, peer, permit } = *accepted;
        let (mut client, startup) = {
            let accepting = Box::pin(frontend::accept(&ctx, stream, peer));
            let Some((client, startup)) = accepting.await else { return };
            (client, Box::new(startup))
        };
        let report = {
            let result = match route(&ctx, &client, &startup, permit.is_some()) {
                Route::Refused(why) => Err(why.error(&ctx)),
                Route::Console => {
                    let console = Box::pin(admin::console::serve(&ctx, &mut client, &startup));
                    frontend::guard(console).await
                }
                Route::Session => session::serve(&ctx, &mut client, startup).await,
            };
            let Err(e) = result else { return };
            let client = &mut client;
            Box::pin(async move { frontend::report(client, &e).await })
        };
        report.await;
    }
}

/// Where an opened connection goes (small: it is matched across the session's awaits).
#[derive(Clone, Copy)]
enum Route {
    Console,
    Session,
    Refused(Refusal),
}

/// Why an opened connection is refused.
#[derive(Clone, Copy)]
enum Refusal {
    /// `client.max_connections` reached.
    TooMany,
    /// `client.tls_required`, and the client did not use TLS (nor the Unix socket).
    NeedsTls,
}

impl Refusal {
    fn error(self, ctx: &Context) -> SessionError {
        SessionError::Refused(match self {
            Refusal::TooMany => PgError::fatal(
                SqlState::TOO_MANY_CONNECTIONS,
                format!(
                    "sorry, too many clients already (pgcache client.max_connections = {})",
                    ctx.config().client.max_connections
                ),
            ),
            Refusal::NeedsTls => PgError::fatal(
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                "pgcache requires TLS: connect with sslmode=require or stronger",
            ),
        })
    }
}

/// Routes an opened connection, or refuses it: over the client limit (`admitted` false), or
/// without TLS where it is required.
fn route(ctx: &Context, client: &frontend::Client, startup: &Startup, admitted: bool) -> Route {
    let config = ctx.config();
    if !admitted {
        return Route::Refused(Refusal::TooMany);
    }
    if config.client.tls_required && !client.stream.is_tls() && client.peer != Peer::Unix {
        return Route::Refused(Refusal::NeedsTls);
    }
    if startup.param("database") == Some(config.console.database.as_str()) {
        return Route::Console;
    }
    Route::Session
}

/// Upkeep once a second: pools (idle timeout, max lifetime, min idle), the cache (entries
/// that can never be served again are removed), the metrics (histogram samples folded into
/// buckets, which would otherwise pile up until the next scrape) and the heap (free pages
/// given back after crowds of clients came or went, [`trim::Trimmer`]).
///
/// The cache's sweep runs on a blocking thread (it visits every entry: a worker would stall the
/// sessions it serves meanwhile), only when an entry can have died (see
/// [`crate::cache::Store::sweep`]), and rests twenty times as long as it took, so it never
/// takes more than a twentieth of a core.
async fn maintain(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sweep = tokio::time::Instant::now();
    let mut trimmer = trim::Trimmer::new(next_sweep);
    loop {
        tick.tick().await;
        ctx.pools.maintain().await;
        ctx.replicas.maintain().await;
        if tokio::time::Instant::now() >= next_sweep {
            let (started, moves, c) = (tokio::time::Instant::now(), ctx.generations.moves(), ctx.clone());
            if let Ok(true) = tokio::task::spawn_blocking(move || c.store.sweep(moves)).await {
                next_sweep = tokio::time::Instant::now() + started.elapsed() * 20;
                tracing::debug!(took = ?started.elapsed(), entries = ctx.store.len(), "cache swept");
            }
        }
        ctx.stats.metrics.upkeep();
        trimmer.tick(ctx.clients.churn(), tokio::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_idle_clients_task_stays_in_the_small_cell() {
        // Every connected client, idle ones included, keeps this future in its task: tokio's
        // task cell is 128-aligned, and at 272 bytes or less the cell is 384 (bench/idle.sh).
        // A binding or temporary kept across an await, or an async fn's second copy of its
        // arguments, pushes it to 512.
        let config = Config::for_upstream("postgres://postgres@127.0.0.1:1/postgres").unwrap();
        let ctx = Context::new(config, tokio_util::sync::CancellationToken::new()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let accepted = Box::new(Accepted { ctx, stream: Stream::Tcp(tcp), peer: Peer::Unix, permit: None });
        let size = std::mem::size_of_val(&connection(accepted));
        // Optimized builds lay it out a little tighter: 272 bytes in release, 280 in tests.
        let most = if cfg!(debug_assertions) { 280 } else { 272 };
        assert!(size <= most, "the connection's future is {size} bytes");
    }

    #[tokio::test]
    async fn a_unix_socket_in_use_is_refused_and_a_dead_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".s.PGSQL.1");
        let first = bind_unix(&path).await.unwrap();
        let e = bind_unix(&path).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        drop(first);
        assert!(path.exists(), "the file outlives its listener");
        let second = bind_unix(&path).await.expect("a socket nobody listens on is replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o777);
        drop(second);
    }
}
