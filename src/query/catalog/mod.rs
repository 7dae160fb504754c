//! Facts only the database knows, looked up over a tokio-postgres side connection per
//! database and cached: how volatile a function is, how volatile evaluating a type is (its
//! input, output and cast functions: `'t'::regclass` reads the catalog), what a relation is
//! (table, view, foreign table, temporary, with row-level security), how volatile the
//! user-defined operators of a name are ([`operators`]), which relations a read of
//! it depends on (partitions and inheritance children and parents, a view's base relations),
//! and what a write to it may also change (foreign keys with cascading actions) or whether that
//! is unknowable (user triggers, rules) — relations are [`relations`]'s.
//!
//! A view's definition is classified like any query, so a view over `now()` or a volatile
//! function is not cacheable. Cached facts expire after a while and are dropped when DDL is
//! seen, so objects created or changed later are picked up. When the catalog cannot be reached
//! the caller fails open (does not cache) and, for writes, invalidates wider. The side
//! connections it reads through are opened in [`side`].

mod operators;
mod privileges;
mod relations;
mod side;
mod triggers;

pub use relations::{PointKey, RelationInfo};

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_postgres::Client;
use tokio_postgres::tls::NoTlsStream;

use crate::backend::{Credentials, Endpoint};
use crate::config::Upstream;

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

/// Facts kept per kind and database; names come from clients' SQL (relations that do not
/// exist included), so past this many the kind is forgotten and looked up again.
const MAX_FACTS: usize = 10_000;

/// Keeps a fact, forgetting the others of its kind first if there are [`MAX_FACTS`].
fn keep<K: Eq + std::hash::Hash, T>(map: &mut HashMap<K, Cached<T>>, name: K, value: T) {
    if map.len() >= MAX_FACTS && !map.contains_key(&name) {
        map.clear();
    }
    map.insert(name, Cached { value, at: Instant::now() });
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
    /// Whether a role may read a relation ([`privileges`]).
    privileges: Mutex<HashMap<(String, Relation), Cached<bool>>>,
    /// Whether a role's transactions default to SERIALIZABLE here.
    serializable: Mutex<HashMap<String, Cached<bool>>>,
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
        d.privileges.lock().clear();
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
        if names.is_empty() {
            return Ok(Vec::new());
        }
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
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let missing: Vec<&Relation> = {
            let map = map.lock();
            let now = Instant::now();
            let fresh = |n: &Relation| map.get(n).filter(|c| now.saturating_duration_since(c.at) <= self.ttl);
            // Every name known and fresh (the steady state): one look-up each, under one lock.
            if let Some(known) = names.iter().map(|n| fresh(n).map(|c| c.value)).collect::<Option<Vec<V>>>() {
                return Ok(known);
            }
            names.iter().filter(|n| fresh(n).is_none()).collect()
        };
        if !missing.is_empty() {
            let fetched =
                tokio::time::timeout(LOOKUP_TIMEOUT, fetch(&missing)).await.map_err(|_| CatalogError::Timeout)??;
            let mut map = map.lock();
            for (name, value) in fetched {
                keep(&mut map, name, value);
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
            keep(&mut d.types.lock(), name.clone(), v);
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

    /// Whether `user`'s sessions in `db` start with `default_transaction_isolation` at
    /// SERIALIZABLE — by `ALTER ROLE`/`ALTER DATABASE ... SET`, or the server's configuration —
    /// which a standby refuses. (What a session sets itself it knows.) The server's value is
    /// read from the catalog's own session, which shows it unless the catalog's login has a
    /// role or database default of its own: then it is not known, and counts as SERIALIZABLE.
    pub async fn serializable_by_default(&self, db: &str, user: &str) -> Result<bool, CatalogError> {
        const SQL: &str = "SELECT coalesce((SELECT setting = 'serializable' \
                 OR source NOT IN ('default', 'environment variable', 'configuration file', 'command line') \
               FROM pg_catalog.pg_settings WHERE name = 'default_transaction_isolation'), true) OR EXISTS ( \
               SELECT 1 FROM pg_catalog.pg_db_role_setting s, unnest(s.setconfig) c \
               WHERE s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database WHERE datname = $1)) \
                 AND s.setrole IN (0, (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $2)) \
                 AND lower(c) LIKE 'default_transaction_isolation=%serializable%')";
        let d = self.db(db);
        if let Some(c) = d.serializable.lock().get(user).filter(|c| c.at.elapsed() <= self.ttl) {
            return Ok(c.value);
        }
        let fetch = async {
            let client = self.client(db).await?;
            Ok::<_, CatalogError>(client.query_one(SQL, &[&db, &user]).await?.get::<_, bool>(0))
        };
        let value = tokio::time::timeout(LOOKUP_TIMEOUT, fetch).await.map_err(|_| CatalogError::Timeout)??;
        keep(&mut d.serializable.lock(), user.to_owned(), value);
        Ok(value)
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
