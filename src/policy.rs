//! Whether a SELECT may be answered from the cache: the one decision that the session's data
//! path, `EXPLAIN CACHE` and `SHOW QUERIES` share, so they cannot drift apart.
//!
//! [`assess`] is the part that does not depend on a session: a rule must match and say `cache`;
//! the statement must be cacheable by itself (a single plain SELECT, no locks, no temporary,
//! system or foreign relations); everything it evaluates — functions, type input and cast
//! functions, views — must be IMMUTABLE per the catalog (STABLE only if the rule allows it);
//! tables with row-level security only if the rule opts in. Rules that name schema-qualified
//! tables match after unqualified names are resolved through a `search_path`: the session's,
//! or a fresh session's for `EXPLAIN CACHE`. The session adds its own conditions (transaction
//! state, settings, parameters) in `session::decide`. Every "no" is a typed [`Reason`].
//!
//! Pure: it reads rules and catalog facts handed to it and returns a decision; it does no I/O
//! and holds no state.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::query::catalog::{Catalog, RelationInfo, Volatility};
use crate::query::{Classified, Relation, point};
use crate::rules::{Action, Rule, RuleSet, Subject};

/// Why a statement is not answered from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    NoRules,
    NoMatch,
    /// The first matching rule says `bypass`.
    Bypassed(String),
    /// The statement itself can never be cached (not a plain SELECT, locks rows, ...).
    Statement(&'static str),
    SeveralStatements,
    /// It calls a volatile user function, which may write.
    MayWrite,
    /// What the catalog says about a relation it reads (temporary, foreign, unknown, a view
    /// over such).
    Relation(String),
    CatalogUnavailable(String),
    VolatileFunction,
    StableFunction,
    /// SQL-value functions, time words, or a view over stable functions.
    StableBuiltins,
    /// A type whose input, output or cast functions are volatile.
    VolatileType(String),
    /// A type whose input, output or cast functions read the catalog or the session.
    StableType(String),
    RowSecurity,
    /// Custom settings were set under names pgcache cannot read, and the result may depend
    /// on them.
    CustomSettingsUnknown,
    TransactionWrote,
    TransactionFailed,
    Isolation,
    SettingsUnknown,
    /// The session holds something private (temporary objects).
    Session(&'static str),
    /// Extended-protocol messages sent before it still await their Sync: Postgres may be
    /// skipping to it, so pgcache sends nothing of its own.
    Unsynced,
    /// The rule shares entries across roles, and this role may not read every relation the
    /// statement reads (or that could not be checked): Postgres must answer it.
    NoPrivilege,
    /// An earlier request of a transaction block (or one that begins one) is still running: it
    /// may fail the transaction, after which Postgres would refuse this one.
    InFlight,
    TimeWordParameter,
    RowLimit,
    PortalReused,
    /// A portal pgcache did not see bound, or an extended-protocol batch it could not read.
    Unreadable,
    /// This instance is not listening for the other instances' invalidations of the database
    /// (starting, reconnecting): it could miss one, so it does not use the cache.
    PeersNotListening,
    /// Answered by a replica that had not replayed the last invalidation this instance knows
    /// of: served, not stored.
    ReplicaBehind,
    /// The rule's entries are seldom read again, and this key was not missed recently
    /// ([`crate::cache::admission`]): forwarded, stored if missed again soon.
    NotAdmitted,
}

impl Reason {
    /// Whether the only obstacle is that no rule asks for it (the statement could be cached).
    pub fn only_lacks_a_rule(&self) -> bool {
        matches!(self, Reason::NoRules | Reason::NoMatch)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NoRules => f.write_str("no rules loaded"),
            Reason::NoMatch => f.write_str("no rule matches"),
            Reason::Bypassed(rule) => write!(f, "rule {rule:?} bypasses the cache"),
            Reason::Statement(why) => f.write_str(why),
            Reason::SeveralStatements => f.write_str("several statements in one query"),
            Reason::MayWrite => f.write_str("may write (calls a volatile user function)"),
            Reason::Relation(why) => f.write_str(why),
            Reason::CatalogUnavailable(e) => write!(f, "catalog unavailable: {e}"),
            Reason::VolatileFunction => f.write_str("calls a volatile function"),
            Reason::StableFunction => f.write_str("calls a stable function"),
            Reason::StableBuiltins => f.write_str("depends on the time or the session (stable functions)"),
            Reason::VolatileType(t) => write!(f, "evaluates type {t}, whose input, output or casts are volatile"),
            Reason::StableType(t) => {
                write!(f, "evaluates type {t}, whose input, output or casts read the catalog (stable)")
            }
            Reason::RowSecurity => {
                f.write_str("reads a table with row-level security (the rule does not set allow_row_security)")
            }
            Reason::CustomSettingsUnknown => f.write_str(
                "custom settings were changed by something pgcache cannot see into, and the result may depend on them",
            ),
            Reason::TransactionWrote => f.write_str("the transaction has written"),
            Reason::TransactionFailed => f.write_str("the transaction has failed"),
            Reason::Isolation => f.write_str("isolation level above READ COMMITTED"),
            Reason::SettingsUnknown => f.write_str("session settings unknown"),
            Reason::Session(why) => f.write_str(why),
            Reason::Unsynced => f.write_str("earlier extended-protocol messages still await their Sync"),
            Reason::InFlight => f.write_str("an earlier request of its transaction is still running"),
            Reason::NoPrivilege => f.write_str("shared across roles, and this role may not read what it reads"),
            Reason::TimeWordParameter => f.write_str("a parameter value depends on the time ('now', 'today', ...)"),
            Reason::RowLimit => f.write_str("executed with a row limit"),
            Reason::PortalReused => f.write_str("its portal is used again in the same batch"),
            Reason::Unreadable => f.write_str("part of a request pgcache could not follow"),
            Reason::NotAdmitted => f.write_str(
                "not stored: the rule's entries are seldom read again, and this key was not missed recently (admission)",
            ),
            Reason::ReplicaBehind => {
                f.write_str("answered by a replica that had not replayed the last invalidation (served, not stored)")
            }
            Reason::PeersNotListening => {
                f.write_str("not listening for other instances' invalidations of this database (reconnecting)")
            }
        }
    }
}

