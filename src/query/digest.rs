//! A statement's digest, from Postgres's own lexer: its fingerprint (what a rule's
//! `match.query` and the per-query statistics compare) and its normalized text (literals
//! replaced by `$n`, for reports, logs and the advisor's suggestions). The lexer's tokens cost
//! a few percent of a parse; libpg_query's `fingerprint` and `normalize` would each parse the
//! text again, so a new statement shape would cost three parses instead of one.
//!
//! The fingerprint is of the token sequence, as ProxySQL's query digests are: keywords and
//! unquoted names compared as Postgres folds them, comments, layout and a trailing `;` ignored,
//! every literal and every parameter (`$n`) one placeholder, a minus sign before a number part
//! of the number where it can only be a sign. So `select * from T where id=$1 -- x` and
//! `SELECT * FROM t WHERE id = -42` share one, and the normalized text of a statement has the
//! statement's own fingerprint (the advisor suggests it as a rule's `match.query`). Texts a
//! parse tree would call the same but that are written differently (`CAST(a AS int)` and
//! `a::int`, extra parentheses) do not: a rule's query matches statements written as it is.

use pg_query::protobuf::{KeywordKind, ScanToken, Token};

use super::literals::{is_comment, literal_kind, tokens};

/// A statement's fingerprint and normalized text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub fingerprint: u64,
    /// The text with each literal replaced by `$n` (numbered after the text's own parameters),
    /// trimmed of blanks and trailing `;`.
    pub normalized: String,
}

/// The digest of `sql`, or `None` when the lexer refuses it.
pub fn digest(sql: &str) -> Option<Digest> {
    let tokens = tokens(sql)?;
    let mut hash = Fnv::default();
    let mut normalized = String::with_capacity(sql.len() + 8);
    let mut copied = 0;
    let mut next_param = 1 + tokens.iter().filter_map(|t| param_number(sql, t)).max().unwrap_or(0);
    // The two tokens before this one, comments left out.
    let (mut previous, mut before): (Option<&ScanToken>, Option<&ScanToken>) = (None, None);
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        let token = Token::try_from(t.token).unwrap_or(Token::Nul);
        i += 1;
        if is_comment(t) || token == Token::Ascii59 {
            continue;
        }
        // The last token this one takes in: a sign takes in its number.
        let mut last = t;
        let literal = if literal_kind(t, previous).is_some() {
            Some(t.start..t.end)
        } else if token == Token::Ascii45 && sign_may_follow(sql, previous, before) {
            match tokens.get(i) {
                Some(number) if matches!(Token::try_from(number.token), Ok(Token::Iconst | Token::Fconst)) => {
                    i += 1;
                    last = number;
                    Some(t.start..number.end)
                }
                _ => None,
            }
        } else {
            None
        };
        let text = &sql[t.start as usize..t.end as usize];
        if let Some(range) = literal {
            let (start, end) = (range.start as usize, range.end as usize);
            normalized.push_str(&sql[copied..start]);
            normalized.push('$');
            normalized.push_str(&next_param.to_string());
            next_param += 1;
            copied = end;
            hash.token(b'?', b"");
        } else if token == Token::Param {
            hash.token(b'?', b"");
        } else if let Some(name) = name(t, text) {
            hash.token(b'n', name.as_bytes());
        } else {
            hash.token(b't', text.as_bytes());
        }
        (previous, before) = (Some(last), previous);
    }
    normalized.push_str(&sql[copied..]);
    let normalized = normalized.trim().trim_end_matches(';').trim_end().to_owned();
    Some(Digest { fingerprint: hash.0, normalized })
}

/// The name a keyword or identifier token `t` (with text `text`) stands for, as Postgres reads
/// it: unquoted, folded to lower case; `"quoted"`, as written (`""` is one `"`); either cut to
/// 63 bytes, as Postgres cuts names. `None` for other tokens, and for `U&"…"` names (compared
/// as written).
fn name(t: &ScanToken, text: &str) -> Option<String> {
    let name = if t.keyword_kind != KeywordKind::NoKeyword as i32 {
        text.to_ascii_lowercase()
    } else if t.token != Token::Ident as i32 {
        return None;
    } else if let Some(quoted) = text.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        quoted.replace("\"\"", "\"")
    } else if text.contains('"') {
        return None;
    } else {
        text.to_ascii_lowercase()
    };
    let mut cut = name.len().min(63);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(name[..cut].to_owned())
}

