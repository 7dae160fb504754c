//! Facts only the database knows, looked up over a tokio-postgres side connection per
//! database and cached: how volatile a function is, how volatile evaluating a type is (its
//! input, output and cast functions: `'t'::regclass` reads the catalog), what a relation is
//! (table, view, foreign table, temporary, with row-level security), how volatile the
//! user-defined operators of a name are ([`operators`]), which relations a read of
//! it depends on (partitions and inheritance children and parents, a view's base relations),
//! and what a write to it may also change (foreign keys with cascading actions) or whether that
//! is unknowable (user triggers, rules).
//!
//! A view's definition is classified like any query, so a view over `now()` or a volatile
//! function is not cacheable. Cached facts expire after a while and are dropped when DDL is
//! seen, so objects created or changed later are picked up. When the catalog cannot be reached
//! the caller fails open (does not cache) and, for writes, invalidates wider. The side
//! connections it reads through are opened in [`side`].

mod operators;
mod side;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio_postgres::Client;
use tokio_postgres::tls::NoTlsStream;

use crate::backend::{Credentials, Endpoint};
use crate::config::Upstream;

use super::classify::classify;
use super::point::KeyType;
use super::relation::Relation;

/// The connection half of a side connection (driven by whoever reads its notifications).
pub type SideConnection = tokio_postgres::Connection<crate::net::Stream, NoTlsStream>;

/// How a function's result may vary (`pg_proc.provolatile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Volatility {
    Immutable,
    Stable,
    Volatile,
}

/// What pgcache knows of a function name (all its overloads, in every schema the name may
/// resolve to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionInfo {
    pub volatility: Volatility,
    /// A volatile function outside `pg_catalog`: it may write anything.
    pub may_write: bool,
}

/// What pgcache knows of a relation name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelationInfo {
    /// The schemas holding a relation of this name (for `search_path` resolution).
    pub schemas: Vec<String>,
    /// Qualified relations whose writes change what reading this name returns.
    pub read_deps: Vec<Relation>,
    /// Qualified relations a write to this name changes.
    pub write_targets: Vec<Relation>,
    /// Writes to it run user triggers or rules: their effects are unknown. (pgcache's own
    /// invalidation triggers, `pgcache triggers install`, only notify and are not counted.)
    pub write_effects_unknown: bool,
    /// Why reading it must never be cached.
    pub never_cache: Option<String>,
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

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog connection: {0}")]
    Connect(String),
    #[error("catalog query: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("catalog look-up timed out")]
    Timeout,
}

struct Cached<T> {
    value: T,
    at: Instant,
}

#[derive(Default)]
struct DbCatalog {
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
    functions: Mutex<HashMap<Relation, Cached<FunctionInfo>>>,
    /// User-defined operators by name (see [`operators`]).
    operators: Mutex<HashMap<Relation, Cached<FunctionInfo>>>,
    types: Mutex<HashMap<Relation, Cached<Volatility>>>,
    relations: Mutex<HashMap<Relation, Cached<Arc<RelationInfo>>>>,
    defaults: Mutex<Option<Cached<Arc<Defaults>>>>,
    /// Qualified relations and their OIDs, both ways (learned from look-ups; forgotten on DDL).
    oids: Mutex<HashMap<Relation, u32>>,
    by_oid: Mutex<HashMap<u32, Relation>>,
}

/// What a session of the catalog's login gets by default in a database (for `EXPLAIN CACHE`,
/// which decides as a fresh session would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub user: String,
    pub search_path: String,
}

/// Catalog look-ups for every database.
pub struct Catalog {
    endpoint: Arc<Endpoint>,
    upstream: Upstream,
    credentials: Arc<Credentials>,
    dbs: Mutex<HashMap<String, Arc<DbCatalog>>>,
    ttl: Duration,
    /// Moves whenever facts are forgotten (DDL, `INVALIDATE`), so what was concluded from
    /// them elsewhere (a session's memo of its statements' assessments) can tell.
    epoch: std::sync::atomic::AtomicU64,
}

const SYSTEM_SCHEMAS: [&str; 2] = ["pg_catalog", "information_schema"];
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

impl Catalog {
    pub fn new(endpoint: Arc<Endpoint>, upstream: Upstream, credentials: Arc<Credentials>, ttl: Duration) -> Self {
        Catalog { endpoint, upstream, credentials, dbs: Mutex::new(HashMap::new()), ttl, epoch: Default::default() }
    }

