//! The admin HTTP server on `--admin` (apart from the client listener): `/metrics`
//! (Prometheus text; with `metrics.token`, only for `Authorization: Bearer <token>`), `/healthz` (the process
//! is up) and `/readyz` (rules loaded and Postgres reachable; 503 with the reason otherwise,
//! and during shutdown so traffic moves elsewhere). One small axum router, because the
//! exporter's own listener answers every path with the metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::context::Context;
use crate::metrics as m;

/// Serves until the server shuts down.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>) {
    let shutdown = ctx.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(ctx);
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
    if let Err(e) = served {
        tracing::error!(error = %e, "admin HTTP server failed");
    }
}

async fn metrics(State(ctx): State<Arc<Context>>, headers: HeaderMap) -> axum::response::Response {
    if let Some(token) = &ctx.config().metrics_token {
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        let expected = token.expose().as_bytes();
        if given.is_none_or(|g| g.as_bytes().ct_eq(expected).unwrap_u8() != 1) {
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], "a bearer token is required\n")
                .into_response();
        }
    }
    refresh_gauges(&ctx);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.stats.metrics.render()).into_response()
}

/// Gauges are read off their sources at scrape time.
fn refresh_gauges(ctx: &Context) {
    let metrics = &ctx.stats.metrics;
    metrics.gauge(m::CACHE_ENTRIES, &[]).set(ctx.store.len() as f64);
    metrics.gauge(m::CACHE_BYTES, &[]).set(ctx.store.bytes() as f64);
    metrics.gauge(m::CACHE_CAPACITY_BYTES, &[]).set(ctx.store.capacity() as f64);
    metrics.counter(m::CACHE_EVICTIONS, &[]).absolute(ctx.store.evictions());
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    metrics.gauge(m::RUNTIME_WORKERS, &[]).set(workers as f64);
    metrics.gauge(m::RULES_LOADED, &[]).set(ctx.rules.current().rules.len() as f64);
    let (mut active, mut idle) = (0, 0);
    for pool in ctx.pools.all() {
        let s = pool.stats();
        active += s.active;
        idle += s.idle;
    }
    metrics.gauge(m::BACKEND_CONNECTIONS, &[("state", "active")]).set(active as f64);
    metrics.gauge(m::BACKEND_CONNECTIONS, &[("state", "idle")]).set(idle as f64);
}

async fn ready(State(ctx): State<Arc<Context>>) -> (StatusCode, String) {
    match readiness(&ctx).await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
    }
}

/// Why pgcache should not get traffic now.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("shutting down")]
    ShuttingDown,
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable { upstream: String, source: std::io::Error },
    #[error("upstream {0} did not answer within 1s")]
    NoAnswer(String),
    #[error("not listening for other instances' invalidations of {} (caching for them is off until it is)", .0.join(", "))]
    NotListening(Vec<String>),
}

/// Whether pgcache should get traffic now: not if Postgres is unreachable, or a database's link
/// to the other instances is not listening (it could miss their invalidations). (Rules are
/// always loaded while the server runs: it does not start with invalid rules, and a failed
/// reload keeps the old ones.) The upstream check is a bare TCP connection, which Postgres
/// does not log, unlike a TLS handshake or a partial start-up on every probe.
pub async fn readiness(ctx: &Context) -> Result<(), NotReady> {
    if ctx.shutdown.is_cancelled() {
        return Err(NotReady::ShuttingDown);
    }
    let endpoint = ctx.pools.endpoint();
    match tokio::time::timeout(Duration::from_secs(1), endpoint.open()).await {
        Ok(Ok(_)) => match ctx.peers.not_listening() {
            dbs if dbs.is_empty() => Ok(()),
            dbs => Err(NotReady::NotListening(dbs)),
        },
        Ok(Err(source)) => Err(NotReady::Unreachable { upstream: endpoint.describe(), source }),
        Err(_) => Err(NotReady::NoAnswer(endpoint.describe())),
    }
}