/// A statement to decide on, and whose it is.
pub struct Target<'a> {
    pub sql: &'a str,
    pub statement: &'a Classified,
    pub database: &'a str,
    pub user: &'a str,
}

/// How unqualified relation names resolve: a role and its `search_path`.
#[derive(Debug, Clone, Copy)]
pub struct SearchPath<'a> {
    pub role: &'a str,
    pub search_path: &'a str,
}

/// A statement the rules and the catalog allow to be cached.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub rule: Arc<Rule>,
    /// The relations read, schema-qualified where the search path resolved them.
    pub resolved: Vec<Relation>,
    /// Every relation whose writes change what the read returns (views expanded, partitions
    /// and parents included).
    pub deps: Vec<Relation>,
    /// It reads a table with row-level security (the rule allows it): keyed by role always.
    pub row_security: bool,
    /// Its result may depend on custom settings (row-level security or stable functions).
    pub reads_custom_settings: bool,
    /// It reads only the rows of one table whose primary key is pinned to values (see
    /// [`crate::query::point`]; the values are each execution's own): its entry is
    /// invalidated by writes to those keys only.
    pub keyed: Option<KeyedRead>,
}

/// A read pinned to primary-key values of its one table.
#[derive(Debug, Clone)]
pub struct KeyedRead {
    pub relation: Relation,
    /// Its primary-key column, which the statement's point pins, and the column's type.
    pub column: String,
    pub kind: point::KeyType,
}

/// Whether `c` pins the key of the one table it reads (described by `info`).
pub fn keyed(c: &Classified, info: &RelationInfo) -> Option<KeyedRead> {
    let key = info.point_key.as_ref()?;
    c.point.as_ref()?.values(&key.column)?;
    match info.read_deps.as_slice() {
        [relation] => Some(KeyedRead { relation: relation.clone(), column: key.column.clone(), kind: key.kind }),
        _ => None,
    }
}

/// The outcome of [`assess`].
#[derive(Debug, Clone)]
pub enum Assessed {
    Cacheable(Assessment),
    Forward(Reason),
    /// Rules match on schema-qualified names: the search path is needed first.
    NeedsSearchPath,
}

/// The rule that decides `subject`, or why none lets it be cached.
fn choose(rules: &RuleSet, subject: &Subject<'_>) -> Result<Arc<Rule>, Reason> {
    match rules.decide(subject) {
        None => Err(Reason::NoMatch),
        Some(rule) if rule.action == Action::Bypass => Err(Reason::Bypassed(rule.name.clone())),
        Some(rule) => Ok(rule),
    }
}

/// Whether the statement may be cached as far as the rules and the catalog go. `path` resolves
/// unqualified names; without it, statements that need resolution get
/// [`Assessed::NeedsSearchPath`] (statements no rule can match never do).
pub async fn assess(catalog: &Catalog, rules: &RuleSet, t: &Target<'_>, path: Option<SearchPath<'_>>) -> Assessed {
    match assess_inner(catalog, rules, t, path).await {
        Ok(Some(a)) => Assessed::Cacheable(a),
        Ok(None) => Assessed::NeedsSearchPath,
        Err(reason) => Assessed::Forward(reason),
    }
}

