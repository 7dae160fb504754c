//! Whether a SELECT is answered from the cache, filled into it, or just forwarded — the same
//! decision for the simple and the extended protocol.
//!
//! The session's own conditions come first (no write in its transaction, not failed, no
//! temporary objects, no extended-protocol messages still awaiting their Sync); then the shared
//! part ([`crate::policy::assess`]: rule, statement, catalog); then the settings, read with the
//! probe if they are not known ([`Plan::Probe`]: the request waits for the probe's answer and is
//! decided again); then the key is built and looked up. A miss joins the single flight for its
//! key and takes a snapshot of the generations it depends on before its query is sent.
//!
//! The lookup itself ([`Asker::look`]) needs no backend: a session waiting between
//! transactions, or after losing its backend, answers from the cache with the same one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::backend::PoolKey;
use crate::cache::flight::Turn;
use crate::cache::key::KeyBuilder;
use bytes::Bytes;

use crate::cache::{Entry, Freshness, Key, Keyed};
use crate::context::Context;
use crate::frontend::SessionError;
use crate::policy::{self, Assessment, Reason, SearchPath, Target};
use crate::protocol::backend::TransactionStatus;
use crate::protocol::frontend::BindParts;
use crate::query::Classified;
use crate::query::tree::is_time_word;
use crate::rules::Rule;
use crate::stats::read_hash;

use super::core::flow::{Flow, Probe};
use super::core::pipeline::Fill;
use super::core::plan::Plan;
use super::effects;
use super::memo::Assessments;
use super::refresh;
use super::relay::Relay;
use super::replay;
use crate::context::verdicts::{Conditions, Stamp, Verdict};

/// The protocol-specific parts of a request.
pub(super) enum Request<'a> {
    Simple,
    Extended { param_types: &'a [u32], bind: &'a BindParts },
}

impl Request<'_> {
    /// The parameters, in the extended protocol.
    pub(super) fn params(&self) -> Option<effects::Params<'_>> {
        match self {
            Request::Extended { param_types, bind } => Some(effects::Params { types: param_types, bind }),
            Request::Simple => None,
        }
    }
}

/// When `c` (assessed `a`) reads its table by key: that read and the key values its text or
/// parameters pin.
fn pinned<'a>(
    ctx: &Context,
    a: &'a Assessment,
    c: &Classified,
    req: &Request<'_>,
) -> Option<(&'a policy::KeyedRead, Vec<crate::query::point::KeyValue>)> {
    let k = a.keyed.as_ref()?;
    effects::pinned_keys(ctx, c, &k.column, k.kind, req.params()).map(|values| (k, values))
}

/// The counters a fill of `c` (assessed `a`) depends on, as they are now: its rule's table by
/// the keys its text or parameters pin, when it reads that table by key.
pub(super) fn fill_deps(
    ctx: &Context,
    database: &str,
    a: &Assessment,
    c: &Classified,
    req: &Request<'_>,
) -> Vec<crate::cache::Dependency> {
    snapshot(ctx, database, a, &pinned(ctx, a, c, req))
}

/// The counters a read of what `a` resolved depends on, as they are now, by the keys `keys`.
fn snapshot(
    ctx: &Context,
    database: &str,
    a: &Assessment,
    keys: &Option<(&policy::KeyedRead, Vec<crate::query::point::KeyValue>)>,
) -> Vec<crate::cache::Dependency> {
    let keyed = keys.as_ref().map(|(k, values)| Keyed { relation: &k.relation, column: &k.column, values });
    ctx.generations.snapshot(database, &a.deps, keyed)
}

/// What the cache holds for a request, as far as a session — with a backend or without one
/// ([`super::detached`]) — may use it: the one lookup both make.
pub(super) enum Looked {
    /// Not from the cache, for this reason.
    Forward(Reason),
    /// The settings must be read first.
    SettingsUnknown,
    /// An entry of the rule this statement matches now, as fresh as it is.
    Found { entry: Arc<Entry>, freshness: Freshness, key: Key, a: Arc<Assessment> },
    /// Cacheable, and not in the cache (or only an entry of another rule); `l2`: the key a
    /// fill may be stored under in the shared L2.
    Missing { key: Key, a: Arc<Assessment>, l2: Option<String> },
}

