//! Whether a SELECT is answered from the cache, filled into it, or just forwarded — the same
//! decision for the simple and the extended protocol.
//!
//! In order: a rule must match and say `cache`; the statement must be cacheable by itself (no
//! locks, temporary or system relations, volatile functions, stable ones unless the rule
//! allows them); the session must be able to use the cache (no write in its transaction, no
//! isolation above READ COMMITTED, settings known — probed if not); then the key is built and
//! looked up. A miss joins the single flight for its key and takes a snapshot of the
//! generations it depends on before its query is sent.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use crate::cache::flight::Turn;
use crate::cache::key::KeyBuilder;
use crate::cache::{Entry, Freshness, Key};
use crate::protocol::backend::TransactionStatus;
use crate::protocol::frontend::Bind;
use crate::query::catalog::{RelationInfo, Volatility};
use crate::query::classify::is_time_word;
use crate::query::{Classified, Relation};
use crate::rules::{Action, NO_MATCH, NO_RULES, Rule, RuleSet, Subject};
use crate::stats::{Observation, key_hash};

use super::SessionError;
use super::flow::Probe;
use super::pipeline::{Expect, Fill, Forwarded};
use super::refresh;
use super::relay::Relay;
use super::settings::probe_sql;

/// What to do with one SELECT.
pub(super) enum Plan {
    /// Answer from this entry (`key`: a hash of its key; `stale`: past its TTL).
    Hit { entry: Arc<Entry>, key: u64, stale: bool },
    /// Forward, and keep the answer.
    Fill(Box<Fill>),
    /// Forward only, for this reason.
    Forward(Cow<'static, str>),
}

/// The protocol-specific parts of a request.
pub(super) enum Request<'a> {
    Simple,
    Extended { param_types: &'a [u32], bind: &'a Bind<'a> },
}

fn forward(why: impl Into<Cow<'static, str>>) -> Result<Plan, SessionError> {
    Ok(Plan::Forward(why.into()))
}

impl Plan {
    /// Records in `o` what was decided.
    pub(super) fn observe(&self, o: &mut Observation) {
        match self {
            Plan::Hit { entry, key, stale } => o.hit(&entry.rule.name, *key, *stale, entry.rows),
            Plan::Fill(fill) => o.miss(&fill.rule.name, key_hash(&fill.key.0)),
            Plan::Forward(why) => {
                tracing::debug!(reason = %why, "forwarded, not cached");
                o.reason = Some(why.clone());
            }
        }
    }
}

/// The rule that decides `subject`, or why none lets it be cached.
fn choose(rules: &RuleSet, subject: &Subject<'_>) -> Result<Arc<Rule>, Cow<'static, str>> {
    match rules.decide(subject) {
        None => Err(NO_MATCH.into()),
        Some(rule) if rule.action == Action::Bypass => Err(format!("rule {:?} bypasses the cache", rule.name).into()),
        Some(rule) => Ok(rule),
    }
}

/// Every qualified relation whose writes change what the reads described by `infos` return.
fn read_deps(infos: &[Arc<RelationInfo>]) -> Vec<Relation> {
    let deps: BTreeSet<Relation> = infos.iter().flat_map(|i| i.read_deps.iter().cloned()).collect();
    deps.into_iter().collect()
}

impl Relay<'_> {
    pub(super) async fn decide(&mut self, sql: &str, c: &Classified, req: Request<'_>) -> Result<Plan, SessionError> {
        let shared = self.shared;
        let rules = shared.rules.current();
        if rules.rules.is_empty() {
            return forward(NO_RULES);
        }
        if let Some(why) = c.never_cache {
            return forward(why);
        }
        if let Some(why) = self.flow.taint {
            return forward(why);
        }
        if self.flow.wrote {
            return forward("the transaction has written");
        }
        if self.track.status == TransactionStatus::Failed {
            return forward("the transaction has failed");
        }
        let database = self.key.database.as_str();
        // Match on names as written first when no rule needs schemas: statements no rule
        // matches then cost neither a catalog look-up nor a settings probe.
        let subject = |resolved_reads| Subject { sql, statement: c, resolved_reads, database, user: &self.key.user };
        let early = if rules.needs_resolution() {
            None
        } else {
            match choose(&rules, &subject(&c.reads)) {
                Ok(rule) => Some(rule),
                Err(why) => return forward(why),
            }
        };
        let infos = match shared.catalog.relations(database, &c.reads).await {
            Ok(i) => i,
            Err(e) => return forward(format!("catalog unavailable: {e}")),
        };
        if let Some(why) = infos.iter().find_map(|i| i.never_cache.clone()) {
            return forward(why);
        }
        if !self.flow.settings.known() {
            self.probe().await?;
            if !self.flow.settings.known() {
                return forward("session settings unknown");
            }
        }
        if self.track.status == TransactionStatus::InBlock && !self.flow.settings.read_committed() {
            return forward("isolation level above READ COMMITTED");
        }
        let resolved: Vec<Relation> = c
            .reads
            .iter()
            .zip(&infos)
            .map(|(r, info)| match (&r.schema, self.flow.settings.resolve(&info.schemas)) {
                (None, Some(schema)) => Relation::new(Some(schema), &r.name),
                _ => r.clone(),
            })
            .collect();
        let rule = match early.map_or_else(|| choose(&rules, &subject(&resolved)), Ok) {
            Ok(rule) => rule,
            Err(why) => return forward(why),
        };
        if !c.functions.is_empty() {
            let functions = match shared.catalog.functions(database, &c.functions).await {
                Ok(f) => f,
                Err(e) => return forward(format!("catalog unavailable: {e}")),
            };
            match functions.iter().map(|f| f.volatility).max() {
                Some(Volatility::Volatile) => return forward("calls a volatile function"),
                Some(Volatility::Stable) if !rule.allow_stable_functions => return forward("calls a stable function"),
                _ => {}
            }
        }
        if (c.stable_builtins || infos.iter().any(|i| i.stable)) && !rule.allow_stable_functions {
            return forward("depends on the time or the session (stable functions)");
        }
        if let Request::Extended { bind, .. } = &req
            && has_time_word(bind)
        {
            return forward("a parameter value depends on the time ('now', 'today', ...)");
        }
        let key = cache_key(database, &self.flow.settings, self.params, rule.share_across_roles, sql, &req);

        let hash = key_hash(&key.0);
        match shared.store.get(&key) {
            Some((entry, Freshness::Fresh)) => return Ok(Plan::Hit { entry, key: hash, stale: false }),
            Some((entry, Freshness::Stale)) => {
                self.refresh_in_background(&key, &entry, sql, &req, read_deps(&infos));
                return Ok(Plan::Hit { entry, key: hash, stale: true });
            }
            _ => {}
        }
        let flight = match shared.flights.join(&key, shared.config().cache.single_flight_wait).await {
            Turn::Lead(f) => Some(f),
            Turn::Waited { .. } => {
                shared.stats.coalesced(&rule.name);
                if let Some((entry, f @ (Freshness::Fresh | Freshness::Stale))) = shared.store.get(&key) {
                    return Ok(Plan::Hit { entry, key: hash, stale: f == Freshness::Stale });
                }
                None
            }
        };
        let deps = shared.generations.snapshot(&read_deps(&infos));
        let limit = shared.config().cache.max_entry_bytes;
        Ok(Plan::Fill(Box::new(Fill::new(key, rule, deps, resolved, Arc::from(sql), flight, limit))))
    }

    /// Reads the session's unreported settings with one hidden query.
    async fn probe(&mut self) -> Result<(), SessionError> {
        self.flow.probe = Some(Probe::Running);
        self.flow.probe_row = None;
        let mut q = BytesMut::new();
        postgres_protocol::message::frontend::query(&probe_sql(), &mut q).map_err(SessionError::ClientIo)?;
        self.request(q.freeze(), Forwarded { probe: true, ..Forwarded::hidden(Expect::Query) });
        self.pump_until(|f| f.probe != Some(Probe::Running)).await
    }

    /// Stale-while-revalidate: the entry is served, and refreshed once in the background
    /// (unless a refresh is already running, or the session's settings cannot be reproduced).
    fn refresh_in_background(&self, key: &Key, entry: &Arc<Entry>, sql: &str, req: &Request<'_>, deps: Vec<Relation>) {
        let Some(settings) = self.flow.settings.replay(self.params, &self.key.user) else { return };
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let request = match req {
            Request::Simple => refresh::Request::Simple { sql: sql.to_owned() },
            Request::Extended { param_types, bind } => refresh::Request::Extended {
                sql: sql.to_owned(),
                param_types: param_types.to_vec(),
                param_formats: bind.param_formats.clone(),
                params: bind.params.iter().map(|p| p.map(Bytes::copy_from_slice)).collect(),
                result_formats: bind.result_formats.clone(),
            },
        };
        refresh::spawn(
            self.shared.clone(),
            refresh::Refresh {
                key: key.clone(),
                stale: entry.clone(),
                pool: self.key.clone(),
                startup: self.startup.clone(),
                settings,
                request,
                deps,
            },
        );
    }
}

/// The key of a request: protocol, database, every result-affecting setting (the role unless
/// shared across roles), the SQL text, and for the extended protocol the parameter types,
/// formats and values and the result formats.
pub(super) fn cache_key(
    database: &str,
    settings: &super::settings::Settings,
    reported: &std::collections::BTreeMap<String, String>,
    share_across_roles: bool,
    sql: &str,
    req: &Request<'_>,
) -> Key {
    let mut kb = KeyBuilder::new(match req {
        Request::Simple => b'Q',
        Request::Extended { .. } => b'E',
    });
    kb.str(database);
    settings.key(reported, share_across_roles, &mut kb);
    kb.str(sql);
    if let Request::Extended { param_types, bind } = req {
        kb.u32s(param_types).i16s(&bind.param_formats);
        for p in &bind.params {
            kb.part(*p);
        }
        kb.i16s(&bind.result_formats);
    }
    kb.finish()
}

/// Text-format parameters such as `'now'` make a result depend on the time.
fn has_time_word(bind: &Bind<'_>) -> bool {
    bind.params.iter().enumerate().any(|(i, p)| {
        let format = match bind.param_formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        };
        format == 0 && p.and_then(|v| std::str::from_utf8(v).ok()).is_some_and(is_time_word)
    })
}