async fn assess_inner(
    catalog: &Catalog,
    rules: &RuleSet,
    t: &Target<'_>,
    path: Option<SearchPath<'_>>,
) -> Result<Option<Assessment>, Reason> {
    let c = t.statement;
    if rules.rules.is_empty() {
        return Err(Reason::NoRules);
    }
    if let Some(why) = c.never_cache {
        return Err(Reason::Statement(why));
    }
    let subject =
        |resolved_reads| Subject { sql: t.sql, statement: c, resolved_reads, database: t.database, user: t.user };
    // Match on names as written first when no rule needs schemas: statements no rule matches
    // then cost neither a catalog look-up nor a settings probe.
    let early = if rules.needs_resolution() { None } else { Some(choose(rules, &subject(&c.reads))?) };
    let unavailable = |e: crate::query::catalog::CatalogError| Reason::CatalogUnavailable(e.to_string());
    let infos = catalog.relations(t.database, &c.reads).await.map_err(unavailable)?;
    if let Some(why) = infos.iter().find_map(|i| i.never_cache.clone()) {
        return Err(Reason::Relation(why));
    }
    let resolved: Vec<Relation> = match path {
        Some(p) => c
            .reads
            .iter()
            .zip(&infos)
            .map(|(r, info)| match (&r.schema, resolve(p.role, p.search_path, &info.schemas)) {
                (None, Some(schema)) => Relation::new(Some(schema), &r.name),
                _ => r.clone(),
            })
            .collect(),
        None if early.is_none() => return Ok(None),
        None => c.reads.clone(),
    };
    let rule = match early {
        Some(rule) => rule,
        None => choose(rules, &subject(&resolved))?,
    };
    let functions = catalog.functions(t.database, &c.functions).await.map_err(unavailable)?;
    let operators = catalog.operators(t.database, &c.operators).await.map_err(unavailable)?;
    let mut stable = false;
    match functions.iter().chain(&operators).map(|f| f.volatility).max() {
        Some(Volatility::Volatile) => return Err(Reason::VolatileFunction),
        Some(Volatility::Stable) if !rule.allow_stable_functions => return Err(Reason::StableFunction),
        Some(Volatility::Stable) => stable = true,
        _ => {}
    }
    let types = catalog.types(t.database, &c.types).await.map_err(unavailable)?;
    for (name, v) in c.types.iter().zip(types) {
        match v {
            Volatility::Volatile => return Err(Reason::VolatileType(name.to_string())),
            Volatility::Stable if !rule.allow_stable_functions => return Err(Reason::StableType(name.to_string())),
            Volatility::Stable => stable = true,
            Volatility::Immutable => {}
        }
    }
    if (c.stable_builtins || infos.iter().any(|i| i.stable)) && !rule.allow_stable_functions {
        return Err(Reason::StableBuiltins);
    }
    stable |= c.stable_builtins || infos.iter().any(|i| i.stable);
    let row_security = infos.iter().any(|i| i.row_security);
    if row_security && !rule.allow_row_security {
        return Err(Reason::RowSecurity);
    }
    let keyed = match infos.as_slice() {
        [info] => keyed(c, info),
        _ => None,
    };
    Ok(Some(Assessment {
        keyed,
        deps: read_deps(&infos),
        resolved,
        row_security,
        reads_custom_settings: row_security || stable,
        rule,
    }))
}

/// Every qualified relation whose writes change what the reads described by `infos` return.
fn read_deps(infos: &[Arc<RelationInfo>]) -> Vec<Relation> {
    let deps: BTreeSet<Relation> = infos.iter().flat_map(|i| i.read_deps.iter().cloned()).collect();
    deps.into_iter().collect()
}

/// Resolves an unqualified relation to the first schema of `search_path` (as `role` sees it)
/// that holds one of `candidates` (`pg_temp` and `pg_catalog` first unless listed, as Postgres
/// does).
pub fn resolve<'a>(role: &str, search_path: &str, candidates: &'a [String]) -> Option<&'a str> {
    let listed: Vec<String> = search_path
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .map(|s| if s == "$user" { role.to_owned() } else { s })
        .collect();
    let mut order: Vec<String> = Vec::new();
    if !listed.iter().any(|s| s == "pg_temp") {
        order.push("pg_temp".into());
    }
    if !listed.iter().any(|s| s == "pg_catalog") {
        order.push("pg_catalog".into());
    }
    order.extend(listed);
    order.iter().find_map(|schema| {
        candidates
            .iter()
            .find(|c| *c == schema || (schema == "pg_temp" && c.starts_with("pg_temp_")))
            .map(String::as_str)
    })
}
