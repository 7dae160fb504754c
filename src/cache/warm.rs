//! What a warm start re-runs (`[cache] warm_file`): for each statement that filled the cache,
//! its recipe — database and user, the startup parameters, settings and tracked custom
//! setting names its session ran it under, the SQL text and, for the extended protocol, the
//! parameters — but never its rows. A recipe lives on the entry it filled (weighed with it
//! within `cache.max_bytes`, evicted with it); on shutdown the recipes of the most-hit entries,
//! with the file's statements not yet re-run, are written to the file, and at start they are
//! re-run ([`crate::session::warm`]), rate-limited, each filled as a client's would be.
//!
//! The file holds parameter values and setting values (a tenant id, say), and says what
//! pgcache runs as which role: it is written readable by pgcache's user only (a fresh
//! temporary file renamed over it), and a file that others may write, that is too large or
//! not pgcache's, is reported and ignored, as is a recipe that is not self-consistent.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::Store;

/// The file format's version: a file of another version is ignored.
const VERSION: u32 = 1;

/// Larger recipes (a huge IN list, a large parameter) are not worth a warm start.
pub const MAX_RECIPE_BYTES: usize = 64 << 10;

/// A larger file is not read.
const MAX_FILE_BYTES: u64 = 256 << 20;

/// How to compute one entry again, away from the session that filled it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Recipe {
    pub database: String,
    pub user: String,
    /// The client's startup parameters, in order.
    pub startup: Vec<(String, String)>,
    /// The session's settings to apply with `set_config` (its role among them).
    pub settings: Vec<(String, String)>,
    /// The custom settings the session tracked (set, reset or read by name): the key reads
    /// them, set or not.
    #[serde(default)]
    pub customs: Vec<String>,
    /// Those of them never defined in the session (they read as NULL, which a connection
    /// where another session defined them cannot show: it reads '').
    #[serde(default)]
    pub undefined: Vec<String>,
    pub sql: String,
    /// `None`: the simple protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended: Option<Extended>,
}

/// The parts of an extended-protocol request (parameters base64-encoded in the file).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Extended {
    pub param_types: Vec<u32>,
    pub param_formats: Vec<i16>,
    #[serde(with = "params")]
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
}

impl Recipe {
    /// The bytes of its text, names and values.
    pub fn size(&self) -> usize {
        let pairs = |v: &[(String, String)]| v.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>();
        let params = self.extended.as_ref().map_or(0, |e| e.params.iter().flatten().map(Bytes::len).sum());
        self.sql.len()
            + pairs(&self.startup)
            + pairs(&self.settings)
            + self.customs.iter().chain(&self.undefined).map(String::len).sum::<usize>()
            + params
    }

    /// Whether it can be re-run as it says: small enough, and its startup parameters name its
    /// own user and database (if any) and no replication connection.
    fn consistent(&self) -> bool {
        self.size() <= MAX_RECIPE_BYTES
            && !self.sql.contains('\0')
            && self.startup.iter().all(|(name, value)| match name.as_str() {
                "user" => *value == self.user,
                "database" => *value == self.database,
                "replication" => false,
                _ => true,
            })
    }
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    statements: Vec<Recipe>,
}

/// The file's statements not yet re-run (waiting for their role's log-in, or for Postgres):
/// written back on shutdown, so a restart before they ran does not lose them.
#[derive(Debug, Default)]
pub struct Unrun(Mutex<Vec<Recipe>>);

impl Unrun {
    pub fn set(&self, recipes: Vec<Recipe>) {
        *self.0.lock() = recipes;
    }

    pub fn get(&self) -> Vec<Recipe> {
        self.0.lock().clone()
    }

    pub fn remove(&self, recipe: &Recipe) {
        self.0.lock().retain(|r| r != recipe);
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }
}

/// The recipes of the entries the cache holds (and a write has not made old), most hit first, then those not yet re-run;
/// each once, at most `n`.
pub fn hottest(store: &Store, unrun: &Unrun, n: usize) -> Vec<Recipe> {
    let mut held: Vec<_> = store
        .entries()
        .into_iter()
        .filter(|(_, e)| !e.invalidated())
        .filter_map(|(_, e)| Some((e.hits.load(std::sync::atomic::Ordering::Relaxed), e.recipe.clone()?)))
        .collect();
    held.sort_by_key(|h| std::cmp::Reverse(h.0));
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for recipe in held.into_iter().map(|(_, r)| Recipe::clone(&r)).chain(unrun.get()) {
        if out.len() >= n {
            break;
        }
        if seen.insert(recipe.clone()) {
            out.push(recipe);
        }
    }
    out
}

