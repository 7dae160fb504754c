//! The query advisor: what the workload does and what to cache next.
//!
//! `SHOW QUERIES` lists every normalized query with its calls, time, rows and outcomes, the
//! rule that matched or why it cannot be cached, the tables it reads and how often they were
//! written, and an estimated hit ratio for a candidate TTL (the matching rule's, else 60 s),
//! from its call rate, its number of distinct keys and its tables' write rate
//! ([`estimated_hit_ratio`]) — for a read by primary key, the rate of the writes that would
//! reach its entries ([`effective_writes`]). `SHOW ADVICE` turns the best uncached candidates
//! — those a rule would make cached ([`Judge::judge`]) — into rule TOML to paste into a rule file.
//! `EXPLAIN CACHE <select>` shows how one statement would be handled and what the cache holds
//! for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::Freshness;
use crate::context::Context;
use crate::policy::{self, Assessed, Reason, SearchPath, Target};
use crate::query::Relation;
use crate::query::catalog::Defaults;
use crate::rules::{Action, Rule};
use crate::stats::{QueryStat, TableWrites, estimated_hit_ratio};

use super::table::ResultSet;

/// The TTL the advisor proposes when no rule gives one.
pub const CANDIDATE_TTL: Duration = Duration::from_secs(60);

/// Reasons that only say "no rule" (the statement itself could be cached).
fn only_lacks_a_rule(q: &QueryStat) -> bool {
    q.reason.as_ref().is_some_and(Reason::only_lacks_a_rule)
}

/// What one `SHOW QUERIES` or `SHOW ADVICE` judges queries under: the catalog, and each
/// database's default user and `search_path`, looked up once per database.
struct Judge<'c> {
    ctx: &'c Context,
    /// `None`: the database's catalog cannot be read now.
    defaults: HashMap<Arc<str>, Option<Arc<Defaults>>>,
}

impl<'c> Judge<'c> {
    fn new(ctx: &'c Context) -> Self {
        Judge { ctx, defaults: HashMap::new() }
    }

    /// What a catch-all rule of the candidate TTL would make of `q`, when it only lacks a rule,
    /// as [`policy::assess`] finds it in the database it last ran in (as its default user):
    /// whether it would be cached, and which of the rule's opt-ins that takes. Reads that no
    /// rule matches are forwarded before what they call or read is looked at, so their own
    /// reason does not say. A read that calls a stable function (`now()`) or reads a table
    /// with row security is judged again under a rule that opts in (`allow_stable_functions`,
    /// `allow_row_security`): the draft says so, and the operator decides. (It is judged as its
    /// normalized text, literals replaced: a time word among them, `'today'::date`, is not
    /// seen here.) Anything else (a volatile function such as `nextval`, a volatile type, a
    /// table the catalog says never to cache) blocks it. A database whose catalog cannot be
    /// read is not judged (once per command: its queries are taken to be cacheable by a plain
    /// rule).
    async fn judge(&mut self, q: &QueryStat) -> Judged {
        let ctx = self.ctx;
        if !self.defaults.contains_key(&q.database) {
            let defaults = ctx.catalog.defaults(&q.database).await.ok();
            self.defaults.insert(q.database.clone(), defaults);
        }
        let Some(defaults) = self.defaults.get(&q.database).cloned().flatten() else { return Judged::default() };
        let classified = ctx.classifier.classify(&q.normalized);
        let [c] = classified.as_slice() else { return Judged::blocked(Reason::SeveralStatements) };
        let target = Target { sql: &q.normalized, statement: c, database: &q.database, user: &defaults.user };
        let path = SearchPath { role: &defaults.user, search_path: &defaults.search_path };
        let mut judged = Judged::default();
        // Each opt-in at most once: three verdicts at most.
        loop {
            let mut candidate = Rule::cache("candidate", CANDIDATE_TTL);
            candidate.allow_stable_functions = judged.stable.is_some();
            candidate.allow_row_security = judged.row_security;
            let candidate = crate::rules::RuleSet::new(vec![Arc::new(candidate)], 0);
            match policy::assess(&ctx.catalog, &candidate, &target, Some(path)).await {
                Assessed::Forward(Reason::CatalogUnavailable(_)) => {
                    self.defaults.insert(q.database.clone(), None);
                    return Judged::default();
                }
                Assessed::Forward(why @ (Reason::StableFunction | Reason::StableBuiltins | Reason::StableType(_)))
                    if judged.stable.is_none() =>
                {
                    judged.stable = Some(why);
                }
                Assessed::Forward(Reason::RowSecurity) if !judged.row_security => judged.row_security = true,
                Assessed::Forward(why) => return Judged::blocked(why),
                Assessed::Cacheable(_) | Assessed::NeedsSearchPath => return judged,
            }
        }
    }
}

