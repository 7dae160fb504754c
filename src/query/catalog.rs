//! Facts only the database knows, looked up over a tokio-postgres side connection per
//! database and cached: how volatile a function is, what a relation is (table, view, foreign
//! table, temporary), which relations a read of it depends on (partitions and inheritance
//! children and parents, a view's base relations), and what a write to it may also change
//! (foreign keys with cascading actions) or whether that is unknowable (user triggers, rules).
//!
//! A view's definition is classified like any query, so a view over `now()` or a volatile
//! function is not cacheable. Cached facts expire after a while and are dropped when DDL is
//! seen, so objects created or changed later are picked up. When the catalog cannot be reached
//! the caller fails open (does not cache) and, for writes, invalidates wider.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::backend::credentials::Known;
use crate::backend::{Credentials, Endpoint};
use crate::config::{Password, Upstream};

use super::classify::{Relation, classify};

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
    /// Writes to it run user triggers or rules: their effects are unknown.
    pub write_effects_unknown: bool,
    /// Why reading it must never be cached.
    pub never_cache: Option<String>,
    /// A view over it uses stable functions.
    pub stable: bool,
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
    relations: Mutex<HashMap<Relation, Cached<Arc<RelationInfo>>>>,
}

/// Catalog look-ups for every database.
pub struct Catalog {
    endpoint: Arc<Endpoint>,
    upstream: Upstream,
    credentials: Arc<Credentials>,
    dbs: Mutex<HashMap<String, Arc<DbCatalog>>>,
    ttl: Duration,
}

const SYSTEM_SCHEMAS: [&str; 2] = ["pg_catalog", "information_schema"];
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

impl Catalog {
    pub fn new(endpoint: Arc<Endpoint>, upstream: Upstream, credentials: Arc<Credentials>, ttl: Duration) -> Self {
        Catalog { endpoint, upstream, credentials, dbs: Mutex::new(HashMap::new()), ttl }
    }

    fn db(&self, db: &str) -> Arc<DbCatalog> {
        self.dbs.lock().entry(db.to_owned()).or_default().clone()
    }

    /// Forgets everything known about `db` (after DDL).
    pub fn invalidate(&self, db: &str) {
        let d = self.db(db);
        d.functions.lock().clear();
        d.relations.lock().clear();
    }

    async fn client(&self, db: &str) -> Result<Arc<Client>, CatalogError> {
        let d = self.db(db);
        let mut slot = d.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        // The upstream URL's login first; else any login clients have proven for this database.
        let mut logins = vec![(self.upstream.user.clone(), self.upstream.password.clone())];
        logins.extend(self.credentials.known_for_database(db).into_iter().map(|(user, known)| match known {
            Known::Password(p) => (user, Some(p)),
            Known::NoPassword => (user, None),
        }));
        let mut last = String::from("no login known for this database");
        for (user, password) in logins {
            match self.connect(db, &user, password.as_ref()).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(CatalogError::Connect(last))
    }

    async fn connect(&self, db: &str, user: &str, password: Option<&Password>) -> Result<Client, CatalogError> {
        let stream = self.endpoint.connect().await.map_err(|e| CatalogError::Connect(e.to_string()))?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(user)
            .dbname(db)
            .application_name("pgcache catalog")
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        if let Some(p) = password {
            config.password(p.expose());
        }
        let (client, connection) =
            config.connect_raw(stream, NoTls).await.map_err(|e| CatalogError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "catalog connection ended");
            }
        });
        Ok(client)
    }

    /// Volatility of each named function, in order.
    pub async fn functions(&self, db: &str, names: &[Relation]) -> Result<Vec<FunctionInfo>, CatalogError> {
        let d = self.db(db);
        let missing: Vec<&Relation> = {
            let map = d.functions.lock();
            names.iter().filter(|n| map.get(*n).is_none_or(|c| c.at.elapsed() > self.ttl)).collect()
        };
        if !missing.is_empty() {
            let fetched = tokio::time::timeout(LOOKUP_TIMEOUT, self.fetch_functions(db, &missing))
                .await
                .map_err(|_| CatalogError::Timeout)??;
            let mut map = d.functions.lock();
            for (name, info) in fetched {
                map.insert(name, Cached { value: info, at: Instant::now() });
            }
        }
        let map = d.functions.lock();
        Ok(names.iter().map(|n| map.get(n).map_or(UNKNOWN_FUNCTION, |c| c.value)).collect())
    }

    async fn fetch_functions(
        &self,
        db: &str,
        names: &[&Relation],
    ) -> Result<Vec<(Relation, FunctionInfo)>, CatalogError> {
        let client = self.client(db).await?;
        let plain: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
        let rows = client
            .query(
                "SELECT n.nspname::text, p.proname::text, p.provolatile::text \
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = ANY($1)",
                &[&plain],
            )
            .await?;
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
                ((*want).clone(), info.unwrap_or(UNKNOWN_FUNCTION))
            })
            .collect())
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
                   c.relhasrules OR EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), \
                   CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relname = $1 AND ($2::text IS NULL OR n.nspname = $2) AND c.relkind IN ('r','p','v','m','f')",
                &[&name.name, &name.schema],
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
        for row in rows {
            let (oid, schema, kind, persistence, triggers): (i64, String, String, String, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let viewdef: Option<String> = row.get(5);
            let me = Relation::new(Some(&schema), &name.name);
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
            for r in related(&client, oid, INHERITANCE).await? {
                reads.insert(r.clone());
                writes.insert(r);
            }
            for r in related(&client, oid, CASCADES).await? {
                writes.insert(r);
            }
            if let Some(def) = viewdef {
                self.add_view(db, &me, &def, depth, &mut info, &mut reads, &mut writes).await?;
            }
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
            if info.never_cache.is_none() {
                info.never_cache = base.never_cache.clone();
            }
        }
        Ok(())
    }
}

/// A function the catalog does not know: assume the worst.
const UNKNOWN_FUNCTION: FunctionInfo = FunctionInfo { volatility: Volatility::Volatile, may_write: true };

/// Inheritance/partition ancestors and descendants of relation `$1`.
const INHERITANCE: &str = "WITH RECURSIVE up(oid) AS ( \
        SELECT inhparent FROM pg_inherits WHERE inhrelid = $1::int8::oid \
        UNION SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid), \
    down(oid) AS ( \
        SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::int8::oid \
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN down ON i.inhparent = down.oid) \
    SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid IN (SELECT oid FROM up UNION SELECT oid FROM down)";

/// Relations whose rows change when rows of `$1` do, through foreign keys with ON DELETE or
/// ON UPDATE CASCADE / SET NULL / SET DEFAULT, transitively.
const CASCADES: &str = "WITH RECURSIVE fk(oid) AS ( \
        SELECT conrelid FROM pg_constraint WHERE confrelid = $1::int8::oid AND contype = 'f' \
          AND (confdeltype IN ('c','n','d') OR confupdtype IN ('c','n','d')) \
        UNION SELECT c.conrelid FROM pg_constraint c JOIN fk ON c.confrelid = fk.oid WHERE c.contype = 'f' \
          AND (c.confdeltype IN ('c','n','d') OR c.confupdtype IN ('c','n','d'))) \
    SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid IN (SELECT oid FROM fk)";

async fn related(client: &Client, oid: i64, sql: &str) -> Result<Vec<Relation>, CatalogError> {
    let rows = client.query(sql, &[&oid]).await?;
    Ok(rows.iter().map(|r| Relation::new(Some(r.get::<_, &str>(0)), r.get::<_, &str>(1))).collect())
}
