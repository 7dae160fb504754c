//! The admin console's commands, parsed once into a [`Command`] that knows its columns (so a
//! driver's Describe runs nothing) and whether it changes something (so a transaction block
//! can refuse it, [`super::block`]). Each runs against the live server and answers with a
//! result set (text columns), so psql shows a table. Unknown commands get an error listing them.

use std::sync::Arc;

use crate::context::Context;
use crate::protocol::backend::PgError;
use crate::protocol::sqlstate::SqlState;
use crate::query::Relation;

use super::advice;
use super::control::Control;
use super::show::{self, CACHE, CLIENTS, PEERS, POOLS, REPLICAS, RULES, SERVERS, STATS};
use super::table::PAIRS;
pub use super::table::ResultSet;

pub const COMMANDS: &str = "SHOW STATS | POOLS | CLIENTS | SERVERS | CACHE | RULES | CONFIG | QUERIES | ADVICE | PEERS | L2 | REPLICAS, \
    EXPLAIN CACHE [ON <database>] <select>, INVALIDATE TABLE <name> | RULE <name> | ALL, RELOAD, PAUSE, RESUME, BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE";

fn unknown(cmd: &str) -> PgError {
    PgError::error(SqlState::SYNTAX_ERROR, format!("unknown pgcache admin command: {cmd:?}"))
        .with_hint(format!("commands: {COMMANDS}"))
}

/// The session parameters drivers set as they connect, which the console accepts (and ignores).
const DRIVER_PARAMETERS: [&str; 6] =
    ["EXTRA_FLOAT_DIGITS", "APPLICATION_NAME", "CLIENT_ENCODING", "DATESTYLE", "TIMEZONE", "INTERVALSTYLE"];

/// `SET [SESSION] <one of DRIVER_PARAMETERS> {= | TO} …` (words in upper case).
fn sets_a_driver_parameter(up: &[&str]) -> bool {
    let rest = match up {
        ["SET", "SESSION", rest @ ..] | ["SET", rest @ ..] => rest,
        _ => return false,
    };
    // `name=value` may come as one word.
    let name = rest.first().map(|w| w.split('=').next().unwrap_or(w)).unwrap_or("");
    DRIVER_PARAMETERS.contains(&name) && (rest.len() >= 2 || rest[0].contains('='))
}

/// What a `SHOW` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Stats,
    Pools,
    Clients,
    Servers,
    Cache,
    Rules,
    Config,
    Queries,
    Advice,
    Peers,
    L2,
    Replicas,
}