/// What a rule would make of a query that lacks one ([`Judge::judge`]).
#[derive(Debug, Default)]
struct Judged {
    /// Why no rule would cache it.
    blocker: Option<Reason>,
    /// A rule caches it only if it sets `allow_stable_functions`, for this reason (it calls
    /// a stable function, depends on the time or the session, or evaluates a stable type).
    stable: Option<Reason>,
    /// ... only if it sets `allow_row_security` (it reads a table with row security).
    row_security: bool,
}

impl Judged {
    fn blocked(why: Reason) -> Judged {
        Judged { blocker: Some(why), ..Judged::default() }
    }

    /// The opt-ins a rule needs, as rule-file keys.
    fn opt_ins(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.stable.is_some() {
            out.push("allow_stable_functions");
        }
        if self.row_security {
            out.push("allow_row_security");
        }
        out
    }
}

/// The table `q` reads by its primary key, if it is such a point read (one plain table with a
/// single-column key that its `WHERE` pins; [`policy::keyed`]): writes pinned to other keys
/// leave its entries alone. Judged in the database it last ran in.
async fn keyed_table(ctx: &Context, q: &QueryStat) -> Option<String> {
    if !ctx.config().cache.invalidate_by_key || q.tables.len() != 1 {
        return None;
    }
    let classified = ctx.classifier.classify(&q.normalized);
    let [c] = classified.as_slice() else { return None };
    let infos = ctx.catalog.relations(&q.database, &c.reads).await.ok()?;
    let [info] = infos.as_slice() else { return None };
    policy::keyed(c, info).map(|k| k.relation.name)
}

/// A table's name without its schema: writes are counted by name, in any schema.
fn table_name(qualified: &str) -> &str {
    qualified.rsplit('.').next().unwrap_or(qualified)
}

/// The writes that invalidate one of `q`'s entries: every write to its tables, except that on
/// the table it reads by key (`keyed`) a write pinned to keys counts for the share of keys it
/// touched — keys taken as spread evenly over those read and written.
fn effective_writes(q: &QueryStat, writes: &HashMap<String, TableWrites>, keyed: Option<&str>) -> f64 {
    let per_table = |t: &String| {
        let name = table_name(t);
        let Some(w) = writes.get(name) else { return 0.0 };
        if keyed != Some(name) {
            return w.all as f64;
        }
        let spread = w.keys.estimate().max(q.keys.estimate()).max(1) as f64;
        w.all.saturating_sub(w.keyed) as f64 + w.keyed as f64 / spread
    };
    q.tables.iter().map(per_table).sum()
}

/// How many entries the cache holds at most, at the mean size of those it holds now (not known
/// while it holds none).
fn room(ctx: &Context) -> Option<u64> {
    let (entries, bytes) = (ctx.store.len() as u64, ctx.store.bytes());
    (entries > 0 && bytes > 0).then(|| ctx.store.capacity().saturating_mul(entries) / bytes)
}

struct Estimate<'a> {
    q: &'a QueryStat,
    /// Every write seen to its tables.
    writes: u64,
    /// It reads one table by key: writes to other keys do not count against it.
    by_key: bool,
    ttl: Duration,
    estimate: Option<f64>,
    /// What a rule would make of it, when it lacks one ([`Judge::judge`]).
    judged: Judged,
}

