//! The pgcache binary: parse flags, set up logging, load the config and run the server until
//! SIGTERM or SIGINT.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use pgcache::config::{Cli, Command, Config, LogFormat};
use pgcache::server;

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let cli = Cli::parse();
    if let Some(Command::CheckRules { dir }) = &cli.command {
        return check_rules(dir);
    }
    if let Some(Command::Healthcheck) = &cli.command {
        return healthcheck(&Config::load(&cli)?);
    }
    let config = Config::load(&cli)?;
    init_logging(config.log_format);
    if let Some(Command::Triggers { action, database }) = &cli.command {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(triggers(config, action, database));
    }
    let runtime = runtime(config.worker_threads)?;
    if let Some(Command::Demo) = &cli.command {
        return Ok(runtime.block_on(pgcache::demo::run(config))?);
    }
    runtime.block_on(run(config))
}

/// The runtime sessions run on: `workers` threads, or one per CPU the process may use.
/// Fewer than the CPUs can be faster where pgcache shares them with Postgres or the clients
/// (README, "Benchmarks": on two cores, one thread made pass-through cheaper per statement
/// and hits dearer in throughput).
fn runtime(workers: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder.enable_all().build()
}

/// glibc's allocator, set so that what the cache and the sessions free goes back to the
/// system: an allocation of 64 KiB or more (a large result, a session's grown buffers) is a
/// mapping of its own, unmapped when freed. By default glibc raises that threshold each time
/// such a mapping is freed (up to 32 MiB), after which large results come from the heap and
/// what they free stays in the process: a cache of 100 kB results filled past its bound grew
/// RSS by 1.7 times the bound that way, about 1.05 times with the threshold fixed (README,
/// "Bounded memory"). Other allocators (jemalloc, mimalloc) return memory on a timer instead.
/// At most 32 768 such mappings are made at once (half the kernel's default
/// `vm.max_map_count`, so thread stacks and sockets always find room); past that, large
/// allocations come from the heap. An operator's own `MALLOC_MMAP_THRESHOLD_` or
/// `GLIBC_TUNABLES` wins.
fn tune_allocator() {
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10);
        libc::mallopt(libc::M_MMAP_MAX, 32 << 10);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let listener = server::bind(&config).await?;
    let unix = listener.unix_socket().map(|p| p.display().to_string());
    tracing::info!(listen = %config.listen, unix, admin = %config.admin, upstream = %config.upstream.describe(), "pgcache listening");
    let admin = tokio::net::TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin))?;
    let ctx = pgcache::context::Context::new(config, shutdown.clone()).context("cannot start")?;
    *ctx.config_source.lock() = Some(std::env::args_os().collect());
    tokio::spawn(pgcache::admin::http::serve(admin, ctx.clone()));
    tokio::spawn(wait_for_signal(shutdown, ctx.clone()));
    server::run(listener, ctx).await;
    Ok(())
}

/// SIGTERM/SIGINT start a graceful shutdown; SIGHUP reloads the rules.
async fn wait_for_signal(shutdown: CancellationToken, ctx: std::sync::Arc<pgcache::context::Context>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading rules and configuration");
                if let Err(e) = ctx.reload() {
                    tracing::error!(error = %e, "reload failed");
                }
                continue;
            }
        }
        shutdown.cancel();
        return;
    }
}

/// `pgcache check-rules DIR`: the rules as they would be loaded, or every error.
fn check_rules(dir: &std::path::Path) -> anyhow::Result<()> {
    match pgcache::rules::load_dir(dir, 1) {
        Ok(set) => {
            println!("{}: {} rule(s), first match wins:", dir.display(), set.rules.len());
            for r in &set.rules {
                println!("  {}", pgcache::rules::describe(r));
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

/// `pgcache healthcheck`: GET /healthz on the admin address; exit non-zero unless 200.
fn healthcheck(config: &Config) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&config.admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    match answer.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        other => anyhow::bail!("unhealthy: status {other:?}"),
    }
}

/// `pgcache triggers install|uninstall|sql [--database DB]...`.
async fn triggers(config: Config, action: &str, databases: &[String]) -> anyhow::Result<()> {
    let rules = pgcache::rules::load_dir(&config.rules, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
    let endpoint = std::sync::Arc::new(pgcache::backend::Endpoint::new(&config.upstream, config.pool.connect_timeout)?);
    let credentials = std::sync::Arc::new(pgcache::backend::Credentials::new(config.auth.verify_interval));
    let catalog =
        pgcache::query::catalog::Catalog::new(endpoint, config.upstream.clone(), credentials, config.cache.catalog_ttl);
    let defaults = [config.upstream.dbname.clone()];
    for db in if databases.is_empty() { &defaults[..] } else { databases } {
        let key = config.peers.secret.as_ref().map(|s| *pgcache::peers::message::Seal::new(s.bytes()).key());
        let done =
            pgcache::peers::triggers::run(&catalog, db, &rules, &config.peers.channel, key.as_ref(), action).await?;
        println!("{done}");
    }
    Ok(())
}
