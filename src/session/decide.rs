//! Whether a SELECT is answered from the cache, filled into it, or just forwarded — the same
//! decision for the simple and the extended protocol.
//!
//! The session's own conditions come first (no write in its transaction, not failed, no
//! temporary objects, no extended-protocol messages still awaiting their Sync); then the shared
//! part ([`crate::policy::assess`]: rule, statement, catalog); then the settings, read with the
//! probe if they are not known ([`Plan::Probe`]: the request waits for the probe's answer and is
//! decided again); then the key is built and looked up. A miss joins the single flight for its
//! key and takes a snapshot of the generations it depends on before its query is sent.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use crate::cache::flight::Turn;
use crate::cache::key::KeyBuilder;
use crate::cache::{Entry, Freshness, Key};
use crate::policy::{self, Assessed, Reason, SearchPath, Target};
use crate::protocol::backend::TransactionStatus;
use crate::protocol::frontend::Bind;
use crate::query::Classified;
use crate::query::tree::is_time_word;
use crate::stats::{Observation, key_hash};

use super::flow::Probe;
use super::pipeline::{Expect, Fill, Forwarded};
use super::refresh;
use super::relay::Relay;
use crate::frontend::SessionError;

/// What to do with one SELECT.
pub(super) enum Plan {
    /// Answer from this entry (`key`: a hash of its key; `stale`: past its TTL).
    Hit { entry: Arc<Entry>, key: u64, stale: bool },
    /// Forward, and keep the answer.
    Fill(Box<Fill>),
    /// Forward only, for this reason.
    Forward(Reason),
    /// The session's settings must be read first: send the probe, decide again on its answer.
    Probe,
}

/// The protocol-specific parts of a request.
pub(super) enum Request<'a> {
    Simple,
    Extended { param_types: &'a [u32], bind: &'a Bind<'a> },
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
            Plan::Probe => {}
        }
    }
}

impl Relay<'_> {
    /// Why this session cannot use the cache right now, if it cannot (no look-up needed).
    fn session_refuses(&self) -> Option<Reason> {
        if let Some(why) = self.flow.taint {
            return Some(Reason::Session(why));
        }
        if self.flow.wrote {
            return Some(Reason::TransactionWrote);
        }
        if self.track.status == TransactionStatus::Failed {
            return Some(Reason::TransactionFailed);
        }
        // Postgres may be skipping to the Sync of messages already sent (after an error): a
        // request of pgcache's own would be skipped too, and never answered.
        if self.track.unsynced {
            return Some(Reason::Unsynced);
        }
        None
    }

    pub(super) async fn decide(&mut self, sql: &str, c: &Classified, req: Request<'_>) -> Result<Plan, SessionError> {
        if let Some(why) = self.session_refuses() {
            return Ok(Plan::Forward(why));
        }
        let ctx = self.ctx;
        let rules = ctx.rules.current();
        let target = Target { sql, statement: c, database: &self.key.database, user: &self.key.user };
        let path = match (self.flow.settings.role(), self.flow.settings.search_path()) {
            (Some(role), Some(search_path)) => Some(SearchPath { role, search_path }),
            _ => None,
        };
        let a = match policy::assess(&ctx.catalog, &rules, &target, path).await {
            Assessed::Cacheable(a) => a,
            Assessed::Forward(why) => return Ok(Plan::Forward(why)),
            Assessed::NeedsSearchPath => return Ok(self.probe_or(Reason::SettingsUnknown)),
        };
        if !self.flow.settings.known() {
            return Ok(self.probe_or(Reason::SettingsUnknown));
        }
        if self.track.status == TransactionStatus::InBlock && !self.flow.settings.read_committed() {
            return Ok(Plan::Forward(Reason::Isolation));
        }
        if a.reads_custom_settings && self.flow.settings.unknowable() {
            return Ok(Plan::Forward(Reason::CustomSettingsUnknown));
        }
        if let Request::Extended { bind, .. } = &req
            && has_time_word(bind)
        {
            return Ok(Plan::Forward(Reason::TimeWordParameter));
        }
        // Another instance's invalidation could be missed while this one is not listening.
        if !ctx.peers.coherent(&self.key.database).await {
            return Ok(Plan::Forward(Reason::PeersNotListening));
        }
        // Row-level security makes what a role sees its own, whatever the rule says.
        let with_role = !a.rule.share_across_roles || a.row_security;
        let key = cache_key(&self.key.database, &self.flow.settings, with_role, sql, &req);
        let hash = key_hash(&key.0);
        match ctx.store.get(&key) {
            Some((entry, Freshness::Fresh)) => return Ok(Plan::Hit { entry, key: hash, stale: false }),
            Some((entry, Freshness::Stale)) => {
                self.refresh_in_background(&key, &entry, sql, &req, a.deps.clone());
                return Ok(Plan::Hit { entry, key: hash, stale: true });
            }
            _ => {}
        }
        let flight = match ctx.flights.join(&key, ctx.config().cache.single_flight_wait).await {
            Turn::Lead(f) => Some(f),
            Turn::Waited { .. } => {
                ctx.stats.coalesced(&a.rule.name);
                if let Some((entry, f @ (Freshness::Fresh | Freshness::Stale))) = ctx.store.get(&key) {
                    return Ok(Plan::Hit { entry, key: hash, stale: f == Freshness::Stale });
                }
                None
            }
        };
        let deps = ctx.generations.snapshot(&self.key.database, &a.deps);
        let limit = ctx.config().cache.max_entry_bytes;
        Ok(Plan::Fill(Box::new(Fill::new(key, a.rule, deps, a.resolved, Arc::from(sql), flight, limit))))
    }

    /// [`Plan::Probe`], unless the probe already failed for these settings.
    fn probe_or(&self, why: Reason) -> Plan {
        if self.flow.probe == Some(Probe::Failed) { Plan::Forward(why) } else { Plan::Probe }
    }

    /// Sends the probe that reads the session's settings; its answer is hidden from the client.
    pub(super) fn start_probe(&mut self) -> Result<(), SessionError> {
        self.flow.probe = Some(Probe::Running);
        self.flow.probe_rows.clear();
        let mut q = BytesMut::new();
        postgres_protocol::message::frontend::query(&self.flow.settings.probe_sql(), &mut q)
            .map_err(SessionError::ClientIo)?;
        self.request(q.freeze(), Forwarded { probe: true, ..Forwarded::hidden(Expect::Query) });
        Ok(())
    }

    /// Stale-while-revalidate: the entry is served, and refreshed once in the background
    /// (unless a refresh is already running, or the session's settings cannot be reproduced).
    fn refresh_in_background(
        &self,
        key: &Key,
        entry: &Arc<Entry>,
        sql: &str,
        req: &Request<'_>,
        deps: Vec<crate::query::Relation>,
    ) {
        let Some(settings) = self.flow.settings.replay(&self.key.user) else { return };
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
            self.ctx.clone(),
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

/// The key of a request: protocol, database, the session's settings (with the role unless
/// shared across roles), the SQL text, and for the extended protocol the parameter types,
/// formats and values and the result formats.
pub(super) fn cache_key(
    database: &str,
    settings: &super::settings::Settings,
    with_role: bool,
    sql: &str,
    req: &Request<'_>,
) -> Key {
    let mut kb = KeyBuilder::new(match req {
        Request::Simple => b'Q',
        Request::Extended { .. } => b'E',
    });
    kb.str(database);
    settings.key(with_role, &mut kb);
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
