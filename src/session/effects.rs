//! What a statement invalidates, and applying it.
//!
//! A write to known relations bumps the generations of the relations the catalog says it
//! changes (itself, partitions, a view's base tables, tables reached by cascading foreign
//! keys). A write pinned to primary-key values of a table that changes nothing else
//! (`UPDATE t SET … WHERE id = $1`, see [`crate::query::point`]) bumps only those keys (and
//! the table's every-write counter): results read by other keys stay. When that cannot be
//! known — the catalog is unreachable, the table has user triggers or rules, the statement
//! is `DO`/`CALL`/unparseable, or it calls a volatile user function — pgcache invalidates
//! wider: by name in every schema, or everything, as `cache.unknown_writes` says. DDL
//! invalidates by name and clears the catalog facts. Committed invalidations are also
//! published to the other instances ([`crate::peers`]).

use std::sync::Arc;
use std::time::Instant;

use crate::config::UnknownWrites;
use crate::context::Context;
use crate::protocol::frontend::BindParts;
use crate::query::catalog::{CatalogError, RelationInfo};
use crate::query::point::{self, KeyType, KeyValue};
use crate::query::{Classified, Kind, Relation, TxControl};

use super::memo::Assessments;

pub use super::core::effect::Effect;

/// Applies effects to the generations (before the completion reaches the client). A write's
/// effects are applied when it completes and again when its transaction ends; `count` is set
/// only for the latter, so the statistics count each committed write once, and the other
/// instances hear of it once (see [`crate::peers`]).
pub fn apply(ctx: &Arc<Context>, database: &str, effects: &[Effect], count: bool) {
    if !ctx.config().cache.invalidate_on_writes {
        return;
    }
    if count {
        publish(ctx, database, effects);
    }
    for e in effects {
        match e {
            Effect::Relations(r) => {
                ctx.generations.bump_relations(r);
                if count {
                    r.iter().for_each(|r| ctx.stats.table_written(&r.name));
                }
            }
            Effect::Keys { relation, column, values } => {
                ctx.generations.bump_keys(relation, column, values);
                if count {
                    ctx.stats.table_written(&relation.name);
                    ctx.stats.keys_written(&relation.name, values);
                }
            }
            Effect::Name(n) => {
                ctx.generations.bump_name(n);
                if count {
                    ctx.stats.table_written(n);
                }
            }
            Effect::All => {
                ctx.generations.bump_all();
                if count {
                    ctx.stats.all_invalidated();
                }
            }
            Effect::Unknown(why) => {
                if count {
                    ctx.stats.unknown_write();
                }
                match ctx.config().cache.unknown_writes {
                    UnknownWrites::InvalidateAll => {
                        ctx.generations.bump_all();
                        if count {
                            ctx.stats.all_invalidated();
                        }
                    }
                    UnknownWrites::Ignore => {
                        tracing::warn!(reason = why, "write with unknown targets; cache not invalidated")
                    }
                }
            }
        }
    }
}

/// The shared L2's versions `effects` in `database` move (nothing while invalidation is off;
/// an unknown write moves everything unless `cache.unknown_writes` says to ignore it).
pub fn l2_versions(ctx: &Context, database: &str, effects: &[Effect]) -> Vec<crate::l2::Version> {
    use crate::l2::Moved;
    let config = ctx.config();
    if !config.cache.invalidate_on_writes {
        return Vec::new();
    }
    let all = config.cache.unknown_writes == UnknownWrites::InvalidateAll;
    let moved = effects.iter().filter_map(|e| match e {
        Effect::Relations(r) => Some(Moved::Relations(r)),
        Effect::Keys { relation, values, .. } => Some(Moved::Keys { relation, values }),
        Effect::Name(n) => Some(Moved::Name(n)),
        Effect::All => Some(Moved::All),
        Effect::Unknown(_) => all.then_some(Moved::All),
    });
    crate::l2::versions_of_effects(database, moved)
}

/// An L1 entry as the L2 stores it.
pub fn l2_value(entry: &crate::cache::Entry) -> crate::l2::Stored {
    crate::l2::Stored {
        age: entry.age(),
        rows: entry.rows,
        row_description: entry.row_description.clone(),
        body: entry.body.clone(),
    }
}