/// The number of a `$n` parameter token.
fn param_number(sql: &str, t: &ScanToken) -> Option<u32> {
    (t.token == Token::Param as i32).then(|| sql.get(t.start as usize + 1..t.end as usize)?.parse().ok())?
}

/// Whether a `-` after `previous` (itself after `before`) can only be a sign: at the start,
/// after an operator, an opening bracket or a comma, or after a keyword that is always followed
/// by an expression (and is not a column name: `t.limit - 1`). Where unsure it is not (the
/// normalized text then reads `-$1`, which is still SQL).
fn sign_may_follow(sql: &str, previous: Option<&ScanToken>, before: Option<&ScanToken>) -> bool {
    let Some(p) = previous else { return true };
    match Token::try_from(p.token) {
        Ok(Token::Ascii41 | Token::Ascii93) => false,
        Ok(
            Token::Ascii40
            | Token::Ascii44
            | Token::Ascii91
            | Token::Ascii42
            | Token::Ascii43
            | Token::Ascii45
            | Token::Ascii47
            | Token::Ascii37
            | Token::Ascii94
            | Token::Ascii60
            | Token::Ascii61
            | Token::Ascii62
            | Token::Op
            | Token::LessEquals
            | Token::GreaterEquals
            | Token::NotEquals
            | Token::ColonEquals
            | Token::EqualsGreater,
        ) => true,
        _ => {
            const BEFORE_EXPRESSIONS: [&str; 14] = [
                "select",
                "where",
                "and",
                "or",
                "not",
                "then",
                "when",
                "else",
                "limit",
                "offset",
                "having",
                "on",
                "case",
                "returning",
            ];
            let text = &sql[p.start as usize..p.end as usize];
            p.keyword_kind == KeywordKind::ReservedKeyword as i32
                && BEFORE_EXPRESSIONS.iter().any(|k| k.eq_ignore_ascii_case(text))
                && before.is_none_or(|b| b.token != Token::Ascii46 as i32)
        }
    }
}

