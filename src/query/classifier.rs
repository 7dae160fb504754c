//! The classification cache, so the hot path does not re-parse (see [`Classifier`]).

use std::sync::Arc;

use super::classify::{Classified, classify};
use super::literals::literals;
use super::tree::TIME_WORDS;

/// A cache of classifications.
///
/// Keyed by SQL text, and also by shape: the text with each literal replaced by a marker of its
/// kind ([`shape`]: Postgres's own lexer ([`super::literals`]), a few percent of the cost of
/// a classification; exact — unlike a fingerprint, which would also merge `'t'::regclass` with
/// `'t'::int` — and no coarser than `pg_query::normalize`, which costs a parse). A classification
/// depends on a statement's shape, not on its literal values, so statements that differ only in
/// literals (the simple protocol with inlined values) share one full parse — except where a
/// literal matters: time words such as `'now'`, and the setting a `set_config` call names.
/// Texts that may contain either are always classified in full. The key values a statement
/// pins ([`super::point`]) are literals too: the shared classification records where they
/// are, and each text gets its own copy with its own values read from its literal tokens.
pub struct Classifier {
    by_text: quick_cache::sync::Cache<Arc<str>, Arc<Vec<Classified>>>,
    by_shape: quick_cache::sync::Cache<Arc<str>, Arc<Vec<Classified>>>,
    seen: Seen,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            by_text: quick_cache::sync::Cache::new(10_000),
            by_shape: quick_cache::sync::Cache::new(10_000),
            seen: Seen::default(),
        }
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
    scan(sql).map(|(shape, _)| shape)
}

/// The shape of `sql` and the text of its literal tokens, in order.
fn scan(sql: &str) -> Option<(String, Vec<&str>)> {
    use super::literals::Kind;
    let mut out = String::with_capacity(sql.len());
    let mut texts = Vec::new();
    let mut at = 0;
    for l in literals(sql)? {
        let marker = match l.kind {
            Kind::String => "\0s",
            Kind::Integer => "\0i",
            Kind::Numeric => "\0f",
            Kind::Bits => "\0b",
            Kind::Hex => "\0x",
        };
        out.push_str(sql.get(at..l.start)?);
        out.push_str(marker);
        texts.push(sql.get(l.start..l.end)?);
        at = l.end;
    }
    out.push_str(sql.get(at..)?);
    Some((out, texts))
}

/// `c` (the classification of `sql`, possibly shared with other texts of its shape) with the
/// key values of its point read from `sql`'s own literals (`literals`, scanned if `None`).
fn with_own_literals(c: Arc<Vec<Classified>>, sql: &str, literals: Option<Vec<&str>>) -> Arc<Vec<Classified>> {
    let pinned = |one: &Classified| one.point.as_ref().is_some_and(|p| p.has_literals());
    if !c.iter().any(pinned) {
        return c;
    }
    let resolve = |one: &Classified, literals: Option<Vec<&str>>| {
        let point = one.point.as_ref().zip(literals).and_then(|(p, l)| p.resolve(&l));
        one.with_point(point)
    };
    if let [one] = c.as_slice() {
        return Arc::new(vec![resolve(one, literals.or_else(|| scan(sql).map(|(_, l)| l)))]);
    }
    // Several statements: each counts its literals in its own text.
    let Ok(texts) = pg_query::split_with_parser(sql) else { return c };
    if texts.len() != c.len() {
        return c;
    }
    let each = c.iter().zip(texts).map(|(one, text)| match pinned(one) {
        true => resolve(one, scan(text).map(|(_, l)| l)),
        false => one.clone(),
    });
    Arc::new(each.collect())
}

/// Texts longer than this are classified away from the runtime's workers
/// ([`Classifier::classify_off_worker`]) and never kept by text or shape: a bulk INSERT of
/// megabytes costs its parse once, and no cache holds it.
pub const LARGE: usize = 64 * 1024;

impl Classifier {
    /// [`Classifier::classify`] on a blocking thread for a [`LARGE`] text (its parse may take
    /// milliseconds, which must not stall the sessions sharing a worker).
    pub async fn classify_off_worker(self: &Arc<Self>, sql: &str) -> Arc<Vec<Classified>> {
        if sql.len() <= LARGE {
            return self.classify(sql);
        }
        let (me, text) = (self.clone(), sql.to_owned());
        match tokio::task::spawn_blocking(move || me.classify(&text)).await {
            Ok(c) => c,
            Err(_) => Arc::new(vec![Classified::unparseable()]),
        }
    }

