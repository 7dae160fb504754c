//! User-defined operators: an operator runs its function (`pg_operator.oprcode`), so a
//! statement using `a ~=~ b` is only as cacheable as that function, and a volatile one may
//! write anything. The statement names the operator but not the operand types that pick among
//! its overloads, so every operator of that name outside `pg_catalog` counts, the worst one
//! deciding. The built-in operators are left out: none is volatile, and the stable ones (time
//! zone arithmetic) depend only on settings, which the cache key holds.

use std::time::Instant;

use super::{Cached, Catalog, CatalogError, FunctionInfo, LOOKUP_TIMEOUT, Relation, Volatility};

impl Catalog {
    /// What each operator name (its schema when written `OPERATOR(schema.op)`) may do, in
    /// order; a name with no user-defined operator is immutable.
    pub async fn operators(&self, db: &str, names: &[Relation]) -> Result<Vec<FunctionInfo>, CatalogError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let d = self.db(db);
        let missing: Vec<&Relation> = {
            let map = d.operators.lock();
            names.iter().filter(|n| map.get(*n).is_none_or(|c| c.at.elapsed() > self.ttl)).collect()
        };
        if !missing.is_empty() {
            let fetched = tokio::time::timeout(LOOKUP_TIMEOUT, self.fetch_operators(db, &missing))
                .await
                .map_err(|_| CatalogError::Timeout)??;
            let mut map = d.operators.lock();
            for (name, info) in fetched {
                map.insert(name, Cached { value: info, at: Instant::now() });
            }
        }
        let map = d.operators.lock();
        Ok(names.iter().map(|n| map.get(n).map_or(IMMUTABLE, |c| c.value)).collect())
    }

    async fn fetch_operators(
        &self,
        db: &str,
        names: &[&Relation],
    ) -> Result<Vec<(Relation, FunctionInfo)>, CatalogError> {
        let client = self.client(db).await?;
        let plain: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
        let rows = client
            .query(
                "SELECT n.nspname::text, o.oprname::text, p.provolatile::text \
                 FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace \
                 JOIN pg_proc p ON p.oid = o.oprcode \
                 WHERE o.oprname = ANY($1) AND n.nspname <> 'pg_catalog'",
                &[&plain],
            )
            .await?;
        Ok(names
            .iter()
            .map(|want| {
                let worst = rows
                    .iter()
                    .filter(|row| {
                        let (schema, name): (String, String) = (row.get(0), row.get(1));
                        name == want.name && want.schema.as_ref().is_none_or(|s| *s == schema)
                    })
                    .map(|row| match row.get::<_, String>(2).as_str() {
                        "i" => Volatility::Immutable,
                        "s" => Volatility::Stable,
                        _ => Volatility::Volatile,
                    })
                    .max()
                    .unwrap_or(Volatility::Immutable);
                ((*want).clone(), FunctionInfo { volatility: worst, may_write: worst == Volatility::Volatile })
            })
            .collect())
    }
}

const IMMUTABLE: FunctionInfo = FunctionInfo { volatility: Volatility::Immutable, may_write: false };
