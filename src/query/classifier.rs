//! The classification cache, so the hot path does not re-parse (see [`Classifier`]).

use std::sync::Arc;

use super::classify::{Classified, classify};
use super::tree::TIME_WORDS;

/// A cache of classifications.
///
/// Keyed by SQL text, and also by shape: the text with each literal replaced by a marker of its
/// kind ([`shape`]: Postgres's own lexer, `pg_query::scan`, a few percent of the cost of
/// a classification; exact — unlike a fingerprint, which would also merge `'t'::regclass` with
/// `'t'::int` — and no coarser than `pg_query::normalize`, which costs a parse). A classification
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
/// over-inclusive check: one pass, no copy).
fn literals_matter(sql: &str) -> bool {
    static WORDS: std::sync::LazyLock<aho_corasick::AhoCorasick> = std::sync::LazyLock::new(|| {
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(TIME_WORDS.iter().copied().chain(["set_config"]))
            .expect("fixed patterns build")
    });
    WORDS.is_match(sql)
}

/// `sql` with every literal (string, number, bit string) replaced by a marker of its kind. The
/// markers hold a NUL, which no SQL text can, so no statement's text is another's shape.
/// `None` when the lexer fails (the statement is then classified in full).
pub fn shape(sql: &str) -> Option<String> {
    use pg_query::protobuf::Token;
    // `scan`, not `scan_tokens`: pg_query 18.1's `scan_tokens` builds a slice from a null
    // pointer when there are no tokens (a blank statement), which is undefined behaviour.
    let tokens = pg_query::scan(sql).ok()?.tokens;
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    for t in tokens {
        let marker = match Token::try_from(t.token) {
            Ok(Token::Sconst | Token::Usconst) => "\0s",
            Ok(Token::Iconst) => "\0i",
            Ok(Token::Fconst) => "\0f",
            Ok(Token::Bconst) => "\0b",
            Ok(Token::Xconst) => "\0x",
            _ => continue,
        };
        let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
        out.push_str(sql.get(at..start)?);
        out.push_str(marker);
        at = end;
    }
    out.push_str(sql.get(at..)?);
    Some(out)
}

impl Classifier {
    pub fn classify(&self, sql: &str) -> Arc<Vec<Classified>> {
        if let Some(c) = self.by_text.get(sql) {
            return c;
        }
        let shape = (!literals_matter(sql)).then(|| shape(sql)).flatten().map(Arc::<str>::from);
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
    fn shapes_replace_literals_only() {
        assert_eq!(
            shape("SELECT v FROM t WHERE id = 42 AND n = 'x''y'").unwrap(),
            "SELECT v FROM t WHERE id = \0i AND n = \0s"
        );
        assert_eq!(shape("SELECT 1.5, x'1F', b'01', $$a$$, $1").unwrap(), "SELECT \0f, \0x, \0b, \0s, $1");
        assert_ne!(shape("SELECT a'foo'"), shape("SELECT a$s"), "no identifier looks like a marker");
        assert_eq!(shape("SELECT 'é' || n FROM t").unwrap(), "SELECT \0s || n FROM t");
        assert_eq!(shape("   ").unwrap(), "   ", "a blank statement has no tokens");
        assert_eq!(shape("").unwrap(), "");
    }

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