/// Tells the other instances what a committed transaction wrote in `database` (while the
/// cache is in use: an instance with no rules and nothing cached is a plain pooler).
fn publish(ctx: &Arc<Context>, database: &str, effects: &[Effect]) {
    if !ctx.caching() {
        return;
    }
    let (mut relations, mut keyed, mut names, mut all) = (Vec::new(), Vec::new(), Vec::new(), false);
    for e in effects {
        match e {
            Effect::Relations(r) => relations.extend(r.iter().cloned()),
            Effect::Keys { relation, column, values } => keyed.push((relation, column.as_str(), values.as_slice())),
            Effect::Name(n) => names.push(n.clone()),
            Effect::All => all = true,
            Effect::Unknown(_) => all |= ctx.config().cache.unknown_writes == UnknownWrites::InvalidateAll,
        }
    }
    ctx.peers.publish(database, &relations, &keyed, &names, all);
}

/// The parameters of an extended-protocol execution: their declared types (0: left to the
/// server) and the Bind carrying their values.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    pub types: &'a [u32],
    pub bind: &'a BindParts,
}

/// The values of a key of type `kind` that `values` stand for (`$n` read from `params`), or
/// `None` if any of them cannot be read as one.
fn key_values(values: &[point::Value], kind: KeyType, params: Option<Params<'_>>) -> Option<Vec<KeyValue>> {
    let param = |n: u16| {
        let (p, i) = (params?, usize::from(n) - 1);
        let bytes = p.bind.params.get(i)?.as_deref()?;
        Some((p.types.get(i).copied().unwrap_or(0), p.bind.param_format(i) == 1, bytes))
    };
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        match v {
            point::Value::Const(text) => out.push(kind.text(text)?),
            point::Value::Param(n) => {
                let (oid, binary, bytes) = param(*n)?;
                out.push(kind.param(oid, binary, bytes)?);
            }
            point::Value::ArrayParam(n) => {
                let (oid, binary, bytes) = param(*n)?;
                out.extend(kind.array_param(oid, binary, bytes)?);
            }
            // Not read from this text (a statement among several in one Query).
            point::Value::Literal { .. } => return None,
        }
    }
    Some(out)
}

/// The values `c` pins the key `column` (of type `kind`) to, with its parameters read from
/// `params`, when invalidation by key applies — for reads and writes alike.
pub fn pinned_keys(
    ctx: &Context,
    c: &Classified,
    column: &str,
    kind: KeyType,
    params: Option<Params<'_>>,
) -> Option<Vec<KeyValue>> {
    if !ctx.config().cache.invalidate_by_key {
        return None;
    }
    key_values(c.point.as_ref()?.values(column)?, kind, params)
}

/// The key values a write `c` pins the key of `info`'s table to.
fn keys_of(ctx: &Context, c: &Classified, info: &RelationInfo, params: Option<Params<'_>>) -> Option<Vec<KeyValue>> {
    let key = info.point_key.as_ref()?;
    pinned_keys(ctx, c, &key.column, key.kind, params)
}

/// The invalidations `c` causes in `database`. Looks up the catalog (cached, bounded wait).
/// `params` are the execution's parameters (extended protocol), for writes pinned to keys.
/// `memo`: the session's, which keeps what the catalog said of a shape's functions.
async fn of(
    ctx: &Context,
    database: &str,
    c: &Classified,
    params: Option<Params<'_>>,
    memo: &mut Assessments,
) -> Vec<Effect> {
    match c.kind {
        Kind::Write => {
            let mut out = writes(ctx, database, c, params).await;
            out.extend(function_effects(ctx, database, c, memo).await);
            out
        }
        Kind::Ddl => {
            ctx.catalog.invalidate(database);
            let mut out = by_name(&c.writes);
            if c.writes.is_empty() {
                // Functions, types, roles, privileges: anything cached may depend on them.
                out.push(Effect::All);
            }
            out
        }
        Kind::Opaque => vec![Effect::Unknown("statement with unknown effects (DO, CALL, EXECUTE)")],
        // COMMIT PREPARED makes visible writes pgcache may never have seen.
        Kind::Transaction(TxControl::TwoPhase) => vec![Effect::Unknown("two-phase commit")],
        Kind::Unparseable => vec![Effect::Unknown("statement pgcache cannot parse")],
        Kind::Select | Kind::Neutral => function_effects(ctx, database, c, memo).await,
        Kind::Transaction(_) | Kind::Session(_) => Vec::new(),
    }
}