/// Which entries a session may serve, by where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// It has an idle backend: fresh entries, while the peers' invalidations are heard; stale
    /// ones (within `stale_while_revalidate`) too, refreshed in the background.
    Attached,
    /// Transaction pooling, between transactions: fresh entries while the peers' invalidations
    /// are heard (or the rule accepts stale answers during an outage). A stale one goes to a
    /// backend, which refreshes it.
    Pooled,
    /// Its backend went away: stale entries too, and only verdicts its pool's book already
    /// holds (Postgres, and so the catalog, may be down).
    Lost,
}

/// How an entry is served: past its TTL or not, and whether it must be refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub stale: bool,
    pub refresh: bool,
}

/// Whether an entry the lookup found may be served, and how: the one rule for every session,
/// with its backend or without ([`super::answer`]). `listening`: the peers' invalidations of
/// its database are heard; `fallback`: Postgres cannot answer (`stale_if_error`).
pub fn usable(freshness: Freshness, rule: &Rule, serve: Serve, listening: bool, fallback: bool) -> Option<Served> {
    let coherent = match serve {
        Serve::Attached => listening,
        Serve::Pooled | Serve::Lost => listening || !rule.stale_if_error.is_zero(),
    };
    let (stale, refresh) = match freshness {
        Freshness::Fresh if coherent => (false, false),
        Freshness::Stale if coherent && serve == Serve::Attached => (true, true),
        Freshness::Stale if coherent && serve == Serve::Lost => (true, false),
        Freshness::Fallback if fallback => (true, false),
        _ => return None,
    };
    Some(Served { stale, refresh })
}

/// The session state a lookup reads.
pub(super) struct Asker<'a> {
    pub ctx: &'a Arc<Context>,
    pub key: &'a PoolKey,
    pub flow: &'a Flow,
    pub memo: &'a mut Assessments,
    /// Postgres may be unreachable (a session whose backend was lost): decide only from what
    /// the memo holds, of any age, instead of waiting on the catalog.
    pub offline: bool,
}

