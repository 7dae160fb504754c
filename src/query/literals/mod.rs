//! The literal tokens of a statement's text: what the classification cache replaces to get a
//! statement's shape ([`super::classifier`]) and where a point read's key values are
//! ([`super::point`]). Plain texts are read in one pass by [`quick`]; the rest by Postgres's own
//! lexer, as follows.
//!
//! `pg_query::scan_tokens` returns the lexer's tokens as a plain array. `pg_query::scan`, the
//! alternative, serializes them to protobuf and decodes them again, and redirects the library's
//! stderr through a pipe around every call (three system calls and a `pipe`); on the simple
//! protocol's pass-through path, where every text has new literals, that cost a tenth of
//! pgcache's CPU. `scan_tokens` has one flaw in pg_query 18.1: for a text with no tokens at
//! all (blank, or only comments) it builds a slice from a null pointer, which is undefined
//! behaviour. So the text is lexed with `"\n;"` after it: a newline ends a trailing `--`
//! comment and `;` is then always a token; if the text ends inside a string, quoted name or
//! block comment the lexer fails either way, and no token of the text itself can take in a
//! newline or a `;`. The extra token lies past the text and is never reported.

mod quick;

use pg_query::protobuf::{ScanToken, Token};

/// The kind of a literal token, as the lexer tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `'…'`, `E'…'`, `$$…$$`, `U&'…'`.
    String,
    /// An integer that fits in 32 bits.
    Integer,
    /// Any other number.
    Numeric,
    /// `B'…'`.
    Bits,
    /// `X'…'`.
    Hex,
}

/// One literal: its kind and its byte range in the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Literal {
    pub kind: Kind,
    pub start: usize,
    pub end: usize,
}

/// The literals of `sql`, in order. `None` when the lexer refuses the text (an unterminated
/// string or comment, a NUL byte). Plain texts are read by [`quick`], the rest by the lexer.
pub fn literals(sql: &str) -> Option<Vec<Literal>> {
    quick::literals(sql).or_else(|| lexed(sql))
}

/// [`literals`] by Postgres's own lexer.
fn lexed(sql: &str) -> Option<Vec<Literal>> {
    let tokens = tokens(sql)?;
    let mut out = Vec::new();
    let mut previous = None;
    for t in tokens.iter().filter(|t| !is_comment(t)) {
        if let Some(kind) = literal_kind(t, previous) {
            out.push(Literal { kind, start: t.start as usize, end: t.end as usize });
        }
        previous = Some(t);
    }
    Some(out)
}

/// Whether `t` is a comment (`--` or `/* */`), which the grammar never sees.
pub fn is_comment(t: &ScanToken) -> bool {
    matches!(Token::try_from(t.token), Ok(Token::SqlComment | Token::CComment))
}

/// The kind of literal `t` (after `previous`, comments left out) is, if it is one. The string
/// after `UESCAPE` is not: it is part of the `U&"…"` name or `U&'…'` string before it, whose meaning it changes.
pub fn literal_kind(t: &ScanToken, previous: Option<&ScanToken>) -> Option<Kind> {
    if previous.is_some_and(|p| p.token == Token::Uescape as i32) {
        return None;
    }
    match Token::try_from(t.token) {
        Ok(Token::Sconst | Token::Usconst) => Some(Kind::String),
        Ok(Token::Iconst) => Some(Kind::Integer),
        Ok(Token::Fconst) => Some(Kind::Numeric),
        Ok(Token::Bconst) => Some(Kind::Bits),
        Ok(Token::Xconst) => Some(Kind::Hex),
        _ => None,
    }
}

