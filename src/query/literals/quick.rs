//! The literals of a plain statement found in one pass over its bytes, without Postgres's
//! lexer: the simple protocol's pass-through path asks for the literals of every text (each has
//! new values inlined), and `pg_query::scan_tokens` — a copy of the text, the flex scanner,
//! keyword look-ups in a memory context, a token array — was about a tenth of pgcache's CPU per
//! statement there (profile of `pgbench -S`, no rules).
//!
//! It knows only the plain subset of the grammar's tokens: names (ASCII), `"quoted names"`,
//! `'strings'` with `''` inside, decimal numbers, `$1` parameters, operators and punctuation,
//! blanks. On anything else it gives up (`None`) and the caller asks the real lexer: comments,
//! `E''`/`B''`/`X''`/`N''`/`U&` forms and any string or name right after a name, dollar
//! quotes, backslashes, strings continued on the next line, number forms of the newer grammar
//! (`0x1F`, `1_000`) or with junk after them, `UESCAPE`, bytes outside ASCII outside quotes,
//! control characters. Where it answers, it answers what the real lexer does: a test compares
//! the two on the corpora and on random texts built from the tricky pieces.

use super::{Kind, Literal};

/// The literals of `sql` if it is made of the plain tokens only, else `None` (ask the lexer).
pub fn literals(sql: &str) -> Option<Vec<Literal>> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    // Operator characters in a row: the lexer refuses an operator of 64 or more.
    let mut operator = 0;
    while i < b.len() {
        let c = b[i];
        operator = if OPERATOR.contains(&c) { operator + 1 } else { 0 };
        if operator >= LONG_OPERATOR {
            return None;
        }
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$') {
                    i += 1;
                }
                // A quote right after a name is a prefixed string (E'', B'', N'', date'…') or
                // a Unicode name: the lexer's business. So is `UESCAPE`, which changes the
                // meaning of the string after it.
                if matches!(b.get(i), Some(b'\'' | b'"' | b'&')) || sql[start..i].eq_ignore_ascii_case("uescape") {
                    return None;
                }
            }
            b'0'..=b'9' => {
                let (end, kind) = number(b, i)?;
                out.push(Literal { kind, start: i, end });
                i = end;
            }
            b'\'' => {
                let end = closing(b, i, b'\'')?;
                // `'a'` newline `'b'` is one string; `'a' 'b'` an error: either way, the lexer's.
                if b[end..].iter().find(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r')) == Some(&b'\'') {
                    return None;
                }
                out.push(Literal { kind: Kind::String, start: i, end });
                i = end;
            }
            b'"' => {
                let end = closing(b, i, b'"')?;
                // `""` is no name: an error, the lexer's to report.
                if end == i + 2 {
                    return None;
                }
                i = end;
            }
            b'$' => {
                // `$1` is a parameter; `$tag$` a dollar-quoted string.
                let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                // (A number past 32 bits is an error of the lexer's.)
                sql[i + 1..i + 1 + digits].parse::<i32>().ok()?;
                i += 1 + digits;
                if b.get(i).is_some_and(|c| junk_after_number(*c)) {
                    return None;
                }
            }
            // A comment (`--`, `/*`) may start inside a run of operator characters.
            b'-' | b'/' if matches!((c, b.get(i + 1)), (b'-', Some(b'-')) | (b'/', Some(b'*'))) => return None,
            // `.5` is a number; `t.col` a dot.
            b'.' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => return None,
            b'+' | b'-' | b'*' | b'/' | b'<' | b'>' | b'=' | b'~' | b'!' | b'@' | b'#' | b'%' | b'^' | b'&' | b'|'
            | b'`' | b'?' | b'(' | b')' | b'[' | b']' | b',' | b';' | b':' | b'.' => i += 1,
            // Backslashes, other control characters, bytes outside ASCII.
            _ => return None,
        }
    }
    Some(out)
}

/// The characters operators are made of.
const OPERATOR: &[u8] = b"~!@#^&|`?+-*/%<>=";

/// A run of operator characters this long goes to the lexer (which refuses 64 or more, after
/// trimming some; well below that is simply left to it).
const LONG_OPERATOR: usize = 32;

/// The end of the quoted string or name opening at `at` (a doubled quote stays inside), or
/// `None` if it is not closed or holds a backslash (whose meaning depends on settings).
fn closing(b: &[u8], at: usize, quote: u8) -> Option<usize> {
    let mut i = at + 1;
    loop {
        match *b.get(i)? {
            // A NUL is no text's (the lexer refuses it).
            b'\\' | 0 => return None,
            q if q == quote => {
                if b.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
}

/// Whether `c` right after a number makes it something else (`1e`, `0x1F`, `1_000`, `1.2.3`,
/// `1'a'`): the lexer decides those.
fn junk_after_number(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.' | b'\'' | b'"') || !c.is_ascii()
}

/// The decimal number starting at `at`: its end and kind, or `None` if it is not plain.
fn number(b: &[u8], at: usize) -> Option<(usize, Kind)> {
    let digits = |from: usize| b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = at + digits(at);
    let mut integer = true;
    if b.get(i) == Some(&b'.') {
        if b.get(i + 1) == Some(&b'.') {
            return None;
        }
        integer = false;
        i += 1 + digits(i + 1);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        let exponent = digits(i + 1 + sign);
        if exponent == 0 {
            return None;
        }
        integer = false;
        i += 1 + sign + exponent;
    }
    if b.get(i).is_some_and(|c| junk_after_number(*c)) {
        return None;
    }
    // The lexer's integer constant is one that fits in 32 bits; any other number is numeric.
    let fits = integer && std::str::from_utf8(&b[at..i]).ok()?.parse::<i32>().is_ok();
    Some((i, if fits { Kind::Integer } else { Kind::Numeric }))
}