/// Writes `statements` to `path`: to a new temporary file beside it (created readable by
/// this user only, never through a link), then renamed over it.
pub fn save(path: &Path, statements: Vec<Recipe>) -> std::io::Result<()> {
    let text = serde_json::to_vec(&File { version: VERSION, statements })?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&text)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads the statements written by [`save`] (none when there is no file), at most `n`;
/// recipes that are not self-consistent are left out and counted.
pub fn load(path: &Path, n: usize) -> Result<(Vec<Recipe>, usize), LoadError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(LoadError::Read(e)),
    };
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(LoadError::Writable);
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge(meta.len()));
    }
    let text = std::fs::read(path).map_err(LoadError::Read)?;
    let file: File = serde_json::from_slice(&text)?;
    if file.version != VERSION {
        return Err(LoadError::Version(file.version));
    }
    let total = file.statements.len();
    let mut kept: Vec<Recipe> = file.statements.into_iter().filter(Recipe::consistent).collect();
    let dropped = total - kept.len();
    kept.truncate(n);
    Ok((kept, dropped))
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the warm file: {0}")]
    Read(std::io::Error),
    #[error("the warm file may be written by other users (it says what pgcache runs as whom): chmod go-w")]
    Writable,
    #[error("the warm file is {0} bytes, more than pgcache writes")]
    TooLarge(u64),
    #[error("the warm file is not pgcache's: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("the warm file has format version {0}; this pgcache writes {VERSION}")]
    Version(u32),
}

/// Parameters as base64 strings, SQL NULL as `null`.
mod params {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(params: &[Option<Bytes>], s: S) -> Result<S::Ok, S::Error> {
        let encoded: Vec<Option<String>> = params.iter().map(|p| p.as_ref().map(|b| STANDARD.encode(b))).collect();
        encoded.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<Bytes>>, D::Error> {
        let encoded: Vec<Option<String>> = Vec::deserialize(d)?;
        encoded
            .into_iter()
            .map(|p| match p {
                Some(text) => STANDARD.decode(text).map(|b| Some(Bytes::from(b))).map_err(serde::de::Error::custom),
                None => Ok(None),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(sql: &str) -> Recipe {
        Recipe {
            database: "app".into(),
            user: "u".into(),
            startup: vec![("user".into(), "u".into()), ("application_name".into(), "x".into())],
            settings: vec![("TimeZone".into(), "Asia/Kathmandu".into())],
            customs: vec!["app.tenant".into()],
            undefined: vec!["app.tenant".into()],
            sql: sql.into(),
            extended: Some(Extended {
                param_types: vec![23],
                param_formats: vec![1],
                params: vec![Some(Bytes::from_static(&[0, 0, 0, 7])), None, Some(Bytes::new())],
                result_formats: vec![],
            }),
        }
    }

    #[test]
    fn the_file_round_trips_binary_parameters_and_nulls_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warm.json");
        assert_eq!(load(&path, 10).unwrap(), (Vec::new(), 0), "no file: nothing to warm");
        let written = vec![recipe("SELECT $1"), Recipe { extended: None, ..recipe("SELECT 1") }];
        save(&path, written.clone()).unwrap();
        assert_eq!(load(&path, 10).unwrap(), (written.clone(), 0));
        assert_eq!(load(&path, 1).unwrap(), (written[..1].to_vec(), 0), "at most warm_statements");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"{\"version\": 9, \"statements\": []}").unwrap();
        assert!(matches!(load(&path, 10), Err(LoadError::Version(9))));
        std::fs::write(&path, b"not json").unwrap();
        assert!(matches!(load(&path, 10), Err(LoadError::Parse(_))));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        assert!(matches!(load(&path, 10), Err(LoadError::Writable)));
    }

    #[test]
    fn recipes_that_do_not_say_what_they_run_as_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warm.json");
        let other_user = Recipe { startup: vec![("user".into(), "postgres".into())], ..recipe("SELECT 1") };
        let replication = Recipe { startup: vec![("replication".into(), "database".into())], ..recipe("SELECT 2") };
        let huge = recipe(&"x".repeat(MAX_RECIPE_BYTES + 1));
        save(&path, vec![other_user, recipe("SELECT 3"), replication, huge]).unwrap();
        assert_eq!(load(&path, 10).unwrap(), (vec![recipe("SELECT 3")], 3));
    }
}
