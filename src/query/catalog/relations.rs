//! What a relation name is ([`RelationInfo`]): the schemas holding it, what a read of it
//! depends on (partitions and inheritance parents and children, a view's base relations, the
//! view's own cacheability), what a write to it also changes (foreign keys with cascading
//! actions) or whether that is unknowable (user triggers, rules), and the key its entries and
//! writes may be scoped by ([`PointKey`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio_postgres::Client;

use super::{Catalog, CatalogError, LOOKUP_TIMEOUT, Relation, SETTINGS_ONLY, Volatility};
use crate::query::classify::classify;
use crate::query::point::KeyType;

/// What pgcache knows of a relation name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelationInfo {
    /// The schemas holding a relation of this name (for `search_path` resolution).
    pub schemas: Vec<String>,
    /// Qualified relations whose writes change what reading this name returns.
    pub read_deps: Vec<Relation>,
    /// Qualified relations a write to this name changes.
    pub write_targets: Vec<Relation>,
    /// Writes to it run rules, or user triggers that may do what cannot be known: their
    /// effects are unknown. (pgcache's own invalidation triggers, `pgcache triggers install`,
    /// only notify and are not counted.)
    pub write_effects_unknown: bool,
    /// Writes to it run user triggers (so they are never scoped to keys: a trigger may change
    /// the key or other rows) ...
    pub has_triggers: bool,
    /// ... which write these relations (by name when their body does not qualify them).
    pub trigger_writes: Vec<Relation>,
    /// Why reading it must never be cached.
    pub never_cache: Option<String>,
    /// It is an unlogged table (or reads one): a standby cannot read it.
    pub unlogged: bool,
    /// A view over it uses stable functions, or it has a column whose values are written out
    /// through the catalog (`regclass` and the like).
    pub stable: bool,
    /// Row-level security is enabled on it (or on a relation a view over it reads): what a
    /// read returns depends on the role and on whatever its policies read.
    pub row_security: bool,
    /// The column its cache entries and writes may be scoped by ([`crate::query::point`]):
    /// its single-column integer or UUID primary key (not generated), when it is one plain table —
    /// not partitioned, no partitions or inheritance, no user triggers or rules, no cascading
    /// foreign keys, no row-level security — so a write pinned to key values changes only
    /// the rows with those values, in it alone.
    pub point_key: Option<PointKey>,
}

/// A table's key column, for invalidation by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointKey {
    pub column: String,
    pub kind: KeyType,
}

impl Catalog {
    /// Facts about each named relation, in order.
    pub async fn relations(&self, db: &str, names: &[Relation]) -> Result<Vec<Arc<RelationInfo>>, CatalogError> {
        // All known and fresh (every write in steady state): no timer, no boxed future.
        if let Some(known) = self.known_relations(db, names) {
            return Ok(known);
        }
        tokio::time::timeout(LOOKUP_TIMEOUT, self.relations_inner(db, names, 0))
            .await
            .map_err(|_| CatalogError::Timeout)?
    }

    /// `names`' facts if every one is cached and within the TTL (one lock).
    fn known_relations(&self, db: &str, names: &[Relation]) -> Option<Vec<Arc<RelationInfo>>> {
        let d = self.db(db);
        let map = d.relations.lock();
        names.iter().map(|n| map.get(n).filter(|c| c.at.elapsed() <= self.ttl).map(|c| c.value.clone())).collect()
    }