/// One console command, parsed: what it shows or does, with its columns known without running
/// it (a driver's Describe of a statement runs nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    Show(Show),
    /// `EXPLAIN CACHE [ON <database>] <select>`.
    Explain {
        database: Option<&'a str>,
        sql: &'a str,
    },
    InvalidateTable(&'a str),
    InvalidateRule(&'a str),
    InvalidateAll,
    /// A driver's `SET` of a parameter the console accepts and ignores.
    Set,
    Reload,
    Pause,
    Resume,
    /// A transaction-control statement ([`super::block`] keeps the block).
    Control(Control<'a>),
}

impl<'a> Command<'a> {
    /// Parses one command (a statement without its trailing semicolon).
    pub fn parse(text: &'a str) -> Result<Self, PgError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let up: Vec<&str> = upper.iter().map(String::as_str).collect();
        if let Some(control) = Control::parse(&words, &up) {
            return control.map(Command::Control);
        }
        Ok(match up.as_slice() {
            ["SHOW", what] => Command::Show(match *what {
                "STATS" => Show::Stats,
                "POOLS" => Show::Pools,
                "CLIENTS" => Show::Clients,
                "SERVERS" => Show::Servers,
                "CACHE" => Show::Cache,
                "RULES" => Show::Rules,
                "CONFIG" => Show::Config,
                "QUERIES" => Show::Queries,
                "ADVICE" => Show::Advice,
                "PEERS" => Show::Peers,
                "L2" => Show::L2,
                "REPLICAS" => Show::Replicas,
                _ => return Err(unknown(text.trim())),
            }),
            ["EXPLAIN", "CACHE", ..] => {
                // EXPLAIN CACHE [ON database] <select>
                let rest = text.trim_start()[7..].trim_start()[5..].trim_start();
                let (database, sql) = match up.get(2) {
                    Some(&"ON") if words.len() > 3 => {
                        let after_on = rest[2..].trim_start();
                        let db = words[3];
                        (Some(db), after_on[db.len()..].trim())
                    }
                    _ => (None, rest.trim()),
                };
                if sql.is_empty() {
                    return Err(PgError::error(SqlState::SYNTAX_ERROR, "EXPLAIN CACHE needs a SELECT"));
                }
                Command::Explain { database, sql }
            }
            ["INVALIDATE", "TABLE", _] => Command::InvalidateTable(words[2]),
            ["INVALIDATE", "RULE", _] => Command::InvalidateRule(words[2]),
            ["INVALIDATE", "ALL"] => Command::InvalidateAll,
            // Drivers set session parameters as they connect (pgjdbc: `extra_float_digits`):
            // those are accepted, and change nothing (the console answers in text whatever
            // they say). Any other setting is refused rather than seeming to take.
            ["SET", ..] if sets_a_driver_parameter(&up) => Command::Set,
            ["SET", ..] => {
                return Err(PgError::error(
                    SqlState::FEATURE_NOT_SUPPORTED,
                    "the pgcache admin console has no session settings",
                )
                .with_hint(format!("accepted and ignored: SET {}", DRIVER_PARAMETERS.join(" | "))));
            }
            ["RELOAD"] => Command::Reload,
            ["PAUSE"] => Command::Pause,
            ["RESUME"] => Command::Resume,
            _ => return Err(unknown(text.trim())),
        })
    }

    /// The columns of the command's answer (none: only a command tag).
    pub fn columns(&self) -> &'static [&'static str] {
        match self {
            Command::Show(show) => match show {
                Show::Stats => STATS,
                Show::Pools => POOLS,
                Show::Clients => CLIENTS,
                Show::Servers => SERVERS,
                Show::Cache => CACHE,
                Show::Rules => RULES,
                Show::Queries => advice::QUERIES,
                Show::Advice => advice::ADVICE,
                Show::Peers => PEERS,
                Show::Replicas => REPLICAS,
                Show::Config | Show::L2 => PAIRS,
            },
            Command::Explain { .. }
            | Command::InvalidateTable(_)
            | Command::InvalidateRule(_)
            | Command::InvalidateAll
            | Command::Reload
            | Command::Pause
            | Command::Resume => PAIRS,
            Command::Set | Command::Control(_) => &[],
        }
    }

    /// Whether the command changes something (and so may not run inside a transaction block).
    pub fn changes_something(&self) -> bool {
        matches!(
            self,
            Command::InvalidateTable(_)
                | Command::InvalidateRule(_)
                | Command::InvalidateAll
                | Command::Reload
                | Command::Pause
                | Command::Resume
        )
    }

    /// The name Postgres-style errors call the command by.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Explain { .. } => "EXPLAIN CACHE",
            Command::InvalidateTable(_) | Command::InvalidateRule(_) | Command::InvalidateAll => "INVALIDATE",
            Command::Set => "SET",
            Command::Reload => "RELOAD",
            Command::Pause => "PAUSE",
            Command::Resume => "RESUME",
            Command::Control(control) => control.name(),
        }
    }
}