    fn db(&self, db: &str) -> Arc<DbCatalog> {
        let mut dbs = self.dbs.lock();
        match dbs.get(db) {
            Some(d) => d.clone(),
            None => dbs.entry(db.to_owned()).or_default().clone(),
        }
    }

    /// How long a fact is trusted before it is looked up again (`cache.catalog_ttl`).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A counter that moves whenever facts about any database are forgotten.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Forgets everything known about `db` (after DDL).
    pub fn invalidate(&self, db: &str) {
        let d = self.db(db);
        d.functions.lock().clear();
        d.operators.lock().clear();
        d.types.lock().clear();
        d.relations.lock().clear();
        d.oids.lock().clear();
        d.by_oid.lock().clear();
        // After the facts are gone: a conclusion stamped with the new epoch used fresh ones.
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The OID of a qualified relation, if a look-up has seen it.
    pub fn oid_of(&self, db: &str, relation: &Relation) -> Option<u32> {
        self.db(db).oids.lock().get(relation).copied()
    }

    /// The qualified relations with these OIDs, in order (`None`: no such relation now).
    pub async fn relations_by_oid(&self, db: &str, oids: &[u32]) -> Result<Vec<Option<Relation>>, CatalogError> {
        let d = self.db(db);
        let missing: Vec<i64> = {
            let map = d.by_oid.lock();
            oids.iter().filter(|o| !map.contains_key(o)).map(|o| i64::from(*o)).collect()
        };
        if !missing.is_empty() {
            let fetch = async {
                let client = self.client(db).await?;
                let rows = client
                    .query(
                        "SELECT c.oid::int8, n.nspname::text, c.relname::text FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1::int8[]::oid[])",
                        &[&missing],
                    )
                    .await?;
                Ok::<_, CatalogError>(rows)
            };
            let rows = tokio::time::timeout(LOOKUP_TIMEOUT, fetch).await.map_err(|_| CatalogError::Timeout)??;
            for row in rows {
                let rel = Relation::new(Some(row.get::<_, &str>(1)), row.get::<_, &str>(2));
                self.learn_oid(&d, rel, row.get::<_, i64>(0) as u32);
            }
        }
        let map = d.by_oid.lock();
        Ok(oids.iter().map(|o| map.get(o).cloned()).collect())
    }

    fn learn_oid(&self, d: &DbCatalog, relation: Relation, oid: u32) {
        d.oids.lock().insert(relation.clone(), oid);
        d.by_oid.lock().insert(oid, relation);
    }

    /// Volatility of each named function, in order.
    pub async fn functions(&self, db: &str, names: &[Relation]) -> Result<Vec<FunctionInfo>, CatalogError> {
        let d = self.db(db);
        const SQL: &str = "SELECT n.nspname::text, p.proname::text, p.provolatile::text \
                           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = ANY($1)";
        let fetch = async |missing: &[&Relation]| self.fetch_by_name(db, missing, SQL, UNKNOWN_FUNCTION).await;
        self.cached(&d.functions, names, UNKNOWN_FUNCTION, fetch).await
    }

    /// `names` looked up in `map` (one of a database's caches of facts by name), those missing
    /// or older than the TTL fetched first by `fetch` (a bounded wait); `default` for a name
    /// `fetch` did not answer for.
    async fn cached<V: Copy>(
        &self,
        map: &Mutex<HashMap<Relation, Cached<V>>>,
        names: &[Relation],
        default: V,
        fetch: impl AsyncFnOnce(&[&Relation]) -> Result<Vec<(Relation, V)>, CatalogError>,
    ) -> Result<Vec<V>, CatalogError> {
        let missing: Vec<&Relation> = {
            let map = map.lock();
            names.iter().filter(|n| map.get(*n).is_none_or(|c| c.at.elapsed() > self.ttl)).collect()
        };
        if !missing.is_empty() {
            let fetched =
                tokio::time::timeout(LOOKUP_TIMEOUT, fetch(&missing)).await.map_err(|_| CatalogError::Timeout)??;
            let mut map = map.lock();
            for (name, value) in fetched {
                map.insert(name, Cached { value, at: Instant::now() });
            }
        }
        let map = map.lock();
        Ok(names.iter().map(|n| map.get(n).map_or(default, |c| c.value)).collect())
    }

    /// What each of `names` may do, from `sql` — which, given the bare names as `$1`, lists
    /// `(schema, name, provolatile)` of every candidate: the worst of a name's candidates in
    /// its schema (any, when unqualified) counts; a volatile one outside the system schemas
    /// may write; a name with none is `unknown`.
    async fn fetch_by_name(
        &self,
        db: &str,
        names: &[&Relation],
        sql: &str,
        unknown: FunctionInfo,
    ) -> Result<Vec<(Relation, FunctionInfo)>, CatalogError> {
        let client = self.client(db).await?;
        let plain: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
        let rows = client.query(sql, &[&plain]).await?;
        Ok(names
            .iter()
            .map(|want| {
                let mut info: Option<FunctionInfo> = None;
                for row in &rows {
                    let (schema, name, vol): (String, String, String) = (row.get(0), row.get(1), row.get(2));
                    if name != want.name || want.schema.as_ref().is_some_and(|s| *s != schema) {
                        continue;
                    }
                    let volatility = match vol.as_str() {
                        "i" => Volatility::Immutable,
                        "s" => Volatility::Stable,
                        _ => Volatility::Volatile,
                    };
                    let may_write = volatility == Volatility::Volatile && !SYSTEM_SCHEMAS.contains(&schema.as_str());
                    let prev = info.unwrap_or(FunctionInfo { volatility: Volatility::Immutable, may_write: false });
                    info = Some(FunctionInfo {
                        volatility: prev.volatility.max(volatility),
                        may_write: prev.may_write || may_write,
                    });
                }
                ((*want).clone(), info.unwrap_or(unknown))
            })
            .collect())
    }

    /// How volatile evaluating each named type is, in order: the worst of its input and
    /// output functions and of the casts into it, through array elements, domains' base types
    /// and ranges' subtypes, with [`SETTINGS_ONLY`] functions counted as immutable. A type the
    /// catalog does not know counts as volatile.
    pub async fn types(&self, db: &str, names: &[Relation]) -> Result<Vec<Volatility>, CatalogError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let d = self.db(db);
        let missing: Vec<&Relation> = {
            let map = d.types.lock();
            names.iter().filter(|n| map.get(*n).is_none_or(|c| c.at.elapsed() > self.ttl)).collect()
        };
        for name in missing {
            let v = tokio::time::timeout(LOOKUP_TIMEOUT, self.fetch_type(db, name))
                .await
                .map_err(|_| CatalogError::Timeout)??;
            d.types.lock().insert(name.clone(), Cached { value: v, at: Instant::now() });
        }
        let map = d.types.lock();
        Ok(names.iter().map(|n| map.get(n).map_or(Volatility::Volatile, |c| c.value)).collect())
    }