    fn relations_inner<'a>(
        &'a self,
        db: &'a str,
        names: &'a [Relation],
        depth: usize,
    ) -> BoxFuture<'a, Result<Vec<Arc<RelationInfo>>, CatalogError>> {
        Box::pin(async move {
            let d = self.db(db);
            let mut out = Vec::with_capacity(names.len());
            for name in names {
                let cached =
                    d.relations.lock().get(name).filter(|c| c.at.elapsed() <= self.ttl).map(|c| c.value.clone());
                let info = match cached {
                    Some(i) => i,
                    None => {
                        let i = Arc::new(self.fetch_relation(db, name, depth).await?);
                        super::keep(&mut d.relations.lock(), name.clone(), i.clone());
                        i
                    }
                };
                out.push(info);
            }
            Ok(out)
        })
    }

    async fn fetch_relation(&self, db: &str, name: &Relation, depth: usize) -> Result<RelationInfo, CatalogError> {
        let client = self.client(db).await?;
        let rows = client
            .query(
                "SELECT c.oid::int8, n.nspname::text, c.relkind::text, c.relpersistence::text, \
                   c.relhasrules, \
                   CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END, \
                   c.relrowsecurity OR c.relforcerowsecurity, \
                   EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                     JOIN pg_type e ON e.oid = COALESCE(NULLIF(t.typelem, 0), NULLIF(t.typbasetype, 0), t.oid) \
                     JOIN pg_proc p ON p.oid = e.typoutput \
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                       AND p.provolatile <> 'i' AND NOT p.proname::text = ANY($3)), \
                   CASE WHEN c.relkind = 'r' AND NOT c.relispartition THEN \
                     (SELECT a.attname::text || ':' || a.atttypid::oid::int8 FROM pg_index i \
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                       WHERE i.indrelid = c.oid AND i.indisprimary AND i.indnkeyatts = 1 \
                         AND a.attgenerated = '') END, \
                   EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal \
                     AND t.tgname NOT IN ('pgcache_invalidate', 'pgcache_invalidate_truncate')) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relname = $1 AND ($2::text IS NULL OR n.nspname = $2) AND c.relkind IN ('r','p','v','m','f')",
                &[&name.name, &name.schema, &SETTINGS_ONLY],
            )
            .await?;
        let mut info = RelationInfo::default();
        if rows.is_empty() {
            // Created since, or a typo Postgres will report: do not cache, invalidate by name.
            info.never_cache = Some(format!("relation {name} is not in the catalog"));
            info.write_effects_unknown = true;
            return Ok(info);
        }
        let mut reads = BTreeSet::new();
        let mut writes = BTreeSet::new();
        let single = rows.len() == 1;
        let mut key: Option<PointKey> = None;
        for row in rows {
            let (oid, schema, kind, persistence, rules): (i64, String, String, String, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let triggers: bool = row.get(9);
            let viewdef: Option<String> = row.get(5);
            info.row_security |= row.get::<_, bool>(6);
            info.stable |= row.get::<_, bool>(7);
            key = row.get::<_, Option<String>>(8).as_deref().and_then(point_key);
            let me = Relation::new(Some(&schema), &name.name);
            self.learn_oid(&self.db(db), me.clone(), oid as u32);
            info.schemas.push(schema.clone());
            reads.insert(me.clone());
            writes.insert(me.clone());
            // Rules rewrite a write into anything; triggers write what their functions do.
            info.write_effects_unknown |= rules;
            if triggers {
                info.has_triggers = true;
                let t = self.trigger_effects(&client, db, oid).await?;
                info.write_effects_unknown |= t.unknown;
                info.trigger_writes.extend(t.writes);
            }
            info.unlogged |= persistence == "u";
            if persistence == "t" {
                info.never_cache = Some(format!("{me} is a temporary table"));
            }
            if kind == "f" {
                info.never_cache = Some(format!("{me} is a foreign table"));
            }
            for (r, oid) in related(&client, oid, INHERITANCE).await? {
                self.learn_oid(&self.db(db), r.clone(), oid);
                reads.insert(r.clone());
                writes.insert(r);
            }
            for (r, oid) in related(&client, oid, CASCADES).await? {
                self.learn_oid(&self.db(db), r.clone(), oid);
                writes.insert(r);
            }
            if let Some(def) = viewdef {
                self.add_view(db, &me, &def, depth, &mut info, &mut reads, &mut writes).await?;
            }
        }
        let alone = reads.len() == 1 && writes.len() == 1;
        if single && alone && !info.write_effects_unknown && !info.has_triggers && !info.row_security {
            info.point_key = key;
        }
        info.read_deps = reads.into_iter().collect();
        info.write_targets = writes.into_iter().collect();
        Ok(info)
    }

    /// A view depends on what its definition reads, and is only as cacheable as its functions.
    #[allow(clippy::too_many_arguments)]
    async fn add_view(
        &self,
        db: &str,
        me: &Relation,
        def: &str,
        depth: usize,
        info: &mut RelationInfo,
        reads: &mut BTreeSet<Relation>,
        writes: &mut BTreeSet<Relation>,
    ) -> Result<(), CatalogError> {
        let c = classify(def).into_iter().next().unwrap_or_else(|| classify("SELECT").remove(0));
        if depth > 8 {
            info.never_cache = Some(format!("view {me} nests too deeply"));
            return Ok(());
        }
        if let Some(why) = c.never_cache {
            info.never_cache = Some(format!("view {me}: {why}"));
        }
        info.stable |= c.stable_builtins;
        for v in self.types(db, &c.types).await? {
            match v {
                Volatility::Volatile => info.never_cache = Some(format!("view {me} evaluates a volatile type")),
                Volatility::Stable => info.stable = true,
                Volatility::Immutable => {}
            }
        }
        for f in self.functions(db, &c.functions).await? {
            match f.volatility {
                Volatility::Volatile => info.never_cache = Some(format!("view {me} calls a volatile function")),
                Volatility::Stable => info.stable = true,
                Volatility::Immutable => {}
            }
        }
        for base in self.relations_inner(db, &c.reads, depth + 1).await? {
            reads.extend(base.read_deps.iter().cloned());
            // An automatically updatable view writes its base relations.
            writes.extend(base.write_targets.iter().cloned());
            info.write_effects_unknown |= base.write_effects_unknown;
            info.has_triggers |= base.has_triggers;
            info.trigger_writes.extend(base.trigger_writes.iter().cloned());
            info.stable |= base.stable;
            info.row_security |= base.row_security;
            if info.never_cache.is_none() {
                info.never_cache = base.never_cache.clone();
            }
        }
        Ok(())
    }
}

