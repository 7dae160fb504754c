//! The classification cache, so the hot path does not re-parse (see [`Classifier`]).

use std::sync::Arc;

use super::classify::{Classified, classify};
use super::tree::TIME_WORDS;

/// A cache of classifications.
///
/// Keyed by SQL text, and also by shape: the text with its literal values replaced by `$n`
/// (`pg_query::normalize`, about a tenth of the cost of a classification, and exact — unlike a
/// fingerprint, which would also merge `'t'::regclass` with `'t'::int`). A classification
/// depends on a statement's shape, not on its literal values, so statements that differ only in
/// literals (the simple protocol with inlined values) share one full parse — except where a
/// literal matters: time words such as `'now'`, and the setting a `set_config` call names.
/// Texts that may contain either are always classified in full.
pub struct Classifier {
    by_text: quick_cache::sync::Cache<Arc<str>, Arc<Vec<Classified>>>,
    by_shape: quick_cache::sync::Cache<Arc<str>, Arc<Vec<Classified>>>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier { by_text: quick_cache::sync::Cache::new(10_000), by_shape: quick_cache::sync::Cache::new(10_000) }
    }
}

/// Whether the classification may depend on a literal's value (a cheap, case-insensitive,
/// over-inclusive check).
fn literals_matter(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    lower.contains("set_config") || TIME_WORDS.iter().any(|w| lower.contains(w))
}

impl Classifier {
    pub fn classify(&self, sql: &str) -> Arc<Vec<Classified>> {
        if let Some(c) = self.by_text.get(sql) {
            return c;
        }
        let shape = (!literals_matter(sql)).then(|| pg_query::normalize(sql).ok()).flatten().map(Arc::<str>::from);
        let c = match shape.as_ref().and_then(|s| self.by_shape.get(s)) {
            Some(c) => c,
            None => {
                let c = Arc::new(classify(sql));
                if let Some(s) = shape {
                    self.by_shape.insert(s, c.clone());
                }
                c
            }
        };
        self.by_text.insert(Arc::from(sql), c.clone());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Kind;

    #[test]
    fn statements_differing_in_literals_share_a_classification_unless_literals_matter() {
        let c = Classifier::default();
        let a = c.classify("SELECT v FROM t WHERE id = 1");
        let b = c.classify("SELECT v FROM t WHERE id = 2");
        assert!(Arc::ptr_eq(&a, &b));
        let plain = c.classify("SELECT v FROM t WHERE d = '2024-01-01'");
        let now = c.classify("SELECT v FROM t WHERE d = 'now'");
        assert!(!plain[0].stable_builtins);
        assert!(now[0].stable_builtins, "a time word is never taken from the shape cache");
        let w = c.classify("UPDATE t SET v = 'x' WHERE id = 1");
        assert_eq!(w[0].kind, Kind::Write);
        let int = c.classify("SELECT 'x'::int");
        let reg = c.classify("SELECT 'x'::regclass");
        assert_ne!(int[0].types, reg[0].types, "casts to other types are other shapes");
        let a = c.classify("SELECT set_config('app.a', '1', false)");
        let b = c.classify("SELECT set_config('app.b', '1', false)");
        assert_eq!(
            (a[0].settings.custom.as_slice(), b[0].settings.custom.as_slice()),
            (&["app.a".to_owned()][..], &["app.b".to_owned()][..])
        );
    }
}