impl Asker<'_> {
    /// Looks `c` up: the rule and the catalog ([`policy::assess`], memoized), the session's
    /// settings, the parameters, then the key and the store. `isolated`: the session is inside
    /// a transaction, which sees its own snapshot unless it is READ COMMITTED.
    pub async fn look(&mut self, sql: &str, c: &Classified, req: &Request<'_>, isolated: bool) -> Looked {
        let ctx = self.ctx;
        let a = match self.assess(sql, c).await {
            Verdict::Cacheable(a) => a,
            Verdict::Forward(why) => return Looked::Forward(why),
            Verdict::NeedsSearchPath => return Looked::SettingsUnknown,
        };
        let settings = &self.flow.settings;
        if !settings.known() {
            return Looked::SettingsUnknown;
        }
        if isolated && !settings.read_committed() {
            return Looked::Forward(Reason::Isolation);
        }
        if a.reads_custom_settings && settings.unknowable() {
            return Looked::Forward(Reason::CustomSettingsUnknown);
        }
        if let Request::Extended { bind, .. } = req
            && has_time_word(bind)
        {
            return Looked::Forward(Reason::TimeWordParameter);
        }
        // Row-level security makes what a role sees its own, whatever the rule says.
        let with_role = !a.rule.share_across_roles || a.row_security;
        // An entry shared across roles is served to a role only if it could read it itself.
        if !with_role && !self.may_read(&a).await {
            return Looked::Forward(Reason::NoPrivilege);
        }
        let part = settings.key_part(with_role);
        let id = self.memo.settings_id(part.clone(), &ctx.store.interner);
        let key = cache_key(&self.key.database, id, sql, req);
        // An entry stays its rule's: served only while that rule is still the one this
        // statement matches first (not after a reload narrowed it or put a bypass first).
        let held = ctx.store.get(&key).filter(|(entry, _)| entry.rule.name == a.rule.name);
        match held {
            Some((entry, freshness)) if !l2_guards_l1(ctx) => Looked::Found { entry, freshness, key, a },
            held => match self.look_in_l2(&key, &a, &part, sql, c, req, held).await {
                FromL2::Found(entry, freshness) => Looked::Found { entry, freshness, key, a },
                FromL2::Missing(l2) => Looked::Missing { key, a, l2 },
            },
        }
    }

    /// An L1 miss looked up in the shared L2 (when there is one and this instance hears the
    /// other instances' invalidations): a hit is put in L1 — under L1's counters as they were
    /// before the L2 was asked, so a write meanwhile keeps it out — and served from there.
    ///
    /// `held`: the L1 entry, when the L2 must confirm it ([`l2_guards_l1`]): it is served if
    /// the L2's versions are still those it was computed under, else it is replaced by the L2's
    /// entry or, if the L2 has none, treated as a miss; while the L2 cannot answer, as a miss.
    #[allow(clippy::too_many_arguments)]
    async fn look_in_l2(
        &mut self,
        key: &Key,
        a: &Assessment,
        part: &Bytes,
        sql: &str,
        c: &Classified,
        req: &Request<'_>,
        held: Option<(Arc<Entry>, Freshness)>,
    ) -> FromL2 {
        let ctx = self.ctx;
        let database = &self.key.database;
        let Some(l2) = ctx.l2.as_ref().filter(|_| !self.offline && ctx.peers.listening(database)) else {
            return FromL2::Missing(None);
        };
        let keys = pinned(ctx, a, c, req);
        let deps = snapshot(ctx, database, a, &keys);
        let versions =
            crate::l2::versions_of_read(database, &a.deps, keys.as_ref().map(|(k, v)| (&k.relation, v.as_slice())));
        let base = l2_base(database, part, &a.rule.name, sql, req);
        let held_key = held.as_ref().and_then(|(entry, _)| entry.l2_key.as_deref());
        match l2.lookup(&base, &versions, held_key).await {
            crate::l2::Lookup::Current => match held {
                Some((entry, freshness)) => FromL2::Found(entry, freshness),
                None => FromL2::Missing(None),
            },
            crate::l2::Lookup::Hit { value, key: l2_key } => {
                let entry = crate::cache::Entry {
                    rule: a.rule.clone(),
                    row_description: value.row_description,
                    body: value.body,
                    rows: value.rows,
                    created: tokio::time::Instant::now()
                        .checked_sub(value.age)
                        .unwrap_or_else(tokio::time::Instant::now),
                    deps,
                    tables: a.resolved.clone(),
                    sql: Arc::from(sql),
                    refreshing: Default::default(),
                    hits: Default::default(),
                    l2_key: Some(l2_key.into()),
                    recipe: None,
                };
                if ctx.store.insert(key.clone(), entry)
                    && let Some((entry, freshness)) = ctx.store.get(key)
                {
                    return FromL2::Found(entry, freshness);
                }
                FromL2::Missing(None)
            }
            crate::l2::Lookup::Miss { key } => FromL2::Missing(Some(key)),
            crate::l2::Lookup::Unavailable => FromL2::Missing(None),
        }
    }

    /// Whether the session's role may read everything `a` reads, as Postgres would judge it
    /// (asked of the catalog, kept for its TTL; offline: not known, so no).
    async fn may_read(&self, a: &Assessment) -> bool {
        let Some(role) = self.flow.settings.role() else { return false };
        if self.offline {
            return false;
        }
        match self.ctx.catalog.may_select(&self.key.database, role, &a.resolved).await {
            Ok(allowed) => allowed,
            Err(e) => {
                tracing::debug!(error = %e, "privileges unknown; a shared entry is not served");
                false
            }
        }
    }

    /// The session-free half of the decision ([`policy::assess`]), from its pool's book of
    /// verdicts when one still holds.
    async fn assess(&mut self, sql: &str, c: &Classified) -> Verdict {
        let ctx = self.ctx;
        // What the rules read of the text: the patterns it matches (one pass over it).
        let (version, patterns) = {
            let set = ctx.rules.peek();
            if set.rules.is_empty() {
                // What the policy would say first, without the pattern pass and the memo look-up.
                return Verdict::Forward(Reason::NoRules);
            }
            (set.version, set.pattern_matches(sql))
        };
        let settings = &self.flow.settings;
        let (role, search_path) = (settings.role(), settings.search_path());
        // Read before the facts are: an invalidation meanwhile leaves the memo stale, not wrong.
        let epoch = ctx.catalog.epoch();
        let now = Conditions { rules: version, catalog: epoch, role, search_path, patterns: patterns.as_deref() };
        if let Some(v) = self.memo.book.get(c, &now, self.offline) {
            return v;
        }
        if self.offline {
            return Verdict::Forward(Reason::CatalogUnavailable("the session's backend was lost".into()));
        }
        let rules = ctx.rules.current();
        let target = Target { sql, statement: c, database: &self.key.database, user: &self.key.user };
        let path = match (role, search_path) {
            (Some(role), Some(search_path)) => Some(SearchPath { role, search_path }),
            _ => None,
        };
        let verdict = Verdict::from(policy::assess(&ctx.catalog, &rules, &target, path).await);
        let stamp = Stamp {
            rules: rules.version,
            catalog: epoch,
            role: role.map(Into::into),
            search_path: search_path.map(Into::into),
            patterns: if rules.version == version { patterns } else { rules.pattern_matches(sql) },
        };
        self.memo.book.keep(c, stamp, Instant::now() + ctx.catalog.ttl(), &verdict);
        verdict
    }
}

