//! The live rule set: swapped atomically (readers take an `Arc` snapshot and keep it for the
//! statement they are serving), reloaded on SIGHUP, on `RELOAD`, and when the directory
//! changes. The directory is polled for changes in file names, sizes and modification times,
//! which also catches editors that replace files and Kubernetes ConfigMaps that swap a
//! symlink. A reload that fails validation keeps the previous rules and records the error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::{LoadError, RuleSet, load_dir};
use crate::metrics::Metrics;

/// The outcome of the last load attempt.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    pub at: SystemTime,
    pub error: Option<String>,
}

/// The rules in force.
pub struct Rules {
    dir: PathBuf,
    current: ArcSwap<RuleSet>,
    versions: AtomicU64,
    status: Mutex<ReloadStatus>,
    stamp: Mutex<Vec<(PathBuf, u64, Option<SystemTime>)>>,
    metrics: Option<Arc<Metrics>>,
}

impl Rules {
    /// Loads `dir`; an error here is fatal (the caller should refuse to start).
    pub fn load(dir: &Path, metrics: Option<Arc<Metrics>>) -> Result<Rules, LoadError> {
        let set = load_dir(dir, 1)?;
        tracing::info!(dir = %dir.display(), rules = set.rules.len(), "rules loaded");
        Ok(Rules {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(set),
            versions: AtomicU64::new(1),
            status: Mutex::new(ReloadStatus { at: SystemTime::now(), error: None }),
            stamp: Mutex::new(stamp(dir)),
            metrics,
        })
    }

    /// No rules: everything is forwarded (used when the default directory does not exist).
    pub fn empty(dir: &Path, metrics: Option<Arc<Metrics>>) -> Rules {
        Rules {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(RuleSet::default()),
            versions: AtomicU64::new(0),
            status: Mutex::new(ReloadStatus { at: SystemTime::now(), error: None }),
            stamp: Mutex::new(stamp(dir)),
            metrics,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A snapshot of the rules in force.
    pub fn current(&self) -> Arc<RuleSet> {
        self.current.load_full()
    }

    /// The rule set in force, for a moment (no reference count taken).
    pub fn peek(&self) -> arc_swap::Guard<Arc<RuleSet>> {
        self.current.load()
    }

    /// The version of the rule set in force.
    pub fn version(&self) -> u64 {
        self.current.load().version
    }

    /// Whether no rule is loaded (without taking a reference to the set).
    pub fn is_empty(&self) -> bool {
        self.current.load().rules.is_empty()
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.lock().clone()
    }

    /// Reloads the directory. On error the rules in force stay and the error is recorded.
    pub fn reload(&self) -> Result<usize, LoadError> {
        *self.stamp.lock() = stamp(&self.dir);
        let version = self.versions.fetch_add(1, Ordering::AcqRel) + 1;
        let result = load_dir(&self.dir, version);
        if let Some(metrics) = &self.metrics {
            metrics.rules_reloaded(result.is_ok());
        }
        let mut status = self.status.lock();
        status.at = SystemTime::now();
        match result {
            Ok(set) => {
                let n = set.rules.len();
                if self.install(set) {
                    tracing::info!(dir = %self.dir.display(), rules = n, "rules reloaded");
                } else {
                    tracing::info!(dir = %self.dir.display(), "rules reloaded meanwhile by a later reload, kept");
                }
                status.error = None;
                Ok(n)
            }
            Err(e) => {
                status.error = Some(e.to_string());
                tracing::error!(dir = %self.dir.display(), error = %e, "rule reload failed; keeping the previous rules");
                Err(e)
            }
        }
    }

    /// Puts `set` in force unless a set loaded after it already is: reloads can run at once
    /// (the watcher, SIGHUP, the console's `RELOAD`), and the one that read the directory last
    /// — the higher version — must win whichever finishes first. Returns whether it did.
    fn install(&self, set: RuleSet) -> bool {
        let set = Arc::new(set);
        let mut installed = false;
        self.current.rcu(|current| {
            installed = current.version < set.version;
            if installed { set.clone() } else { current.clone() }
        });
        installed
    }

    /// Reloads whenever the directory's contents change, checking every `interval`.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = stamp(&self.dir);
            let changed = *self.stamp.lock() != now;
            if changed {
                let _ = self.reload();
            }
        }
    }
}

/// Name, size and modification time of every rule file, following symlinks.
fn stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| std::fs::metadata(&p).ok().map(|m| (p, m.len(), m.modified().ok())))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "[[rule]]\nname = \"a\"\nmatch = { tables = [\"t\"] }\nttl = \"5s\"\n";

    /// A directory holding one good rule file (`r.toml`), and its rules loaded.
    fn loaded() -> (tempfile::TempDir, Rules) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("r.toml"), GOOD).expect("write");
        let rules = Rules::load(dir.path(), None).expect("loads");
        (dir, rules)
    }

    #[test]
    fn bad_reload_keeps_the_old_rules() {
        let (dir, rules) = loaded();
        let before = rules.current();
        std::fs::write(dir.path().join("r.toml"), "[[rule]]\nname = \"a\"\n").expect("write");
        assert!(rules.reload().is_err());
        assert!(Arc::ptr_eq(&before, &rules.current()), "old rules kept");
        assert!(rules.status().error.is_some_and(|e| e.contains("r.toml")));
        std::fs::write(dir.path().join("r.toml"), GOOD.replace("\"a\"", "\"b\"")).expect("write");
        assert_eq!(rules.reload().expect("valid again"), 1);
        assert_eq!(rules.current().rules[0].name, "b");
        assert!(rules.current().version > before.version);
        assert!(rules.status().error.is_none());
    }

    #[test]
    fn a_reload_that_finishes_after_a_later_one_does_not_undo_it() {
        let (dir, rules) = loaded();
        let v = rules.version();
        let earlier = load_dir(dir.path(), v + 1).expect("loads");
        std::fs::write(dir.path().join("r.toml"), GOOD.replace("\"a\"", "\"b\"")).expect("write");
        let later = load_dir(dir.path(), v + 2).expect("loads");
        assert!(rules.install(later));
        assert!(!rules.install(earlier), "read before the later one: not put in force");
        assert_eq!((rules.version(), rules.current().rules[0].name.as_str()), (v + 2, "b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_is_picked_up() {
        let (dir, rules) = loaded();
        let rules = Arc::new(rules);
        tokio::spawn(rules.clone().watch(Duration::from_secs(1)));
        std::fs::write(dir.path().join("s.toml"), GOOD.replace("\"a\"", "\"c\"").replace("\"t\"", "\"u\""))
            .expect("write");
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::yield_now().await;
        }
        assert_eq!(rules.current().rules.len(), 2);
    }
}
