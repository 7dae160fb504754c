//! The catalog's side connections to Postgres: one per database for its own look-ups, and
//! others on request (the peers' LISTEN link, bypass-trigger installs), each trying the upstream
//! URL's login first, then any login clients have proven for that database.

use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use crate::backend::Secret;
use crate::backend::credentials::Known;
use crate::config::Password;

use super::{Catalog, CatalogError, SideConnection};

impl Catalog {
    /// The catalog's own connection to `db`, opened when first needed or after it closed.
    pub(super) async fn client(&self, db: &str) -> Result<Arc<Client>, CatalogError> {
        let d = self.db(db);
        let mut slot = d.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.open_driven(db, "pgcache catalog").await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn open_as(
        &self,
        db: &str,
        user: &str,
        password: Option<&Password>,
        application_name: &str,
    ) -> Result<(Client, SideConnection), CatalogError> {
        let stream = self.endpoint.connect().await.map_err(|e| CatalogError::Connect(e.to_string()))?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(user)
            .dbname(db)
            .application_name(application_name)
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        if let Some(p) = password {
            config.password(p.expose());
        }
        config.connect_raw(stream, NoTls).await.map_err(|e| CatalogError::Connect(e.to_string()))
    }

    /// A connection of its own to `db`, with the same logins the catalog tries, whose
    /// connection half the caller drives (to read notifications).
    pub async fn open(&self, db: &str, application_name: &str) -> Result<(Client, SideConnection), CatalogError> {
        let mut last = String::from("no login known for this database");
        for (user, password) in self.logins(db) {
            match self.open_as(db, &user, password.as_ref(), application_name).await {
                Ok(pair) => return Ok(pair),
                Err(e) => last = e.to_string(),
            }
        }
        Err(CatalogError::Connect(last))
    }

    /// [`Catalog::open`], with the connection driven in the background.
    pub async fn open_client(&self, db: &str) -> Result<Client, CatalogError> {
        self.open_driven(db, "pgcache").await
    }

    async fn open_driven(&self, db: &str, application_name: &str) -> Result<Client, CatalogError> {
        let (client, connection) = self.open(db, application_name).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "side connection ended");
            }
        });
        Ok(client)
    }

    /// The logins to try for `db`: the upstream URL's, then any clients have proven with a
    /// password (tokio-postgres logs in with a password; SCRAM keys a client proved log in
    /// only pgcache's own backend connections).
    fn logins(&self, db: &str) -> Vec<(String, Option<Password>)> {
        let mut logins = vec![(self.upstream.user.clone(), self.upstream.password.clone())];
        logins.extend(self.credentials.known_for_database(db).into_iter().filter_map(|(user, known)| match known {
            Known::Secret(Secret::Password(p)) => Some((user, Some(p))),
            Known::Secret(Secret::Keys(_)) => None,
            Known::NoPassword => Some((user, None)),
        }));
        logins
    }
}