    async fn fetch_type(&self, db: &str, name: &Relation) -> Result<Volatility, CatalogError> {
        let client = self.client(db).await?;
        let rows = client.query(TYPE_FUNCTIONS, &[&name.name, &name.schema]).await?;
        if rows.is_empty() {
            return Ok(Volatility::Volatile);
        }
        Ok(rows
            .iter()
            .map(|row| {
                let (proname, vol): (String, String) = (row.get(0), row.get(1));
                match vol.as_str() {
                    "i" => Volatility::Immutable,
                    _ if SETTINGS_ONLY.contains(&proname.as_str()) => Volatility::Immutable,
                    "s" => Volatility::Stable,
                    _ => Volatility::Volatile,
                }
            })
            .max()
            .unwrap_or(Volatility::Immutable))
    }

    /// The login the catalog uses and its default `search_path` in `db`.
    pub async fn defaults(&self, db: &str) -> Result<Arc<Defaults>, CatalogError> {
        let d = self.db(db);
        if let Some(c) = d.defaults.lock().as_ref().filter(|c| c.at.elapsed() <= self.ttl) {
            return Ok(c.value.clone());
        }
        let fetch = async {
            let client = self.client(db).await?;
            let row = client.query_one("SELECT current_user::text, current_setting('search_path')", &[]).await?;
            Ok::<_, CatalogError>(Arc::new(Defaults { user: row.get(0), search_path: row.get(1) }))
        };
        let value = tokio::time::timeout(LOOKUP_TIMEOUT, fetch).await.map_err(|_| CatalogError::Timeout)??;
        *d.defaults.lock() = Some(Cached { value: value.clone(), at: Instant::now() });
        Ok(value)
    }

