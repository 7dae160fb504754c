//! The SCRAM verifiers clients are checked against, as Postgres stores them: read with the
//! auth query (run as the auth user, by default the upstream URL's, on a connection of its
//! own) or from a userlist file, and kept for `auth.verifier_ttl` — a failed log-in marks the
//! role's as due, so a password changed in Postgres works through pgcache at its next attempt.
//!
//! Role names come from clients that have not logged in yet, so a flood of made-up names must
//! not lock real users out: roles with a verifier and names without one are kept apart (at most
//! [`MAX_ROLES`] of each, least recently used first out), so made-up names only evict each
//! other; a role whose verifier cannot be read again (the auth query fails or times out) keeps
//! the one last read; and a log-in whose verifier cannot be read at all is told so (08006),
//! not that its password is wrong.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::config::{Password, VerifierSource};
use crate::protocol::scram::Verifier;

use super::Endpoint;

/// At most this many roles' verifiers (or their absence) are kept.
pub const MAX_ROLES: usize = 10_000;
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Postgres's `scram_iterations` default.
const DEFAULT_ITERATIONS: u32 = 4096;

/// Why a verifier could not be read (the log-in fails as for a wrong password; this is
/// logged for the operator).
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("cannot connect for the auth query: {0}")]
    Connect(String),
    #[error("the auth query failed: {0}")]
    Query(String),
    #[error("the auth query timed out")]
    Timeout,
    #[error("userlist {path}: line {line}: {why}")]
    Userlist { path: String, line: usize, why: String },
}

/// A role's verifier as last read, and whether it is due to be read again.
#[derive(Clone)]
struct Read {
    verifier: Verifier,
    at: Instant,
    due: bool,
}

/// Verifiers by role.
pub struct Verifiers {
    source: VerifierSource,
    endpoint: Arc<Endpoint>,
    /// The auth user's password (the upstream URL's, when it is that user).
    password: Option<Password>,
    ttl: Duration,
    read: quick_cache::sync::Cache<String, Read>,
    /// Names with no verifier pgcache can use (no such role, cannot log in, expired, an md5
    /// hash or no password), and when that was read.
    absent: quick_cache::sync::Cache<String, Instant>,
    client: tokio::sync::Mutex<Option<Client>>,
    /// The roles of a userlist file.
    userlist: std::collections::HashMap<String, Verifier>,
    /// The iteration count of the verifier last read: the mock verifier of a role that has
    /// none offers it, so that what pgcache answers does not tell roles apart.
    iterations: AtomicU32,
}

impl Verifiers {
    pub fn new(
        source: VerifierSource,
        endpoint: Arc<Endpoint>,
        password: Option<Password>,
        ttl: Duration,
    ) -> Result<Verifiers, VerifierError> {
        let userlist = match &source {
            VerifierSource::Userlist(path) => userlist(path)?,
            VerifierSource::Query { .. } => Default::default(),
        };
        Ok(Verifiers {
            source,
            endpoint,
            password,
            ttl,
            read: quick_cache::sync::Cache::new(MAX_ROLES),
            absent: quick_cache::sync::Cache::new(MAX_ROLES),
            client: tokio::sync::Mutex::new(None),
            iterations: AtomicU32::new(
                userlist.values().next().map_or(DEFAULT_ITERATIONS, |v: &Verifier| v.iterations),
            ),
            userlist,
        })
    }

    /// The iteration count real verifiers have (Postgres's default until one is read).
    pub fn iterations(&self) -> u32 {
        self.iterations.load(Ordering::Relaxed)
    }

    /// The verifier of `role` (`None`: it has none pgcache can use), from what was read within
    /// the TTL. If it cannot be read again, the one last read is used.
    pub async fn get(&self, role: &str) -> Result<Option<Verifier>, VerifierError> {
        let query = match &self.source {
            VerifierSource::Userlist(_) => return Ok(self.userlist.get(role).cloned()),
            VerifierSource::Query { query, .. } => query,
        };
        let known = self.read.get(role);
        match &known {
            Some(r) if !r.due && r.at.elapsed() < self.ttl => return Ok(Some(r.verifier.clone())),
            None if self.absent.get(role).is_some_and(|at| at.elapsed() < self.ttl) => return Ok(None),
            _ => {}
        }
        let read = tokio::time::timeout(QUERY_TIMEOUT, self.query(query, role))
            .await
            .map_err(|_| VerifierError::Timeout)
            .and_then(|r| r);
        match (read, known) {
            (Ok(Some(verifier)), _) => {
                self.iterations.store(verifier.iterations, Ordering::Relaxed);
                self.absent.remove(role);
                self.read.insert(role.to_owned(), Read { verifier: verifier.clone(), at: Instant::now(), due: false });
                Ok(Some(verifier))
            }
            (Ok(None), _) => {
                self.read.remove(role);
                self.absent.insert(role.to_owned(), Instant::now());
                Ok(None)
            }
            (Err(e), Some(last)) => {
                tracing::warn!(role, error = %e, "could not read the role's SCRAM verifier again; using the last one read");
                Ok(Some(last.verifier))
            }
            (Err(e), None) => Err(e),
        }
    }

