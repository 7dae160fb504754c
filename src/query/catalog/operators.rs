//! User-defined operators: an operator runs its function (`pg_operator.oprcode`), so a
//! statement using `a ~=~ b` is only as cacheable as that function, and a volatile one may
//! write anything. The statement names the operator but not the operand types that pick among
//! its overloads, so every operator of that name outside `pg_catalog` counts, the worst one
//! deciding. The built-in operators are left out: none is volatile, and the stable ones (time
//! zone arithmetic) depend only on settings, which the cache key holds.

use super::{Catalog, CatalogError, FunctionInfo, Relation, Volatility};

impl Catalog {
    /// What each operator name (its schema when written `OPERATOR(schema.op)`) may do, in
    /// order; a name with no user-defined operator is immutable.
    pub async fn operators(&self, db: &str, names: &[Relation]) -> Result<Vec<FunctionInfo>, CatalogError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let d = self.db(db);
        const SQL: &str = "SELECT n.nspname::text, o.oprname::text, p.provolatile::text \
                           FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace \
                           JOIN pg_proc p ON p.oid = o.oprcode \
                           WHERE o.oprname = ANY($1) AND n.nspname <> 'pg_catalog'";
        let fetch = async |missing: &[&Relation]| self.fetch_by_name(db, missing, SQL, IMMUTABLE).await;
        self.cached(&d.operators, names, IMMUTABLE, fetch).await
    }
}

/// A name no user-defined operator has: only built-in ones, which are not volatile.
const IMMUTABLE: FunctionInfo = FunctionInfo { volatility: Volatility::Immutable, may_write: false };