async fn assess<'a>(judge: &mut Judge<'_>, q: &'a QueryStat, writes: &HashMap<String, TableWrites>) -> Estimate<'a> {
    let ctx = judge.ctx;
    let rules = ctx.rules.current();
    let rule_ttl =
        q.rule.as_ref().and_then(|r| rules.get(&r.name)).filter(|r| r.action == Action::Cache).map(|r| r.ttl);
    let ttl = rule_ttl.unwrap_or(CANDIDATE_TTL);
    let total_writes = q.tables.iter().filter_map(|t| writes.get(table_name(t))).map(|w| w.all).sum();
    let judged = if only_lacks_a_rule(q) { judge.judge(q).await } else { Judged::default() };
    let cacheable = q.hits + q.misses > 0 || (only_lacks_a_rule(q) && judged.blocker.is_none());
    let keyed = if cacheable { keyed_table(ctx, q).await } else { None };
    let effective = effective_writes(q, writes, keyed.as_deref());
    let uptime = ctx.stats.uptime().max(Duration::from_secs(1));
    let period = q.first_seen.elapsed().max(Duration::from_secs(1));
    // Writes were counted since start; the query has been seen for `period`.
    let scaled = (effective * period.as_secs_f64() / uptime.as_secs_f64()).round() as u64;
    // (No key counted: none of its reads was decided, so there is nothing to go on.)
    let distinct = q.keys.estimate() as u64;
    let estimate = (cacheable && distinct > 0)
        .then(|| estimated_hit_ratio(q.keyed_calls, distinct, scaled, period, ttl, room(ctx)));
    Estimate { q, writes: total_writes, by_key: keyed.is_some(), ttl, estimate, judged }
}

/// The columns of `SHOW QUERIES`.
pub const QUERIES: &[&str] = &[
    "query",
    "calls",
    "total_ms",
    "mean_ms",
    "rows",
    "hits",
    "misses",
    "passthrough",
    "errors",
    "rule",
    "cacheable",
    "tables",
    "table_writes",
    "distinct_keys",
    "candidate_ttl",
    "est_hit_ratio",
];

/// The column of `SHOW ADVICE`.
pub const ADVICE: &[&str] = &["advice"];

pub async fn queries(ctx: &Context) -> ResultSet {
    let writes = ctx.stats.table_writes();
    let mut judge = Judge::new(ctx);
    let mut r = ResultSet::new(QUERIES, "SHOW");
    for q in ctx.stats.queries() {
        let a = assess(&mut judge, &q, &writes).await;
        let total_ms = q.total.as_secs_f64() * 1000.0;
        let opt_ins = a.judged.opt_ins();
        r.rows.push(vec![
            Some(q.normalized.to_string()),
            Some(q.calls.to_string()),
            Some(format!("{total_ms:.3}")),
            Some(format!("{:.3}", total_ms / q.calls.max(1) as f64)),
            Some(q.rows.to_string()),
            Some(q.hits.to_string()),
            Some(q.misses.to_string()),
            Some(q.passthrough.to_string()),
            Some(q.errors.to_string()),
            q.rule.as_ref().map(|r| r.name.clone()),
            Some(match (&q.reason, &a.judged.blocker) {
                _ if q.hits + q.misses > 0 && q.passthrough == 0 => "yes".to_owned(),
                (Some(reason), Some(blocker)) => format!("{reason}; with a rule: {blocker}"),
                (Some(reason), None) if !opt_ins.is_empty() => {
                    format!("{reason}; would be cached by a rule that sets {}", opt_ins.join(" and "))
                }
                (Some(reason), None) => reason.to_string(),
                // (A blocker is looked for only when a reason says a rule is lacking.)
                (None, _) => "yes".to_owned(),
            }),
            Some(q.tables.join(",")),
            Some(a.writes.to_string()),
            Some(q.keys.estimate().to_string()),
            Some(humantime::format_duration(a.ttl).to_string()),
            a.estimate.map(|e| format!("{e:.3}")),
        ]);
    }
    r
}