impl Relay<'_> {
    /// Decides `c`, a statement of `sql` (of the Query frame `query`, in the simple protocol).
    pub(super) async fn decide(
        &mut self,
        sql: &str,
        c: &Classified,
        req: Request<'_>,
        query: Option<&Bytes>,
    ) -> Result<Plan, SessionError> {
        let ctx = self.ctx;
        let isolated = self.core.tracker.status == TransactionStatus::InBlock;
        // What the short way just found missing for this very request (see Missed).
        let missed = self.memo.missed.take().filter(|m| {
            let same = match &req {
                Request::Extended { param_types, bind } => m.is_for(sql, param_types, bind),
                Request::Simple => query.is_some_and(|q| m.is_for_query(q)),
            };
            same && !isolated && m.rules == ctx.rules.version() && m.catalog == ctx.catalog.epoch()
        });
        if let Some(why) = self.core.refuses() {
            return Ok(Plan::forward(why));
        }
        let looked = match missed {
            Some(m) => {
                let super::memo::Missed { key, assessment, l2, .. } = *m;
                Looked::Missing { key, a: assessment, l2 }
            }
            None => {
                let mut asker = Asker { ctx, key: self.key, flow: &self.core.flow, memo: self.memo, offline: false };
                asker.look(sql, c, &req, isolated).await
            }
        };
        let mut l2_key = None;
        let (entry, key, a) = match looked {
            Looked::Forward(why) if why.only_lacks_a_rule() => {
                // No cache key is built: the text and parameters stand for it.
                let params = match &req {
                    Request::Extended { bind, .. } => bind.params.as_slice(),
                    Request::Simple => &[],
                };
                let key = read_hash(&self.key.database, &self.key.user, sql, params);
                return Ok(Plan::Forward(why, Some(key)));
            }
            Looked::Forward(why) => return Ok(Plan::forward(why)),
            Looked::SettingsUnknown => return Ok(self.probe_or(Reason::SettingsUnknown)),
            Looked::Found { entry, freshness, key, a } => (Some((entry, freshness)), key, a),
            Looked::Missing { key, a, l2 } => {
                l2_key = l2;
                (None, key, a)
            }
        };
        // Another instance's invalidation could be missed while this one is not listening.
        if !ctx.peers.coherent(&self.key.database).await {
            return Ok(Plan::forward(Reason::PeersNotListening));
        }
        let hash = key.hashed();
        if let Some((entry, freshness)) = entry
            && let Some(served) = usable(freshness, &entry.rule, Serve::Attached, true, false)
        {
            if served.refresh {
                self.refresh_in_background(&key, &entry, sql, &req, a.deps.clone());
            }
            self.core.flow.short_way.answered(true);
            return Ok(Plan::Hit { entry, key: hash, stale: served.stale });
        }
        // On a replica a fill is never stored into the L2, whose versions other instances move
        // (see crate::replica).
        let replica = self.core.flow.replica;
        if replica.is_some() && ctx.l2.is_some() {
            return Ok(Plan::forward(Reason::ReplicaBehind));
        }
        // A fill is stored under the state the backend computes it in: the settings a probe
        // read on this backend. Until it has been read here, read it first. (Borrowed: cloned
        // below only for an admitted fill, as the bytes may be shared with other sessions.)
        let Some(state) = self.core.flow.settings.verified() else {
            return Ok(self.probe_or(Reason::SettingsUnknown));
        };
        // A rule whose entries are seldom read again stores a key only at its second miss
        // (asked once per miss: after the probe, which decides the miss again).
        if !ctx.store.admission.admit(&a.rule, hash, ctx.config().cache.adaptive_admission) {
            ctx.stats.metrics.not_admitted();
            return Ok(Plan::forward(Reason::NotAdmitted));
        }
        let flight = match ctx.flights.join(&key, ctx.config().cache.single_flight_wait).await {
            Turn::Lead(f) => Some(f),
            Turn::Waited { .. } => {
                ctx.stats.coalesced(&a.rule.name);
                // What the flight stored (just now: no refresh is due). Where the L2's
                // versions guard L1, only if the leader looked them up as this request did:
                // a flight that began before a write this request follows read the old row,
                // and only the versions tell (another instance's write moves no counter here).
                if let Some((entry, freshness)) = ctx.store.get(&key)
                    && (!l2_guards_l1(ctx) || (l2_key.is_some() && entry.l2_key.as_deref() == l2_key.as_deref()))
                    && let Some(served) = usable(freshness, &entry.rule, Serve::Attached, true, false)
                {
                    self.core.flow.short_way.answered(true);
                    return Ok(Plan::Hit { entry, key: hash, stale: served.stale });
                }
                None
            }
        };
        let deps = fill_deps(ctx, &self.key.database, &a, c, &req);
        // On a replica, stored only if the replica has replayed every write that moved the
        // counters as the snapshot shows them (see crate::replica).
        if let Some(i) = replica
            && !ctx.replicas.fill_storable(i, crate::cache::generation::written_at(&deps))
        {
            ctx.replicas.fill_skipped();
            return Ok(Plan::forward(Reason::ReplicaBehind));
        }
        let limit = ctx.config().cache.max_entry_bytes;
        let rule = a.rule.clone();
        let mut fill =
            Fill::new(key, rule, deps, a.resolved.clone(), Arc::from(sql), flight, limit).computed_in(state.clone());
        fill.l2 = l2_key;
        if ctx.warm.is_some() {
            fill.recipe = self.recipe(sql, &req).map(Arc::new);
        }
        Ok(Plan::Fill(Box::new(fill)))
    }

    /// [`Plan::Probe`], unless the probe already failed for these settings.
    fn probe_or(&self, why: Reason) -> Plan {
        if self.core.flow.probe == Some(Probe::Failed) { Plan::forward(why) } else { Plan::Probe }
    }

    /// How to compute this request's entry again at the next start (none when the session's
    /// settings cannot be reproduced on another connection, or it is too large to keep).
    fn recipe(&self, sql: &str, req: &Request<'_>) -> Option<crate::cache::warm::Recipe> {
        use crate::cache::warm::{Extended, MAX_RECIPE_BYTES, Recipe};
        let settings = &self.core.flow.settings;
        let recipe = Recipe {
            database: self.key.database.clone(),
            user: self.key.user.clone(),
            startup: self.startup.to_vec(),
            settings: settings.replay(&self.key.user)?,
            customs: settings.customs().iter().cloned().collect(),
            undefined: settings.undefined().map(str::to_owned).collect(),
            sql: sql.to_owned(),
            extended: match req {
                Request::Simple => None,
                Request::Extended { param_types, bind } => Some(Extended {
                    param_types: param_types.to_vec(),
                    param_formats: bind.param_formats.clone(),
                    params: bind.params.iter().map(|p| p.as_ref().map(|b| Bytes::copy_from_slice(b))).collect(),
                    result_formats: bind.result_formats.clone(),
                }),
            },
        };
        (recipe.size() <= MAX_RECIPE_BYTES).then_some(recipe)
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
        let Some(settings) = self.core.flow.settings.replay(&self.key.user) else { return };
        if entry.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let request = match req {
            Request::Simple => replay::Request::Simple { sql: sql.to_owned() },
            Request::Extended { param_types, bind } => replay::Request::Extended {
                sql: sql.to_owned(),
                param_types: param_types.to_vec(),
                param_formats: bind.param_formats.clone(),
                params: bind.params.clone(),
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
                session: self.core.flow.settings.clone(),
                request,
                deps,
            },
        );
    }
}

