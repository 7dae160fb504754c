//! Whether a role may read relations (`SELECT` on each, `USAGE` on its schema), as Postgres
//! would judge it: asked of the catalog and kept for the catalog's TTL, forgotten with the
//! other facts on DDL (`GRANT`, `REVOKE`). A rule that shares entries across roles serves one
//! to a role only once this says the role could have read it itself.

use std::time::Instant;

use super::{Cached, Catalog, CatalogError, LOOKUP_TIMEOUT};
use crate::query::Relation;

/// At most this many (role, relation) answers are kept per database.
const MAX_KEPT: usize = 10_000;

impl Catalog {
    /// Whether `role` may `SELECT` from every one of `relations` in `db` (schema-qualified;
    /// an unqualified one is never taken as readable).
    pub async fn may_select(&self, db: &str, role: &str, relations: &[Relation]) -> Result<bool, CatalogError> {
        let d = self.db(db);
        let mut missing = Vec::new();
        {
            let known = d.privileges.lock();
            for r in relations {
                if r.schema.is_none() {
                    return Ok(false);
                }
                match known.get(&(role.to_owned(), r.clone())) {
                    Some(c) if c.at.elapsed() <= self.ttl => {
                        if !c.value {
                            return Ok(false);
                        }
                    }
                    _ => missing.push(r),
                }
            }
        }
        if missing.is_empty() {
            return Ok(true);
        }
        let ask = async {
            let client = self.client(db).await?;
            let mut out = Vec::with_capacity(missing.len());
            for r in &missing {
                let schema = r.schema.as_deref().unwrap_or_default();
                let row = client
                    .query_one(
                        "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = $1) \
                           AND pg_catalog.has_schema_privilege($1, $2, 'USAGE') \
                           AND pg_catalog.has_table_privilege($1, \
                             pg_catalog.quote_ident($2) || '.' || pg_catalog.quote_ident($3), 'SELECT')",
                        &[&role, &schema, &r.name],
                    )
                    .await?;
                out.push(row.get::<_, bool>(0));
            }
            Ok::<_, CatalogError>(out)
        };
        let answers = tokio::time::timeout(LOOKUP_TIMEOUT, ask).await.map_err(|_| CatalogError::Timeout)??;
        let mut known = d.privileges.lock();
        if known.len() + answers.len() > MAX_KEPT {
            known.clear();
        }
        for (r, allowed) in missing.into_iter().zip(&answers) {
            known.insert((role.to_owned(), r.clone()), Cached { value: *allowed, at: Instant::now() });
        }
        Ok(answers.iter().all(|a| *a))
    }
}