/// FNV-1a, 64 bits: a fingerprint must not change between runs or builds (a random or
/// unspecified hasher would), and these inputs are short.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// One token: its class (`?` a literal or parameter, `n` a name, `t` anything else) and
    /// its text, after a NUL, which no token's text holds, so tokens cannot run together.
    fn token(&mut self, class: u8, text: &[u8]) {
        self.write(&[0, class]);
        self.write(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(sql: &str) -> u64 {
        digest(sql).unwrap().fingerprint
    }

    fn normalized(sql: &str) -> String {
        digest(sql).unwrap().normalized
    }

    #[test]
    fn texts_that_differ_in_literals_case_and_layout_share_a_fingerprint() {
        let same = [
            "SELECT * FROM users WHERE id = 42",
            "select *\n  from USERS where id=$1 -- by id",
            "SELECT /* hint */ * FROM users WHERE id = 'x';",
            "SELECT * FROM users WHERE id = -7",
            "SELECT * FROM users WHERE id = - 1.5",
            "SELECT * FROM \"users\" WHERE \"id\" = 1",
        ];
        for sql in same {
            assert_eq!(fp(sql), fp(same[0]), "{sql}");
        }
        for other in [
            "SELECT * FROM s.users WHERE id = 1",
            "SELECT * FROM \"USERS\" WHERE id = 1",
            "SELECT * FROM users WHERE id = 1 - 1",
            "SELECT * FROM users WHERE id IN (1, 2)",
            "SELECT * FROM users WHERE id = (1)",
            "SELECT * FROM users WHERE id ? 1",
            "SELECT * FROM \"Users\" WHERE id = 1",
        ] {
            assert_ne!(fp(other), fp(same[0]), "{other}");
        }
    }

    #[test]
    fn literals_become_numbered_parameters() {
        assert_eq!(normalized("SELECT * FROM users WHERE id = 42"), "SELECT * FROM users WHERE id = $1");
        assert_eq!(normalized("  SELECT 1 ; "), "SELECT $1");
        assert_eq!(
            normalized("SELECT $1, 'a', -2, x - 3, E'\\n', B'1' FROM t"),
            "SELECT $1, $2, $3, x - $4, $5, $6 FROM t"
        );
        assert_eq!(
            normalized("SELECT a FROM t WHERE b = -1 AND c > -2.5 LIMIT 10"),
            "SELECT a FROM t WHERE b = $1 AND c > $2 LIMIT $3"
        );
        assert_eq!(
            normalized("SELECT CASE WHEN a THEN -1 ELSE (-2) END - 3"),
            "SELECT CASE WHEN a THEN $1 ELSE ($2) END - $3"
        );
        assert_eq!(normalized("SELECT CURRENT_DATE -1, NULL - 2"), "SELECT CURRENT_DATE -$1, NULL - $2");
        assert_eq!(normalized("SELECT p.limit - 1 FROM p"), "SELECT p.limit - $1 FROM p");
        assert_eq!(normalized("SELECT -5 - 3, (-1)-2"), "SELECT $1 - $2, ($3)-$4", "a signed number is an operand");
        assert_eq!(
            normalized("SELECT * FROM U&\"a!0031b\" UESCAPE '!' WHERE x = 'y'"),
            "SELECT * FROM U&\"a!0031b\" UESCAPE '!' WHERE x = $1"
        );
        assert_ne!(fp("SELECT * FROM U&\"a!0031b\" UESCAPE '!'"), fp("SELECT * FROM U&\"a!0031b\" UESCAPE '*'"));
        let long = "a".repeat(70);
        assert_eq!(
            fp(&format!("SELECT * FROM {long}")),
            fp(&format!("SELECT * FROM {}", &long[..63])),
            "names are cut to 63 bytes"
        );
        assert_eq!(normalized("SELECT 'a' -- 'b'\n"), "SELECT $1 -- 'b'");
        assert_eq!(digest("SELECT 'open"), None);
    }

    /// A statement's normalized text has the statement's fingerprint: the advisor suggests it
    /// as a rule's query.
    #[test]
    fn the_normalized_text_keeps_the_fingerprint() {
        let corpus = [
            include_str!("../../tests/corpus/10-types.sql"),
            include_str!("../../tests/corpus/20-writes.sql"),
            include_str!("../../tests/corpus/30-sessions.sql"),
            include_str!("../../tests/corpus/40-functions.sql"),
        ];
        let mut checked = 0;
        for file in corpus {
            for sql in pg_query::split_with_parser(file).unwrap() {
                let d = digest(sql).unwrap();
                assert_eq!(fp(&d.normalized), d.fingerprint, "{sql}\n{}", d.normalized);
                checked += 1;
            }
        }
        assert!(checked > 50, "the corpus is no corpus");
    }

    /// Where libpg_query's `normalize` replaces literals — in queries and writes — the text is
    /// the same. (It keeps the literals of schema statements, which this replaces too, and it
    /// replaces `NULL`, `true`, `false` and bare setting values, which are words here; and it
    /// numbers in the order of the tree, `OFFSET` before `LIMIT`, where this numbers in the
    /// order of the text.)
    #[test]
    fn queries_and_writes_read_as_libpg_query_normalizes_them() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42",
            "SELECT * FROM t WHERE a = 'x' AND b IN (1, 2.5, -3) ORDER BY c LIMIT 10",
            "UPDATE t SET v = v + 1, w = 'it''s' WHERE id = $1 RETURNING v",
            "INSERT INTO t (a, b) VALUES (1, E'\\x'), (2, $$dollar$$)",
            "DELETE FROM t WHERE created < '2024-01-01'::date - 7",
            "SELECT x FROM t WHERE y BETWEEN 1 AND 5 AND z = ANY('{1,2}')",
        ] {
            let theirs = pg_query::normalize(sql).unwrap();
            assert_eq!(normalized(sql), theirs, "{sql}");
        }
    }
}