/// Every token of `sql` (comments included), in order, each within the text. `None` when the
/// lexer refuses the text.
pub fn tokens(sql: &str) -> Option<Vec<ScanToken>> {
    let mut text = String::with_capacity(sql.len() + 2);
    text.push_str(sql);
    text.push_str("\n;");
    let mut tokens = pg_query::scan_tokens(&text).ok()?;
    // The `;` after the text, and nothing that runs into it.
    let within = tokens.iter().take_while(|t| usize::try_from(t.start).is_ok_and(|s| s < sql.len())).count();
    tokens.truncate(within);
    tokens.iter().all(|t| usize::try_from(t.end).is_ok_and(|e| e <= sql.len())).then_some(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(sql: &str) -> Vec<(Kind, &str)> {
        literals(sql).unwrap().iter().map(|l| (l.kind, &sql[l.start..l.end])).collect()
    }

    #[test]
    fn finds_each_kind_of_literal() {
        assert_eq!(
            texts("SELECT 1, 1.5, 99999999999, 'a''b', E'x', $$d$$, B'01', X'1F', $1 FROM t1 -- 7"),
            vec![
                (Kind::Integer, "1"),
                (Kind::Numeric, "1.5"),
                (Kind::Numeric, "99999999999"),
                (Kind::String, "'a''b'"),
                (Kind::String, "E'x'"),
                (Kind::String, "$$d$$"),
                (Kind::Bits, "B'01'"),
                (Kind::Hex, "X'1F'"),
            ]
        );
    }

    #[test]
    fn texts_without_tokens_and_unterminated_texts() {
        assert_eq!(literals("").unwrap(), vec![]);
        assert_eq!(literals("  -- only a comment").unwrap(), vec![]);
        assert_eq!(literals("/* only a comment */").unwrap(), vec![]);
        assert_eq!(literals("SELECT 'open"), None);
        assert_eq!(literals("SELECT 1 /* open"), None);
        assert_eq!(literals("SELECT $$open"), None);
        assert_eq!(literals("SELECT \"open"), None);
        assert_eq!(texts("SELECT 2 -- trailing comment"), vec![(Kind::Integer, "2")]);
    }

    #[test]
    fn the_escape_of_a_unicode_name_or_string_is_part_of_it() {
        assert_eq!(texts("SELECT * FROM U&\"a!0031b\" UESCAPE '!'"), vec![]);
        assert_eq!(texts("SELECT * FROM U&\"a!0031b\" UESCAPE /* the escape */ '!'"), vec![]);
        assert_eq!(
            texts("SELECT U&'d!0061t' UESCAPE '!', 'x'"),
            vec![(Kind::String, "U&'d!0061t'"), (Kind::String, "'x'")]
        );
    }

    /// The literals `pg_query::scan` (the protobuf copy of the same lexer) finds in `sql`.
    fn scanned(sql: &str) -> Option<Vec<(usize, usize)>> {
        let tokens = pg_query::scan(sql).ok()?.tokens;
        let literal = |t: &&pg_query::protobuf::ScanToken| {
            matches!(
                Token::try_from(t.token),
                Ok(Token::Sconst | Token::Usconst | Token::Iconst | Token::Fconst | Token::Bconst | Token::Xconst)
            )
        };
        Some(tokens.iter().filter(literal).map(|t| (t.start as usize, t.end as usize)).collect())
    }

    /// Texts of random tricky pieces, some run together: wherever the quick reader answers,
    /// it answers what the lexer does; and it does answer plain statements.
    #[test]
    fn the_quick_reader_agrees_with_the_lexer() {
        #[rustfmt::skip]
        const PIECES: &[&str] = &[
            "SELECT", "a", "t1", "x$y", "_z", "1", "0", "007", "2147483647", "2147483648", "-2147483648",
            "99999999999", "1.5", "1.", ".5", "1..5", "1e5", "1e", "1E-3", "1e+", "1.5e2", "0x1F", "0b1", "1_000",
            "'s'", "'it''s'", "''", "'é'", "'a\\b'", "'a\nb'", "E'x'", "e'\\n'", "B'01'", "X'1F'", "N'x'",
            "U&'d!0061t'", "U&\"a\"", "UESCAPE", "uescape", "\"Q\"", "\"a\"\"b\"", "\"\"", "\"é\"", "$1", "$12",
            "$$d$$", "$t$x$t$", "$", "--c\n", "/*c*/", "/* /* */ */", "-", "+", "=", "<>", "::", "(", ")", ",",
            ";", ".", ":", "*", "/", "||", "&", "?", "~", "!", "@", "#", "%", "^", "`", "[", "]", "'", "\"",
            "\\", "é", "date", "INTERVAL", "\u{b}", "\u{c}",
        ];
        const GLUE: &[&str] = &["", " ", "\n", "\t", "\r\n"];
        // A small deterministic generator: the same texts on every run.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut texts, mut answered) = (0, 0);
        for _ in 0..20_000 {
            let mut sql = String::new();
            for _ in 0..1 + next(10) {
                sql.push_str(PIECES[next(PIECES.len())]);
                sql.push_str(GLUE[next(GLUE.len())]);
            }
            texts += 1;
            if let Some(quick) = quick::literals(&sql) {
                answered += 1;
                assert_eq!(Some(quick), lexed(&sql), "{sql:?}");
            }
        }
        assert!(answered * 10 > texts, "the quick reader answered {answered} of {texts}");
        for plain in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "UPDATE pgbench_accounts SET abalance = abalance + -4170 WHERE aid = 77591;",
            "INSERT INTO t (a, \"B\", c) VALUES ($1, 'x''y', 1.5e-3) RETURNING *",
            "SELECT * FROM t WHERE d > '2024-01-01'::date AND n <> 99999999999 ORDER BY 1",
        ] {
            assert_eq!(quick::literals(plain), lexed(plain), "{plain}");
            assert!(quick::literals(plain).is_some(), "the quick reader reads {plain}");
        }
        for run in [31, 63, 64, 65, 100] {
            let sql = format!("SELECT 1 {} 2", "<".repeat(run));
            if let Some(quick) = quick::literals(&sql) {
                assert_eq!(Some(quick), lexed(&sql), "an operator of {run} characters");
            }
        }
        assert_eq!(lexed(&format!("SELECT 1 {} 2", "<".repeat(64))), None, "the lexer refuses a long operator");
    }

    #[test]
    fn agrees_with_the_protobuf_scanner() {
        let corpus = [
            include_str!("../../../tests/corpus/10-types.sql"),
            include_str!("../../../tests/corpus/20-writes.sql"),
            include_str!("../../../tests/corpus/30-sessions.sql"),
            include_str!("../../../tests/corpus/40-functions.sql"),
        ];
        let mut texts: Vec<String> = vec![
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;".into(),
            "UPDATE t SET v = v + -3.5e2 WHERE k IN ('a', U&'\\0041') RETURNING *".into(),
            "SELECT 'x'\n'y', 1::int8, $tag$ q $tag$".into(),
        ];
        for file in corpus {
            texts.push(file.into());
            for statement in pg_query::split_with_scanner(file).unwrap() {
                texts.push(statement.into());
                texts.push(format!("{statement} -- trailing"));
                texts.push(format!("/* leading */ {statement}"));
            }
        }
        for sql in &texts {
            let mine = literals(sql).map(|l| l.iter().map(|l| (l.start, l.end)).collect::<Vec<_>>());
            assert_eq!(mine, scanned(sql), "{sql}");
        }
    }
}