    /// Facts about each named relation, in order.
    pub async fn relations(&self, db: &str, names: &[Relation]) -> Result<Vec<Arc<RelationInfo>>, CatalogError> {
        tokio::time::timeout(LOOKUP_TIMEOUT, self.relations_inner(db, names, 0))
            .await
            .map_err(|_| CatalogError::Timeout)?
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
                        d.relations.lock().insert(name.clone(), Cached { value: i.clone(), at: Instant::now() });
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
                   c.relhasrules OR EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal \
                     AND t.tgname NOT IN ('pgcache_invalidate', 'pgcache_invalidate_truncate')), \
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
                         AND a.attgenerated = '') END \
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
            let (oid, schema, kind, persistence, triggers): (i64, String, String, String, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let viewdef: Option<String> = row.get(5);
            info.row_security |= row.get::<_, bool>(6);
            info.stable |= row.get::<_, bool>(7);
            key = row.get::<_, Option<String>>(8).as_deref().and_then(point_key);
            let me = Relation::new(Some(&schema), &name.name);
            self.learn_oid(&self.db(db), me.clone(), oid as u32);
            info.schemas.push(schema.clone());
            reads.insert(me.clone());
            writes.insert(me.clone());
            info.write_effects_unknown |= triggers;
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
        if single && alone && !info.write_effects_unknown && !info.row_security {
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
            info.stable |= base.stable;
            info.row_security |= base.row_security;
            if info.never_cache.is_none() {
                info.never_cache = base.never_cache.clone();
            }
        }
        Ok(())
    }
}

/// Type input, output and cast functions that are not IMMUTABLE only because of what the cache
/// key already holds or what they wrap, so they are counted as immutable: the date/time types
/// (TimeZone, DateStyle, IntervalStyle), money (lc_monetary) and xml (xmloption) read only
/// settings; arrays, records, ranges, multiranges and domains read their element, field,
/// subtype or base type (looked at in turn); enums read their labels, which only DDL changes
/// (and DDL on types invalidates everything). Everything else that is not IMMUTABLE — `regclass`
/// and the other `reg*` types, `aclitem`, user types — reads the catalog or worse.
pub const SETTINGS_ONLY: &[&str] = &[
    "date_in",
    "date_out",
    "timestamp_in",
    "timestamp_out",
    "timestamptz_in",
    "timestamptz_out",
    "time_in",
    "time_out",
    "timetz_in",
    "timetz_out",
    "interval_in",
    "interval_out",
    "cash_in",
    "cash_out",
    "xml_in",
    "xml_out",
    "array_in",
    "array_out",
    "record_in",
    "record_out",
    "range_in",
    "range_out",
    "multirange_in",
    "multirange_out",
    "domain_in",
    "enum_in",
    "enum_out",
    "anyenum_out",
    "anyarray_out",
    // Cast functions between date/time types, money and numbers, text and xml.
    "timestamptz",
    "timestamp",
    "date",
    "time",
    "timetz",
    "money",
    "numeric",
    "xml",
];

/// The input, output and cast functions evaluated for type `$1` (in schema `$2` if given),
/// following array elements, domain base types, range subtypes and multiranges' ranges.
const TYPE_FUNCTIONS: &str = "WITH RECURSIVE ty(oid, depth) AS ( \
        SELECT t.oid, 0 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
        WHERE t.typname = $1 AND ($2::text IS NULL OR n.nspname = $2) \
        UNION SELECT x.oid, ty.depth + 1 FROM ty JOIN pg_type t ON t.oid = ty.oid \
        CROSS JOIN LATERAL (VALUES (t.typelem), (t.typbasetype), \
            ((SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid)), \
            ((SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = t.oid))) AS x(oid) \
        WHERE x.oid IS NOT NULL AND x.oid <> 0 AND ty.depth < 4) \
    SELECT p.proname::text, p.provolatile::text FROM ty JOIN pg_type t ON t.oid = ty.oid \
        JOIN pg_proc p ON p.oid IN (t.typinput, t.typoutput) \
    UNION ALL SELECT p.proname::text, p.provolatile::text FROM ty \
        JOIN pg_cast c ON c.casttarget = ty.oid JOIN pg_proc p ON p.oid = c.castfunc";

/// A function the catalog does not know: assume the worst.
const UNKNOWN_FUNCTION: FunctionInfo = FunctionInfo { volatility: Volatility::Volatile, may_write: true };

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