/// Draft rules for the uncached queries that would gain most, as TOML lines.
pub async fn advice(ctx: &Context) -> ResultSet {
    let writes = ctx.stats.table_writes();
    let all = ctx.stats.queries();
    let mut judge = Judge::new(ctx);
    let (mut candidates, mut blocked): (Vec<Estimate<'_>>, usize) = (Vec::new(), 0);
    for q in all.iter().filter(|q| only_lacks_a_rule(q) && q.calls >= 2) {
        let a = assess(&mut judge, q, &writes).await;
        blocked += usize::from(a.judged.blocker.is_some());
        if a.estimate.is_some_and(|e| e >= 0.3) {
            candidates.push(a);
        }
    }
    candidates.sort_by(|a, b| {
        let gain = |x: &Estimate<'_>| x.estimate.unwrap_or(0.0) * x.q.total.as_secs_f64();
        gain(b).total_cmp(&gain(a))
    });
    let mut r = ResultSet::new(ADVICE, "SHOW");
    if candidates.is_empty() {
        r.row(["# No candidates yet: run the workload through pgcache, then ask again.".to_owned()]);
    }
    if blocked > 0 {
        r.row([format!(
            "# {blocked} queries run more than once are not drafted: no rule would cache them as written (SHOW QUERIES, column cacheable, says why)."
        )]);
    }
    if candidates.is_empty() {
        return r;
    }
    r.row(["# Draft rules from observed traffic; review, then paste into a rule file.".to_owned()]);
    for (i, a) in candidates.iter().take(10).enumerate() {
        let q = a.q;
        let mean_ms = q.total.as_secs_f64() * 1000.0 / q.calls.max(1) as f64;
        r.row([String::new()]);
        r.row([format!(
            "# {} calls, {mean_ms:.2} ms mean, {} distinct keys, est. hit ratio {:.2} with ttl {}; reads {}; {} writes seen{}",
            q.calls,
            q.keys.estimate(),
            a.estimate.unwrap_or(0.0),
            humantime::format_duration(a.ttl),
            if q.tables.is_empty() { "no tables".to_owned() } else { q.tables.join(", ") },
            a.writes,
            if a.by_key { " (invalidated by key: writes to other keys leave it)" } else { "" }
        )]);
        r.row(["[[rule]]".to_owned()]);
        let base = q.tables.first().map(|t| t.replace('.', "-")).unwrap_or_else(|| "query".into());
        r.row([format!("name = {}", toml::Value::String(format!("advice-{}-{base}", i + 1)))]);
        r.row([format!("match = {{ query = {} }}", toml::Value::String(q.normalized.to_string()))]);
        r.row([format!("ttl = \"{}\"", humantime::format_duration(a.ttl))]);
        if let Some(why) = &a.judged.stable {
            r.row([format!(
                "# Cached only with this opt-in, as it {why}: entries keep what that gave when they were filled, for up to the TTL."
            )]);
            r.row(["allow_stable_functions = true".to_owned()]);
        }
        if a.judged.row_security {
            // Left for the operator to turn on: a policy's own reads are not watched.
            r.row(["# It reads a table with row-level security. Cached only with the opt-in below (entries kept per role and".to_owned()]);
            r.row(["# settings); what a policy reads besides the table (other tables, functions) is not watched, so a change".to_owned()]);
            r.row(["# there shows only after the TTL. Uncomment if that is acceptable.".to_owned()]);
            r.row(["# allow_row_security = true".to_owned()]);
        }
    }
    r
}

/// How one statement would be handled by a fresh session in `database` (default: the upstream
/// URL's), logged in as the catalog's user, with that user's default `search_path`: the same
/// [`policy::assess`] the data path runs.
pub async fn explain(ctx: &Arc<Context>, database: Option<&str>, sql: &str) -> ResultSet {
    let config = ctx.config();
    let database = database.map_or_else(|| config.upstream.dbname.clone(), str::to_owned);
    let classified = ctx.classifier.classify(sql);
    let mut out: Vec<(&str, String)> = Vec::new();
    let [c] = classified.as_slice() else {
        out.push(("cacheable", format!("no: {}", Reason::SeveralStatements)));
        return ResultSet::pairs("EXPLAIN", out);
    };
    out.push(("statement", c.normalized.to_string()));
    out.push(("kind", format!("{:?}", c.kind)));
    out.push(("reads", c.reads.iter().map(Relation::to_string).collect::<Vec<_>>().join(", ")));
    out.push(("functions", c.functions.iter().map(Relation::to_string).collect::<Vec<_>>().join(", ")));
    out.push(("types", c.types.iter().map(Relation::to_string).collect::<Vec<_>>().join(", ")));
    let defaults = ctx.catalog.defaults(&database).await;
    let (user, search_path) = match &defaults {
        Ok(d) => (d.user.clone(), d.search_path.clone()),
        Err(_) => (config.upstream.user.clone(), "\"$user\", public".to_owned()),
    };
    out.push(("evaluated_for", format!("database {database}, user {user}, search_path {search_path}")));
    let rules = ctx.rules.current();
    let target = Target { sql, statement: c, database: &database, user: &user };
    let path = SearchPath { role: &user, search_path: &search_path };
    let verdict = match policy::assess(&ctx.catalog, &rules, &target, Some(path)).await {
        Assessed::Cacheable(a) => {
            describe_rule(&mut out, &a.rule);
            out.push(("tables_watched", a.deps.iter().map(Relation::to_string).collect::<Vec<_>>().join(", ")));
            if let Some(k) = a.keyed.as_ref().filter(|_| config.cache.invalidate_by_key) {
                let how = format!(
                    "by key: writes to {} pinned to other values of {} leave it (any other write to it clears it)",
                    k.relation, k.column
                );
                out.push(("invalidated", how));
            }
            if a.row_security {
                out.push(("row_security", "yes: keyed by role and every setting, custom ones included".into()));
            }
            "yes".to_owned()
        }
        Assessed::Forward(why) => {
            // The rule that matched, if the reason came after matching.
            let resolved = ctx.catalog.relations(&database, &c.reads).await.ok().map(|infos| {
                c.reads
                    .iter()
                    .zip(&infos)
                    .map(|(r, i)| match (&r.schema, policy::resolve(&user, &search_path, &i.schemas)) {
                        (None, Some(s)) => Relation::new(Some(s), &r.name),
                        _ => r.clone(),
                    })
                    .collect::<Vec<_>>()
            });
            let subject = crate::rules::Subject {
                sql,
                statement: c,
                resolved_reads: resolved.as_deref().unwrap_or(&c.reads),
                database: &database,
                user: &user,
            };
            match rules.decide(&subject) {
                Some(rule) => describe_rule(&mut out, &rule),
                None => out.push(("rule", "none matches".into())),
            }
            format!("no: {why}")
        }
        Assessed::NeedsSearchPath => "no: session settings unknown".to_owned(),
    };
    out.push(("cacheable", verdict));
    out.push((
        "key_parts",
        "protocol, database, role (unless ctx across roles and no row-level security), every setting the session \
         changed from its default (SET, SET LOCAL, set_config, startup options, custom settings such as app.tenant), \
         search_path, SQL text, parameter types/values/formats, result formats"
            .into(),
    ));
    let entries: Vec<_> = ctx.store.entries().into_iter().filter(|(_, e)| &*e.sql == sql.trim()).collect();
    out.push(("entries", entries.len().to_string()));
    for (_, e) in entries.iter().take(10) {
        let state = match e.freshness() {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale (serving while revalidating)",
            Freshness::Fallback => "expired (served only if Postgres is unreachable)",
            Freshness::Dead => "dead",
        };
        out.push((
            "entry",
            format!(
                "age {:.1}s, {state}, {} rows, {} bytes, {} hits, rule {}",
                e.age().as_secs_f64(),
                e.rows,
                e.weight(),
                e.hits.load(std::sync::atomic::Ordering::Relaxed),
                e.rule.name
            ),
        ));
    }
    ResultSet::pairs("EXPLAIN", out)
}

fn describe_rule(out: &mut Vec<(&str, String)>, r: &crate::rules::Rule) {
    out.push(("rule", format!("{} ({}:{})", r.name, r.file.display(), r.line)));
    out.push(("action", (if r.action == Action::Cache { "cache" } else { "bypass" }).into()));
    out.push(("ttl", humantime::format_duration(r.ttl).to_string()));
    out.push(("stale_while_revalidate", humantime::format_duration(r.stale_while_revalidate).to_string()));
    out.push(("stale_if_error", humantime::format_duration(r.stale_if_error).to_string()));
}