/// Runs a parsed command. A transaction-control statement only answers its tag: the console
/// session keeps the block ([`super::console`]).
pub async fn run(ctx: &Arc<Context>, command: Command<'_>) -> Result<ResultSet, PgError> {
    Ok(match command {
        Command::Show(show) => match show {
            Show::Stats => show::stats(ctx),
            Show::Pools => show::pools(ctx),
            Show::Clients => show::clients(ctx),
            Show::Servers => show::servers(ctx),
            Show::Cache => show::cache(ctx),
            Show::Rules => show::rules(ctx),
            Show::Config => show::config(ctx),
            Show::Queries => advice::queries(ctx).await,
            Show::Advice => advice::advice(ctx).await,
            Show::Peers => show::peers(ctx),
            Show::L2 => show::l2(ctx),
            Show::Replicas => show::replicas(ctx),
        },
        Command::Explain { database, sql } => advice::explain(ctx, database, sql).await,
        Command::InvalidateTable(name) => {
            // (In the L2, by name in every database is not one version: everything moves.)
            if let Some(l2) = &ctx.l2 {
                l2.bump(&[crate::l2::Version::All]).await;
            }
            invalidate_table(ctx, name)?
        }
        Command::InvalidateRule(name) => invalidate_rule(ctx, name)?,
        Command::InvalidateAll => {
            ctx.generations.bump_all();
            if let Some(l2) = &ctx.l2 {
                l2.bump(&[crate::l2::Version::All]).await;
            }
            ctx.peers.publish_everywhere(&[], true);
            ctx.stats.all_invalidated();
            let n = ctx.store.remove_where(|_| true);
            ResultSet::pairs("INVALIDATE", vec![("entries_removed", n.to_string())])
        }
        Command::Set => ResultSet::new(&[], "SET"),
        Command::Reload => reload(ctx)?,
        Command::Pause => {
            ctx.pause(true);
            ResultSet::pairs("PAUSE", vec![("paused", "new backend work waits until RESUME".into())])
        }
        Command::Resume => {
            ctx.pause(false);
            ResultSet::pairs("RESUME", vec![("paused", "no".into())])
        }
        Command::Control(_) => ResultSet::new(&[], command.name()),
    })
}

fn invalidate_table(ctx: &Context, name: &str) -> Result<ResultSet, PgError> {
    let rel = crate::rules::load::parse_table(name)
        .map_err(|(_, m)| PgError::error(SqlState::SYNTAX_ERROR, format!("INVALIDATE TABLE: {m}")))?;
    match &rel.schema {
        Some(_) => ctx.generations.bump_relations(std::slice::from_ref(&rel)),
        None => ctx.generations.bump_name(&rel.name),
    }
    ctx.peers.publish_everywhere(std::slice::from_ref(&rel.name), false);
    ctx.stats.table_written(&rel.name);
    let n = ctx.store.remove_where(|e| e.invalidated() || e.tables.iter().any(|t| covers(&rel, t)));
    Ok(ResultSet::pairs("INVALIDATE", vec![("table", rel.to_string()), ("entries_removed", n.to_string())]))
}

/// Whether `wanted` (as the operator wrote it) names `read` (as an entry resolved it).
fn covers(wanted: &Relation, read: &Relation) -> bool {
    wanted.name == read.name && (wanted.schema.is_none() || read.schema.is_none() || wanted.schema == read.schema)
}

fn invalidate_rule(ctx: &Context, name: &str) -> Result<ResultSet, PgError> {
    let name = name.trim_matches('"');
    let n = ctx.store.remove_where(|e| e.rule.name == name);
    if n == 0 && ctx.rules.current().get(name).is_none() {
        return Err(PgError::error(SqlState::UNDEFINED_OBJECT, format!("no rule named {name:?}")));
    }
    Ok(ResultSet::pairs("INVALIDATE", vec![("rule", name.to_owned()), ("entries_removed", n.to_string())]))
}

fn reload(ctx: &Context) -> Result<ResultSet, PgError> {
    match ctx.reload() {
        Ok(restart) => {
            let mut pairs = vec![("rules", ctx.rules.current().rules.len().to_string())];
            pairs.push(("needs_restart", if restart.is_empty() { "none".into() } else { restart.join(", ") }));
            Ok(ResultSet::pairs("RELOAD", pairs))
        }
        Err(e) => Err(PgError::error(SqlState::CONFIG_FILE_ERROR, format!("reload failed: {e}"))),
    }
}