    /// A log-in as `role` failed: its verifier is read again at the next attempt (the password
    /// may have changed in Postgres).
    pub fn due(&self, role: &str) {
        if let Some(mut r) = self.read.get(role) {
            r.due = true;
            self.read.insert(role.to_owned(), r);
        }
    }

    async fn query(&self, query: &str, role: &str) -> Result<Option<Verifier>, VerifierError> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = Some(self.connect().await?);
        }
        let client = slot.as_ref().expect("just connected");
        let rows = client.query(query, &[&role]).await.map_err(|e| {
            *slot = None;
            VerifierError::Query(e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()))
        });
        let rows = rows?;
        // The verifier is the last column (PgBouncer's queries return the name first).
        let secret =
            rows.first().and_then(|r| r.try_get::<_, Option<String>>(r.len().saturating_sub(1)).ok().flatten());
        Ok(secret.as_deref().and_then(Verifier::parse))
    }

    async fn connect(&self) -> Result<Client, VerifierError> {
        let VerifierSource::Query { user, database, .. } = &self.source else {
            return Err(VerifierError::Connect("no auth query".into()));
        };
        let stream = self.endpoint.connect().await.map_err(|e| VerifierError::Connect(e.to_string()))?;
        let mut config = tokio_postgres::Config::new();
        config
            .user(user)
            .dbname(database)
            .application_name("pgcache auth")
            .ssl_mode(tokio_postgres::config::SslMode::Disable);
        if let Some(p) = &self.password {
            config.password(p.expose());
        }
        let (client, connection) =
            config.connect_raw(stream, NoTls).await.map_err(|e| VerifierError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "auth query connection ended");
            }
        });
        Ok(client)
    }
}

/// Reads a userlist: one `"role" "SCRAM-SHA-256$..."` per line (a `""` inside quotes is a
/// quote), blank lines and `;` or `#` comments ignored.
fn userlist(path: &Path) -> Result<std::collections::HashMap<String, Verifier>, VerifierError> {
    let shown = path.display().to_string();
    let fail = |line: usize, why: &str| VerifierError::Userlist { path: shown.clone(), line, why: why.to_owned() };
    let text = std::fs::read_to_string(path).map_err(|e| fail(0, &e.to_string()))?;
    let mut out = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let fields = quoted(trimmed).ok_or_else(|| fail(line_no, "expected \"role\" \"secret\""))?;
        let [role, secret] =
            <[String; 2]>::try_from(fields).map_err(|_| fail(line_no, "expected \"role\" \"secret\""))?;
        let verifier = Verifier::parse(&secret)
            .ok_or_else(|| fail(line_no, "the secret must be a SCRAM-SHA-256 verifier (SCRAM-SHA-256$...)"))?;
        out.insert(role, verifier);
    }
    Ok(out)
}

/// The double-quoted fields of a line.
fn quoted(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(fields),
            Some('"') => {}
            Some(_) => return None,
        }
        let mut field = String::new();
        loop {
            match chars.next()? {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => break,
                c => field.push(c),
            }
        }
        fields.push(field);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userlists_hold_verifiers_only() {
        let v = Verifier::from_password("pw", b"0123456789abcdef", 4096).encode();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("userlist.txt");
        std::fs::write(&path, format!("; comment\n\"app\" \"{v}\"\n\n\"we\"\"ird\" \"{v}\"\n")).unwrap();
        let list = userlist(&path).unwrap();
        assert!(list.contains_key("app") && list.contains_key("we\"ird"));
        std::fs::write(&path, "\"app\" \"md5abc\"\n").unwrap();
        let e = userlist(&path).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("SCRAM-SHA-256"), "{e}");
        std::fs::write(&path, "app secret\n").unwrap();
        assert!(userlist(&path).is_err());
    }
}