async fn writes(ctx: &Context, database: &str, c: &Classified, params: Option<Params<'_>>) -> Vec<Effect> {
    let targets = &c.writes;
    match ctx.catalog.relations(database, targets).await {
        Ok(infos) => {
            let mut out = Vec::new();
            for (target, info) in targets.iter().zip(infos) {
                let keys = if targets.len() == 1 { keys_of(ctx, c, &info, params) } else { None };
                if info.write_effects_unknown {
                    out.push(Effect::Name(target.name.clone()));
                    out.push(Effect::Unknown(
                        "write to a relation with rules or triggers that do what cannot be known, or unknown to the catalog",
                    ));
                } else if info.has_triggers {
                    // Its triggers write what their bodies say, by name in every schema.
                    out.push(Effect::Relations(info.write_targets.clone()));
                    out.extend(info.trigger_writes.iter().map(|r| Effect::Name(r.name.clone())));
                } else if let (Some(values), [relation], Some(column)) =
                    (keys, info.write_targets.as_slice(), &info.point_key)
                {
                    out.push(Effect::Keys { relation: relation.clone(), column: column.column.clone(), values });
                } else {
                    out.push(Effect::Relations(info.write_targets.clone()));
                }
            }
            out
        }
        Err(e) => unknown_after(e, targets),
    }
}

/// A write to every relation with these names, in any schema.
fn by_name(relations: &[Relation]) -> Vec<Effect> {
    relations.iter().map(|r| Effect::Name(r.name.clone())).collect()
}

fn unknown_after(e: CatalogError, targets: &[Relation]) -> Vec<Effect> {
    tracing::warn!(error = %e, "catalog unavailable; invalidating wider");
    let mut out = by_name(targets);
    out.push(Effect::Unknown("catalog unavailable"));
    out
}

/// A volatile function outside pg_catalog, or an operator running one, may write anything —
/// in any statement, a plain SELECT too (`SELECT 1 WHERE 0 ~=~ 0`). Both are looked up in the
/// catalog's cache of names, and what it said is kept per statement shape in the session's
/// `memo` while the catalog's facts hold (its epoch, `cache.catalog_ttl`): a statement of a
/// known shape costs no catalog look-up.
async fn function_effects(ctx: &Context, database: &str, c: &Classified, memo: &mut Assessments) -> Vec<Effect> {
    if c.functions.is_empty() && c.operators.is_empty() {
        return Vec::new();
    }
    let epoch = ctx.catalog.epoch();
    let may_write = match memo.book.calls_may_write(c, epoch) {
        Some(known) => known,
        None => {
            let functions = ctx.catalog.functions(database, &c.functions).await;
            let operators = ctx.catalog.operators(database, &c.operators).await;
            match (functions, operators) {
                (Ok(f), Ok(o)) => {
                    let may_write = f.iter().chain(&o).any(|f| f.may_write);
                    memo.book.keep_calls(c, epoch, Instant::now() + ctx.catalog.ttl(), may_write);
                    may_write
                }
                _ => return vec![Effect::Unknown("catalog unavailable for a function call")],
            }
        }
    };
    if may_write { vec![Effect::Unknown("volatile user function or operator")] } else { Vec::new() }
}

/// Whether running `c` may change session settings out of pgcache's sight: it calls a
/// volatile user function or operator, or writes a relation with triggers or rules (whose
/// functions may `SET` or `set_config`), or the catalog cannot say. For sessions whose
/// backend is handed on (transaction pooling) while the cache is not in use — otherwise
/// [`of`] finds these as unknown effects.
pub async fn may_change_settings_unseen(ctx: &Context, database: &str, c: &Classified, memo: &mut Assessments) -> bool {
    if !function_effects(ctx, database, c, memo).await.is_empty() {
        return true;
    }
    if !matches!(c.kind, Kind::Write) || c.writes.is_empty() {
        return false;
    }
    match ctx.catalog.relations(database, &c.writes).await {
        Ok(infos) => infos.iter().any(|i| i.write_effects_unknown),
        Err(_) => true,
    }
}

/// The invalidations `c` causes in `database`, as far as the cache needs them: while it is
/// not in use there is nothing to invalidate, so the catalog is not asked.
pub async fn of_statement(
    ctx: &Context,
    database: &str,
    c: &Classified,
    params: Option<Params<'_>>,
    memo: &mut Assessments,
) -> Vec<Effect> {
    if ctx.caching() {
        return of(ctx, database, c, params, memo).await;
    }
    match c.kind {
        Kind::Write | Kind::Ddl => by_name(&c.writes),
        Kind::Opaque | Kind::Unparseable => vec![Effect::Unknown("statement with unknown effects")],
        _ => Vec::new(),
    }
}