/// Whether every L1 hit must be confirmed by the shared L2: there is one, and the peers are
/// off, so the L2's versions are the only way this instance learns of other instances' writes.
fn l2_guards_l1(ctx: &Context) -> bool {
    ctx.l2.is_some() && !ctx.peers.enabled()
}

/// What the L2 gave for an L1 miss.
enum FromL2 {
    Found(Arc<Entry>, Freshness),
    /// Not there; the L2 key a fill may be stored under (`None`: no L2 for it).
    Missing(Option<String>),
}

/// A request's identity across the fleet (the L2 key's base): as [`cache_key`], with the
/// settings' key part itself (not this process's id for it) and the rule's name.
fn l2_base(database: &str, settings: &Bytes, rule: &str, sql: &str, req: &Request<'_>) -> Vec<u8> {
    let mut kb = KeyBuilder::new(match req {
        Request::Simple => b'Q',
        Request::Extended { .. } => b'E',
    });
    kb.str(database).part(Some(settings)).str(rule).str(sql);
    if let Request::Extended { param_types, bind } = req {
        kb.u32s(param_types).i16s(&bind.param_formats);
        for p in &bind.params {
            kb.part(p.as_deref());
        }
        kb.i16s(&bind.result_formats);
    }
    kb.finish_part().to_vec()
}

/// The key of a request: protocol, database, the session's settings (the interned id of their
/// key part, with the role unless shared across roles), the SQL text, and for the extended
/// protocol the parameter types, formats and values and the result formats.
pub(super) fn cache_key(database: &str, settings: u64, sql: &str, req: &Request<'_>) -> Key {
    let mut kb = KeyBuilder::new(match req {
        Request::Simple => b'Q',
        Request::Extended { .. } => b'E',
    });
    kb.str(database);
    kb.u64(settings);
    kb.str(sql);
    if let Request::Extended { param_types, bind } = req {
        kb.u32s(param_types).i16s(&bind.param_formats);
        for p in &bind.params {
            kb.part(p.as_deref());
        }
        kb.i16s(&bind.result_formats);
    }
    kb.finish()
}

/// Text-format parameters such as `'now'` make a result depend on the time.
fn has_time_word(bind: &BindParts) -> bool {
    bind.params.iter().enumerate().any(|(i, p)| {
        bind.param_format(i) == 0 && p.as_deref().and_then(|v| std::str::from_utf8(v).ok()).is_some_and(is_time_word)
    })
}
