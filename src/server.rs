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
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::admin;
use crate::config::Config;
use crate::context::Context;
use crate::frontend::{self, SessionError};
use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;
use crate::session;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the configured listen address.
pub async fn bind(config: &Config) -> Result<TcpListener, BindError> {
    TcpListener::bind(config.listen).await.map_err(|source| BindError { addr: config.listen, source })
}

/// Accepts clients on `listener` until `shared.shutdown` is cancelled, then drains.
pub async fn run(listener: TcpListener, ctx: Arc<Context>) {
    let sessions = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(ctx.config().client.max_connections));
    let upkeep = tokio::spawn(maintain(ctx.clone()));
    let watch = tokio::spawn(ctx.rules.clone().watch(Duration::from_secs(1)));
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = ctx.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                let permit = limit.clone().try_acquire_owned().ok();
                sessions.spawn(connection(ctx.clone(), tcp, peer, permit));
            }
            Err(e) => {
                // Usually EMFILE: wait for connections to close rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    drop(listener);
    sessions.close();
    tracing::info!(sessions = sessions.len(), "shutting down: draining sessions");
    if tokio::time::timeout(ctx.config().drain_timeout, sessions.wait()).await.is_err() {
        tracing::warn!(sessions = sessions.len(), "drain timeout passed: closing remaining sessions");
        ctx.force_close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
    }
    upkeep.abort();
    watch.abort();
    // After the sessions: what they wrote last is published, then the other instances are
    // told this one is leaving (so its silence is not taken for a crash).
    ctx.peers.close().await;
    ctx.pools.close().await;
    tracing::info!("shutdown complete");
}

/// Serves one accepted connection. `permit` is `None` when the client limit is reached.
async fn connection(ctx: Arc<Context>, tcp: TcpStream, peer: SocketAddr, permit: Option<OwnedSemaphorePermit>) {
    let Some((mut client, startup)) = Box::pin(frontend::accept(&ctx, tcp, peer)).await else { return };
    let config = ctx.config();
    let result = if permit.is_none() {
        Err(SessionError::Refused(PgError::fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            format!(
                "sorry, too many clients already (pgcache client.max_connections = {})",
                config.client.max_connections
            ),
        )))
    } else if config.client.tls_required && !client.stream.is_tls() {
        Err(SessionError::Refused(PgError::fatal(
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "pgcache requires TLS: connect with sslmode=require or stronger",
        )))
    } else if startup.param("database") == Some(config.console.database.as_str()) {
        drop(config);
        frontend::guard(Box::pin(admin::console::serve(&ctx, &mut client, &startup))).await
    } else {
        drop(config);
        frontend::guard(Box::pin(session::serve(&ctx, &mut client, startup))).await
    };
    if let Err(e) = result {
        frontend::report(&mut client, &e).await;
    }
}

/// Upkeep once a second: pools (idle timeout, max lifetime, min idle), the cache (entries
/// that can never be served again are removed) and the metrics (histogram samples folded into
/// buckets, which would otherwise pile up until the next scrape).
async fn maintain(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ctx.pools.maintain().await;
        ctx.store.sweep();
        ctx.stats.metrics.upkeep();
    }
}
