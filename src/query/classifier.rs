//! The classification cache, so the hot path does not re-parse (see [`Classifier`]).

use std::sync::Arc;

use super::classify::{Classified, TIME_WORDS, classify, fingerprint};

/// A cache of classifications.
///
/// Keyed by SQL text, and also by fingerprint: a classification depends on a statement's
/// shape (kinds, relations, functions, clauses), not on its literal values — with one
/// exception, literals such as `'now'` — so statements that differ only in literals (the simple
/// protocol with inlined values) share one full parse. A fingerprint costs about a tenth of a
/// classification. Text containing a time word is always classified in full. (Fingerprints are
/// 64-bit; an accidental collision between two statement shapes is about as likely as a few
/// in 10^8 among a million distinct shapes.)
pub struct Classifier {
    by_text: quick_cache::sync::Cache<Arc<str>, Arc<Vec<Classified>>>,
    by_shape: quick_cache::sync::Cache<u64, Arc<Vec<Classified>>>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier { by_text: quick_cache::sync::Cache::new(10_000), by_shape: quick_cache::sync::Cache::new(10_000) }
    }
}

/// Whether the text may hold a time word (a cheap, case-insensitive, over-inclusive check).
fn mentions_time_word(sql: &str) -> bool {
    let lower = sql.to_ascii_lowercase();
    TIME_WORDS.iter().any(|w| lower.contains(w))
}

impl Classifier {
    pub fn classify(&self, sql: &str) -> Arc<Vec<Classified>> {
        if let Some(c) = self.by_text.get(sql) {
            return c;
        }
        let shape = (!mentions_time_word(sql)).then(|| fingerprint(sql)).flatten();
        let c = match shape.and_then(|fp| self.by_shape.get(&fp)) {
            Some(c) => c,
            None => {
                let c = Arc::new(classify(sql));
                if let Some(fp) = shape {
                    self.by_shape.insert(fp, c.clone());
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
    fn statements_differing_in_literals_share_a_classification_unless_time_words() {
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
    }
}