    pub fn classify(&self, sql: &str) -> Arc<Vec<Classified>> {
        if sql.len() > LARGE {
            return Arc::new(classify(sql));
        }
        if let Some(c) = self.by_text.get(sql) {
            return c;
        }
        let scanned = (!literals_matter(sql)).then(|| scan(sql)).flatten();
        let c = match &scanned {
            Some((shape, _)) => match self.by_shape.get(shape.as_str()) {
                Some(c) => c,
                None => {
                    let c = Arc::new(classify(sql));
                    self.by_shape.insert(Arc::from(shape.as_str()), c.clone());
                    c
                }
            },
            None => Arc::new(classify(sql)),
        };
        let shaped = scanned.is_some();
        let c = with_own_literals(c, sql, scanned.map(|(_, literals)| literals));
        if !shaped || self.seen.again(sql) {
            self.by_text.insert(Arc::from(sql), c.clone());
        }
        c
    }
}

/// Which texts of a known shape were seen before: such a text is kept by text only the second
/// time it comes. The simple protocol with inlined values sends most texts once (a key drawn
/// from millions); keeping each would cost an insert, an eviction and a copy of the text per
/// statement, for nothing, while a text that repeats (a hot key) is kept from its second use.
/// A direct-mapped table of text hashes: a collision only delays keeping a text.
struct Seen(Box<[std::sync::atomic::AtomicU64]>);

impl Default for Seen {
    fn default() -> Self {
        Seen((0..4096).map(|_| std::sync::atomic::AtomicU64::new(0)).collect())
    }
}

impl Seen {
    /// Whether `sql` was seen last time its slot was asked about (and notes it now).
    fn again(&self, sql: &str) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        sql.hash(&mut h);
        let h = h.finish() | 1;
        let slot = &self.0[(h >> 32) as usize % self.0.len()];
        slot.swap(h, std::sync::atomic::Ordering::Relaxed) == h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Kind;

    #[test]
    fn a_text_of_a_known_shape_is_kept_from_its_second_use() {
        let c = Classifier::default();
        c.classify("SELECT v FROM t WHERE id = 1");
        let first = c.classify("SELECT v FROM t WHERE id = 2");
        let second = c.classify("SELECT v FROM t WHERE id = 2");
        let third = c.classify("SELECT v FROM t WHERE id = 2");
        assert!(!Arc::ptr_eq(&first, &second), "not kept the first time");
        assert!(Arc::ptr_eq(&second, &third), "kept the second time");
        assert_eq!(first, third);
        // Without a shape (a time word) a text is kept at once: classifying it again is a parse.
        let now = c.classify("SELECT now() > '2024-01-01'::timestamptz - 'now'::interval");
        assert!(Arc::ptr_eq(&now, &c.classify("SELECT now() > '2024-01-01'::timestamptz - 'now'::interval")));
    }

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
        let a = c.classify("SELECT v FROM t WHERE id > 1");
        let b = c.classify("SELECT v FROM t WHERE id > 2");
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
        let k = |text: &str| crate::query::point::Value::Const(text.into());
        let one = c.classify("SELECT v FROM t WHERE id = 1 AND n = '3'");
        let two = c.classify("SELECT v FROM t WHERE id = 2 AND n = 'x'");
        let point = |c: &Arc<Vec<Classified>>| c[0].point.as_ref().map(|p| p.columns.clone());
        assert_eq!(point(&one), Some(vec![("id".into(), vec![k("1")]), ("n".into(), vec![k("3")])]));
        assert_eq!(
            point(&two),
            Some(vec![("id".into(), vec![k("2"),]), ("n".into(), vec![k("x")])]),
            "key values are each text's own"
        );
        assert_eq!(point(&c.classify("SELECT v FROM t WHERE id = 1 AND n = '3'")), point(&one));
        let several = c.classify("BEGIN; UPDATE t SET v = 'x' WHERE id = 7; UPDATE t SET v = 'y' WHERE id = 8");
        let points: Vec<_> = several.iter().map(|s| s.point.as_ref().map(|p| p.columns.clone())).collect();
        assert_eq!(
            points,
            [None, Some(vec![("id".into(), vec![k("7")])]), Some(vec![("id".into(), vec![k("8")])])],
            "statements of one query read their own literals"
        );
        let a = c.classify("SELECT set_config('app.a', '1', false)");
        let b = c.classify("SELECT set_config('app.b', '1', false)");
        assert_eq!(
            (a[0].settings.custom.as_slice(), b[0].settings.custom.as_slice()),
            (&["app.a".to_owned()][..], &["app.b".to_owned()][..])
        );
    }
}