/// A key column from `name:type-oid`, if its type is one keys are read for.
fn point_key(column_and_type: &str) -> Option<PointKey> {
    let (column, oid) = column_and_type.rsplit_once(':')?;
    let kind = KeyType::of_oid(oid.parse().ok()?)?;
    Some(PointKey { column: column.to_owned(), kind })
}

/// Inheritance/partition ancestors and descendants of relation `$1`.
const INHERITANCE: &str = "WITH RECURSIVE up(oid) AS ( \
        SELECT inhparent FROM pg_inherits WHERE inhrelid = $1::int8::oid \
        UNION SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid), \
    down(oid) AS ( \
        SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::int8::oid \
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN down ON i.inhparent = down.oid) \
    SELECT n.nspname::text, c.relname::text, c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid IN (SELECT oid FROM up UNION SELECT oid FROM down)";

/// Relations whose rows change when rows of `$1` do, through foreign keys with ON DELETE or
/// ON UPDATE CASCADE / SET NULL / SET DEFAULT, transitively.
const CASCADES: &str = "WITH RECURSIVE fk(oid) AS ( \
        SELECT conrelid FROM pg_constraint WHERE confrelid = $1::int8::oid AND contype = 'f' \
          AND (confdeltype IN ('c','n','d') OR confupdtype IN ('c','n','d')) \
        UNION SELECT c.conrelid FROM pg_constraint c JOIN fk ON c.confrelid = fk.oid WHERE c.contype = 'f' \
          AND (c.confdeltype IN ('c','n','d') OR c.confupdtype IN ('c','n','d'))) \
    SELECT n.nspname::text, c.relname::text, c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid IN (SELECT oid FROM fk)";

async fn related(client: &Client, oid: i64, sql: &str) -> Result<Vec<(Relation, u32)>, CatalogError> {
    let rows = client.query(sql, &[&oid]).await?;
    Ok(rows
        .iter()
        .map(|r| (Relation::new(Some(r.get::<_, &str>(0)), r.get::<_, &str>(1)), r.get::<_, i64>(2) as u32))
        .collect())
}
