//! The accept loop, the client limit, shutdown and drain (the shape of mini-redis's server):
//! the caller binds the listener (port 0 in tests) and owns the shutdown token; one task per
//! connection; accept errors back off; on shutdown the listener closes, sessions finish their
//! running statements and are told 57P01 at a quiet moment, and after the drain timeout the
//! rest are closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{Endpoint, Pools};
use crate::cache::{Flights, Generations, Store};
use crate::config::Config;
use crate::net::tls::{self, TlsError};
use crate::peers::Peers;
use crate::query::Classifier;
use crate::query::catalog::Catalog;
use crate::rules::{LoadError, Rules};
use crate::session::{self, cancel::CancelRegistry};
use crate::stats::Stats;

/// What every session shares. Built once per server; nothing here is a process-wide global,
/// so tests run many servers in one process.
pub struct Shared {
    /// The configuration in force; `RELOAD` and SIGHUP swap in changes that are safe live.
    config: arc_swap::ArcSwap<Config>,
    /// The command line the server was started with, to re-read on reload (`None` when built
    /// from a `Config` directly, as in tests).
    pub config_source: parking_lot::Mutex<Option<Vec<std::ffi::OsString>>>,
    pub pools: Pools,
    pub cancels: Arc<CancelRegistry>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub rules: Arc<Rules>,
    pub store: Store,
    pub generations: Arc<Generations>,
    pub flights: Arc<Flights>,
    pub classifier: Classifier,
    pub catalog: Arc<Catalog>,
    pub peers: Arc<Peers>,
    pub stats: Arc<Stats>,
    /// New backend work waits while this is true (admin `PAUSE`).
    pub paused: tokio::sync::watch::Sender<bool>,
    /// Stop accepting and drain.
    pub shutdown: CancellationToken,
    /// The drain timeout passed: close what is left.
    pub force_close: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("invalid rules:\n{0}")]
    Rules(#[from] LoadError),
}

impl Shared {
    /// Waits while new backend work is paused (admin `PAUSE`), or until shutdown forces
    /// sessions closed.
    pub async fn wait_while_paused(&self) {
        let mut rx = self.paused.subscribe();
        tokio::select! {
            _ = rx.wait_for(|paused| !*paused) => {}
            _ = self.force_close.cancelled() => {}
        }
    }

    /// Whether the cache is in use at all: rules are loaded, or entries remain from when they
    /// were. (While neither holds there is nothing to serve or invalidate.)
    pub fn caching(&self) -> bool {
        !self.store.is_empty() || !self.rules.current().rules.is_empty()
    }

    /// The configuration in force.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// Reloads the rules, and the configuration if the server was started from a command line:
    /// settings that are safe to change live take effect; the names of changed settings that
    /// need a restart are returned.
    pub fn reload(&self) -> Result<Vec<&'static str>, String> {
        let rules = self.rules.reload().map_err(|e| e.to_string());
        let args = self.config_source.lock().clone();
        let mut restart = Vec::new();
        if let Some(args) = args {
            let cli = <crate::config::Cli as clap::Parser>::try_parse_from(args).map_err(|e| e.to_string())?;
            let fresh = Config::load(&cli).map_err(|e| e.to_string())?;
            let (applied, needs) = self.config().reloaded(fresh);
            self.config.store(Arc::new(applied));
            restart = needs;
            if !restart.is_empty() {
                tracing::warn!(settings = ?restart, "configuration changes that need a restart were not applied");
            }
        }
        rules.map(|_| restart)
    }

    pub fn new(config: Config, shutdown: CancellationToken) -> Result<Arc<Shared>, ServerError> {
        let endpoint = Arc::new(Endpoint::new(&config.upstream, config.pool.connect_timeout)?);
        let tls = match (&config.client.tls_cert, &config.client.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let stats = Arc::new(Stats::new(config.max_table_labels, config.slow_statement));
        let rules = if config.rules_explicit || config.rules.exists() {
            Rules::load(&config.rules, Some(stats.clone()))?
        } else {
            tracing::warn!(dir = %config.rules.display(), "no rule directory: nothing will be cached");
            Rules::empty(&config.rules, Some(stats.clone()))
        };
        let pools = Pools::new(config.pool.clone(), endpoint.clone(), config.auth.verify_interval, stats.clone());
        let catalog = Arc::new(Catalog::new(
            endpoint,
            config.upstream.clone(),
            pools.credentials.clone(),
            config.cache.catalog_ttl,
        ));
        let generations = Arc::new(Generations::default());
        let peers = Arc::new(Peers::new(config.peers.clone(), catalog.clone(), generations.clone(), stats.clone()));
        Ok(Arc::new(Shared {
            pools,
            store: Store::new(config.cache.max_bytes),
            generations,
            flights: Arc::new(Flights::default()),
            classifier: Classifier::default(),
            catalog,
            peers,
            rules: Arc::new(rules),
            stats,
            paused: tokio::sync::watch::channel(false).0,
            config: arc_swap::ArcSwap::from_pointee(config),
            config_source: parking_lot::Mutex::new(None),
            cancels: Arc::new(CancelRegistry::default()),
            tls,
            shutdown,
            force_close: CancellationToken::new(),
        }))
    }
}

/// Binds the configured listen address.
pub async fn bind(config: &Config) -> Result<TcpListener, ServerError> {
    TcpListener::bind(config.listen).await.map_err(|source| ServerError::Bind { addr: config.listen, source })
}

/// Accepts clients on `listener` until `shared.shutdown` is cancelled, then drains.
pub async fn run(listener: TcpListener, shared: Arc<Shared>) {
    let sessions = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(shared.config().client.max_connections));
    let upkeep = tokio::spawn(maintain(shared.clone()));
    let watch = tokio::spawn(shared.rules.clone().watch(Duration::from_secs(1)));
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shared.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                let permit = limit.clone().try_acquire_owned().ok();
                sessions.spawn(session::run(shared.clone(), tcp, peer, permit));
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
    if tokio::time::timeout(shared.config().drain_timeout, sessions.wait()).await.is_err() {
        tracing::warn!(sessions = sessions.len(), "drain timeout passed: closing remaining sessions");
        shared.force_close.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), sessions.wait()).await;
    }
    upkeep.abort();
    watch.abort();
    // After the sessions: what they wrote last is published, then the other instances are
    // told this one is leaving (so its silence is not taken for a crash).
    shared.peers.close().await;
    shared.pools.close().await;
    tracing::info!("shutdown complete");
}

/// Upkeep once a second: pools (idle timeout, max lifetime, min idle), the cache (entries
/// that can never be served again are removed) and the metrics (histogram samples folded into
/// buckets, which would otherwise pile up until the next scrape).
async fn maintain(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.pools.maintain().await;
        shared.store.sweep();
        shared.stats.metrics.upkeep();
    }
}
