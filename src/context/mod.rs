//! What every connection shares: the configuration in force, the rules, the cache and its
//! generations, the catalog, the pools, the cancel keys, the statistics, the peers. Built
//! once per server from the [`Config`]; nothing here is a process-wide global, so tests run
//! many servers in one process.
//!
//! It sits between the subsystems below it (which know nothing of each other's owner) and the
//! connection handlers above it (front end, sessions, console, server); it must not import
//! any of those.

pub mod clients;
pub mod verdicts;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::backend::verifiers::{VerifierError, Verifiers};
use crate::backend::{Endpoint, Pools};
use crate::cache::{Flights, Generations, Store};
use crate::config::VerifierSource;
use crate::config::{Config, ConfigError};
use crate::l2::L2;
use crate::net::tls::{self, TlsError};
use crate::peers::Peers;
use crate::query::Classifier;
use crate::query::catalog::Catalog;
use crate::rules::{LoadError, Rules};
use crate::stats::Stats;

use clients::Clients;

/// Why a server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid rules:\n{0}")]
    Rules(#[from] LoadError),
    #[error(transparent)]
    Verifiers(#[from] VerifierError),
}

/// Why a reload changed nothing (or only the rules): what was in force stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("invalid rules, the previous ones stay in force:\n{0}")]
    Rules(#[from] LoadError),
    #[error("configuration not reloaded: the command line no longer parses: {0}")]
    CommandLine(#[from] clap::Error),
    #[error("configuration not reloaded: {0}")]
    Config(#[from] ConfigError),
}

/// What every session shares. Built once per server; nothing here is a process-wide global,
/// so tests run many servers in one process.
pub struct Context {
    /// The configuration in force; `RELOAD` and SIGHUP swap in changes that are safe live.
    config: arc_swap::ArcSwap<Config>,
    /// The command line the server was started with, to re-read on reload (`None` when built
    /// from a `Config` directly, as in tests).
    pub config_source: parking_lot::Mutex<Option<Vec<std::ffi::OsString>>>,
    pub pools: Pools,
    /// The connected clients and their cancel keys.
    pub clients: Arc<Clients>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Channel-binding data of the client certificate (SCRAM-SHA-256-PLUS is offered over TLS
    /// only when this is known).
    pub tls_end_point: Option<Vec<u8>>,
    /// The SCRAM verifiers clients are checked against.
    pub verifiers: Verifiers,
    /// Streaming replicas reads may go to (`--replica`; empty: none).
    pub replicas: Arc<crate::replica::Replicas>,
    /// The shared second-level cache, if configured (`--l2`).
    pub l2: Option<Arc<L2>>,
    /// A secret of this process's (mock SCRAM exchanges for roles without a verifier).
    pub process_secret: [u8; 32],
    pub rules: Arc<Rules>,
    pub store: Store,
    /// Warm start (`cache.warm_file`; `None`: off): the file's statements not yet re-run.
    pub warm: Option<crate::cache::warm::Unrun>,
    pub generations: Arc<Generations>,
    pub flights: Arc<Flights>,
    pub classifier: Arc<Classifier>,
    /// What sessions of each database and user have decided of their statements.
    pub verdicts: verdicts::Verdicts,
    pub catalog: Arc<Catalog>,
    pub peers: Arc<Peers>,
    pub stats: Arc<Stats>,
    /// New backend work waits while this is true (admin `PAUSE`; set by [`Context::pause`]).
    paused: tokio::sync::watch::Sender<bool>,
    /// The same flag, read without the channel's lock by every request ([`Context::wait_while_paused`]).
    paused_now: std::sync::atomic::AtomicBool,
    /// Stop accepting and drain.
    pub shutdown: CancellationToken,
    /// The drain timeout passed: close what is left.
    pub force_close: CancellationToken,
}

impl Context {
    /// Waits while new backend work is paused (admin `PAUSE`), or until shutdown forces
    /// sessions closed.
    pub async fn wait_while_paused(&self) {
        if !self.is_paused() {
            return;
        }
        let mut rx = self.paused.subscribe();
        tokio::select! {
            _ = rx.wait_for(|paused| !*paused) => {}
            _ = self.force_close.cancelled() => {}
        }
    }

    /// Pauses new backend work (admin `PAUSE`) or resumes it.
    pub fn pause(&self, paused: bool) {
        // Both under the channel's lock, so two admins at once leave them agreeing.
        self.paused.send_modify(|p| {
            *p = paused;
            self.paused_now.store(paused, std::sync::atomic::Ordering::SeqCst);
        });
    }

    /// Whether new backend work is paused.
    pub fn is_paused(&self) -> bool {
        self.paused_now.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the cache is in use at all: rules are loaded, or entries remain from when they
    /// were. (While neither holds there is nothing to serve or invalidate.)
    pub fn caching(&self) -> bool {
        self.store.may_hold_entries() || !self.rules.is_empty()
    }

    /// The configuration in force.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// Reloads the rules, and the configuration if the server was started from a command line:
    /// settings that are safe to change live take effect; the names of changed settings that
    /// need a restart are returned.
    pub fn reload(&self) -> Result<Vec<&'static str>, ReloadError> {
        let rules = self.rules.reload();
        let args = self.config_source.lock().clone();
        let mut restart = Vec::new();
        if let Some(args) = args {
            let cli = <crate::config::Cli as clap::Parser>::try_parse_from(args)?;
            let fresh = Config::load(&cli)?;
            let (applied, needs) = self.config().reloaded(fresh);
            self.config.store(Arc::new(applied));
            restart = needs;
            if !restart.is_empty() {
                tracing::warn!(settings = ?restart, "configuration changes that need a restart were not applied");
            }
        }
        rules.map(|_| restart).map_err(ReloadError::Rules)
    }

    pub fn new(config: Config, shutdown: CancellationToken) -> Result<Arc<Context>, ContextError> {
        let endpoint = Arc::new(Endpoint::new(&config.upstream, config.pool.connect_timeout)?);
        let (tls, tls_end_point) = match (&config.client.tls_cert, &config.client.tls_key) {
            (Some(cert), Some(key)) => (Some(tls::acceptor(cert, key)?), tls::end_point(cert)?),
            _ => (None, None),
        };
        let auth_password = match &config.auth.verifiers {
            VerifierSource::Query { user, .. } if *user == config.upstream.user => config.upstream.password.clone(),
            _ => None,
        };
        let verifiers =
            Verifiers::new(config.auth.verifiers.clone(), endpoint.clone(), auth_password, config.auth.verifier_ttl)?;
        // rustls with `ring` is the process's crypto (the L2's rediss:// connections use it).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut process_secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut process_secret)
            .expect("the system's random source");
        let stats = Arc::new(Stats::new(config.max_table_labels, config.slow_statement));
        let clients = Arc::new(Clients::new(stats.metrics.gauge(crate::metrics::CLIENT_CONNECTIONS, &[])));
        let l2 = config.l2.clone().map(|c| L2::start(c, stats.metrics.clone(), shutdown.clone()));
        let rules = if config.rules_explicit || config.rules.exists() {
            Rules::load(&config.rules, Some(stats.metrics.clone()))?
        } else {
            tracing::warn!(dir = %config.rules.display(), "no rule directory: nothing will be cached");
            Rules::empty(&config.rules, Some(stats.metrics.clone()))
        };
        let pools =
            Pools::new(config.pool.clone(), endpoint.clone(), config.auth.verify_interval, stats.metrics.clone());
        let generations = Arc::new(Generations::default());
        let replicas = Arc::new(crate::replica::Replicas::new(
            &config.replicas,
            &config.pool,
            &pools.credentials,
            config.auth.verify_interval,
            generations.clock.clone(),
            stats.metrics.clone(),
        )?);
        let catalog = Arc::new(Catalog::new(
            endpoint,
            config.upstream.clone(),
            pools.credentials.clone(),
            config.cache.catalog_ttl,
        ));
        let peers =
            Arc::new(Peers::new(config.peers.clone(), catalog.clone(), generations.clone(), stats.clone(), l2.clone()));
        Ok(Arc::new(Context {
            pools,
            replicas,
            store: Store::new(config.cache.max_bytes),
            warm: config.cache.warm_file.as_ref().map(|_| Default::default()),
            generations,
            flights: Arc::new(Flights::default()),
            classifier: Arc::new(Classifier::default()),
            verdicts: Default::default(),
            catalog,
            peers,
            rules: Arc::new(rules),
            stats,
            paused: tokio::sync::watch::channel(false).0,
            paused_now: std::sync::atomic::AtomicBool::new(false),
            config: arc_swap::ArcSwap::from_pointee(config),
            config_source: parking_lot::Mutex::new(None),
            clients,
            tls,
            tls_end_point,
            verifiers,
            l2,
            process_secret,
            shutdown,
            force_close: CancellationToken::new(),
        }))
    }
}
