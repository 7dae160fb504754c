//! What a warm start re-runs (`[cache] warm_file`): for each statement that filled the cache,
//! its recipe — database and user, the startup parameters and settings its session ran it
//! under, the SQL text and, for the extended protocol, the parameters — but never its rows.
//! Recipes are kept in a bounded table keyed like the entries they filled; on shutdown those
//! whose entries were hit most are written to the file, and at start they are re-run
//! ([`crate::session::warm`]), rate-limited, each filled as a client's would be.
//!
//! The file holds parameter values and setting values (a tenant id, say): it is written
//! readable by pgcache's user only, replaced atomically, and a file that cannot be read is
//! reported and ignored.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Key, Store};

/// The file format's version: a file of another version is ignored.
const VERSION: u32 = 1;

/// How to compute one entry again, away from the session that filled it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    pub database: String,
    pub user: String,
    /// The client's startup parameters, in order.
    pub startup: Vec<(String, String)>,
    /// The session's settings to apply with `set_config` (its role among them).
    pub settings: Vec<(String, String)>,
    pub sql: String,
    /// `None`: the simple protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended: Option<Extended>,
}

/// The parts of an extended-protocol request (parameters base64-encoded in the file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extended {
    pub param_types: Vec<u32>,
    pub param_formats: Vec<i16>,
    #[serde(with = "params")]
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
}

impl Recipe {
    /// Roughly what it costs to keep: recipes larger than [`MAX_RECIPE_BYTES`] are not kept.
    fn size(&self) -> usize {
        let pairs = |v: &[(String, String)]| v.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>();
        let params = self.extended.as_ref().map_or(0, |e| e.params.iter().flatten().map(Bytes::len).sum());
        self.sql.len() + pairs(&self.startup) + pairs(&self.settings) + params
    }
}

/// Larger recipes (a huge IN list, a large parameter) are not worth a warm start.
const MAX_RECIPE_BYTES: usize = 64 << 10;

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    statements: Vec<Recipe>,
}

/// The recipes of recent fills, bounded: four times the statements the file keeps, so the
/// hottest can be chosen on shutdown. The table evicts as the cache does (by recency and
/// frequency of insertion), and each recipe is bounded in size.
pub struct Recipes {
    table: quick_cache::sync::Cache<Key, Arc<Recipe>>,
}

impl std::fmt::Debug for Recipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipes").field("len", &self.table.len()).finish()
    }
}

impl Recipes {
    pub fn new(statements: usize) -> Recipes {
        Recipes { table: quick_cache::sync::Cache::new((statements.max(1)).saturating_mul(4)) }
    }

    /// Notes how the entry under `key` is computed (called when a fill is decided).
    pub fn record(&self, key: &Key, recipe: impl FnOnce() -> Recipe) {
        if self.table.get(key).is_some() {
            return;
        }
        let recipe = recipe();
        if recipe.size() <= MAX_RECIPE_BYTES {
            self.table.insert(key.clone(), Arc::new(recipe));
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The recipes whose entries the cache still holds, most hit first, at most `n`.
    pub fn hottest(&self, store: &Store, n: usize) -> Vec<Recipe> {
        let mut held: Vec<(u64, Arc<Recipe>)> = self
            .table
            .iter()
            .filter_map(|(key, recipe)| {
                let (entry, _) = store.get(&key)?;
                Some((entry.hits.load(std::sync::atomic::Ordering::Relaxed), recipe))
            })
            .collect();
        held.sort_by_key(|h| std::cmp::Reverse(h.0));
        held.into_iter().take(n).map(|(_, r)| Recipe::clone(&r)).collect()
    }
}

/// Writes `statements` to `path`: to a temporary file beside it, readable by this user only,
/// then renamed over it.
pub fn save(path: &Path, statements: Vec<Recipe>) -> std::io::Result<()> {
    let text = serde_json::to_vec(&File { version: VERSION, statements })?;
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads the statements written by [`save`]: none when there is no file.
pub fn load(path: &Path) -> Result<Vec<Recipe>, LoadError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LoadError::Read(e)),
    };
    let file: File = serde_json::from_slice(&text)?;
    if file.version != VERSION {
        return Err(LoadError::Version(file.version));
    }
    Ok(file.statements)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the warm file: {0}")]
    Read(std::io::Error),
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
            startup: vec![("application_name".into(), "x".into())],
            settings: vec![("TimeZone".into(), "Asia/Kathmandu".into())],
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
        assert_eq!(load(&path).unwrap(), Vec::new(), "no file: nothing to warm");
        let written = vec![recipe("SELECT $1"), Recipe { extended: None, ..recipe("SELECT 1") }];
        save(&path, written.clone()).unwrap();
        assert_eq!(load(&path).unwrap(), written);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, b"{\"version\": 9, \"statements\": []}").unwrap();
        assert!(matches!(load(&path), Err(LoadError::Version(9))));
        std::fs::write(&path, b"not json").unwrap();
        assert!(matches!(load(&path), Err(LoadError::Parse(_))));
    }

    #[test]
    fn oversized_recipes_are_not_kept() {
        let recipes = Recipes::new(10);
        recipes.record(&Key(Bytes::from_static(b"a")), || recipe("SELECT 1"));
        recipes.record(&Key(Bytes::from_static(b"b")), || recipe(&"x".repeat(MAX_RECIPE_BYTES + 1)));
        assert_eq!(recipes.len(), 1);
    }
}
