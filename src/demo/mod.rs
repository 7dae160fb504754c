//! `pgcache demo`: the first run for a newcomer without a database. Starts a throwaway
//! Postgres ([`cluster`]), loads a small shop schema, starts pgcache in front of it with the
//! example rules, prints what to try, and cleans everything up on Ctrl-C.
//!
//! The top of the tree: it may use everything (it starts a server), and nothing uses it but
//! `main` and the tests' cluster.

pub mod cluster;

use std::path::Path;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::server;

/// The example rules, built in so the demo works from any directory.
const RULES: &[(&str, &str)] = &[
    ("05-bypass.toml", include_str!("../../rules/05-bypass.toml")),
    ("10-pgbench.toml", include_str!("../../rules/10-pgbench.toml")),
    ("20-catalog.toml", include_str!("../../rules/20-catalog.toml")),
];

const SCHEMA: &str = "
CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO categories SELECT g, 'category ' || g FROM generate_series(1, 20) g;
CREATE TABLE products (id int PRIMARY KEY, category_id int REFERENCES categories, name text NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO products SELECT g, 1 + g % 20, 'product ' || g, round((random() * 100)::numeric, 2) FROM generate_series(1, 10000) g;
CREATE INDEX ON products (category_id);
CREATE TABLE orders (id serial PRIMARY KEY, product_id int REFERENCES products, quantity int, day date DEFAULT current_date);
INSERT INTO orders (product_id, quantity, day) SELECT 1 + g % 10000, 1 + g % 5, current_date - (g % 30) FROM generate_series(1, 50000) g;
CREATE VIEW daily_report AS SELECT day, count(*) AS orders, sum(quantity) AS items FROM orders GROUP BY day ORDER BY day;
CREATE TABLE sessions (id text PRIMARY KEY, data text);
";

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Bind(#[from] server::BindError),
    #[error(transparent)]
    Setup(#[from] crate::context::ContextError),
    #[error("invalid upstream URL: {0}")]
    Upstream(#[from] crate::config::upstream::UpstreamError),
}

/// Runs the demo until Ctrl-C (or SIGTERM).
pub async fn run(mut config: Config) -> Result<(), DemoError> {
    println!("pgcache demo: starting a throwaway PostgreSQL...");
    let cluster = tokio::task::spawn_blocking(|| cluster::Cluster::start(&cluster::Options::default()))
        .await
        .map_err(|e| DemoError::Io(std::io::Error::other(e)))??;
    cluster.psql("postgres", "CREATE DATABASE demo")?;
    cluster.psql("demo", SCHEMA)?;
    let rules = tempfile_dir()?;
    for (name, text) in RULES {
        std::fs::write(rules.join(name), text)?;
    }
    config.upstream = cluster.url("demo").parse()?;
    // The throwaway cluster trusts its superuser: clients log in as to it, with no password
    // (SCRAM needs a role with a password; see the README on authentication).
    config.auth.method = crate::config::AuthMethod::Cleartext;
    config.rules = rules.clone();
    config.rules_explicit = true;
    let listener = server::bind(&config).await?;
    let admin = tokio::net::TcpListener::bind(config.admin).await?;
    let shutdown = CancellationToken::new();
    let ctx = crate::context::Context::new(config.clone(), shutdown.clone())?;
    tokio::spawn(crate::admin::http::serve(admin, ctx.clone()));
    let server = tokio::spawn(server::run(listener, ctx));
    print_welcome(&config);
    wait_for_stop().await;
    println!("\npgcache demo: stopping and removing the throwaway database...");
    shutdown.cancel();
    let _ = server.await;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&rules);
    println!("pgcache demo: done.");
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("pgcache-demo-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn print_welcome(config: &Config) {
    let (host, port) = (config.listen.ip(), config.listen.port());
    let rules: &Path = &config.rules;
    println!(
        "
pgcache demo is running: PostgreSQL with a small shop schema, pgcache in front of it on {listen}.

  connect:   psql -h {host} -p {port} -U postgres demo
  console:   psql -h {host} -p {port} -U postgres pgcache      (SHOW STATS; SHOW QUERIES; SHOW ADVICE; SHOW RULES)
  metrics:   curl http://{admin}/metrics
  rules:     {rules}  (the example rules; edit them, then RELOAD in the console)

Try, in the first psql:
  SELECT name, price FROM products WHERE category_id = 3 ORDER BY price LIMIT 5;  -- twice: the second is answered from the cache
  UPDATE products SET price = price + 1 WHERE category_id = 3;                   -- invalidates the cached reads of products
  SELECT * FROM daily_report;                                                    -- a view over orders, cached by rule daily-report

Press Ctrl-C to stop; the throwaway database is removed.",
        listen = config.listen,
        admin = config.admin,
        rules = rules.display(),
    );
}

async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
