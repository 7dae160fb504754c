//! Key values as a key column's type compares them ([`KeyType`]): integers and UUIDs, read
//! from a constant's text, a parameter (text or binary, when its declared type compares like
//! the column), or an array parameter's elements (`= ANY($1)`). Anything else reads as no
//! value, and the statement counts as one on the whole table.

/// The types a key column may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// `int2`, `int4`, `int8`.
    Int,
    Uuid,
}

/// A key value, as its column's type compares it: equal exactly when Postgres finds it equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyValue {
    Int(i64),
    Uuid(u128),
}

const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const NUMERIC: u32 = 1700;
const UUID: u32 = 2950;

impl KeyType {
    /// The key type of a column of type `oid`, if keys of it are supported.
    pub fn of_oid(oid: u32) -> Option<KeyType> {
        match oid {
            INT2 | INT4 | INT8 => Some(KeyType::Int),
            UUID => Some(KeyType::Uuid),
            _ => None,
        }
    }

    /// A constant's value. Integers as Postgres's integer input reads them (surrounding
    /// blanks allowed; not `1_000`, which it reads too — no key, then); UUIDs as 32 hex
    /// digits, hyphens and braces aside (every form Postgres reads has its digits in order).
    pub fn text(self, text: &str) -> Option<KeyValue> {
        match self {
            KeyType::Int => text.trim().parse().ok().map(KeyValue::Int),
            KeyType::Uuid => {
                let t = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
                let hex: String = t.chars().filter(|c| *c != '-').collect();
                let digits = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
                digits.then(|| u128::from_str_radix(&hex, 16).ok()).flatten().map(KeyValue::Uuid)
            }
        }
    }

    /// A parameter's value: text, or binary when the declared type (`type_oid`, 0 when left
    /// to the server, which then takes the column's) is the column's own.
    pub fn param(self, type_oid: u32, binary: bool, bytes: &[u8]) -> Option<KeyValue> {
        let declared = match self {
            // A text value compares exactly as an integer or numeric (not as a float, which
            // rounds large integers).
            KeyType::Int => matches!(type_oid, 0 | INT8 | INT2 | INT4 | NUMERIC),
            KeyType::Uuid => matches!(type_oid, 0 | UUID),
        };
        if !declared {
            return None;
        }
        if !binary {
            return self.text(std::str::from_utf8(bytes).ok()?);
        }
        let value = match (self, type_oid, bytes.len()) {
            (KeyType::Int, 0 | INT2, 2) => KeyValue::Int(i16::from_be_bytes(bytes.try_into().ok()?).into()),
            (KeyType::Int, 0 | INT4, 4) => KeyValue::Int(i32::from_be_bytes(bytes.try_into().ok()?).into()),
            (KeyType::Int, 0 | INT8, 8) => KeyValue::Int(i64::from_be_bytes(bytes.try_into().ok()?)),
            (KeyType::Uuid, _, 16) => KeyValue::Uuid(u128::from_be_bytes(bytes.try_into().ok()?)),
            _ => return None,
        };
        Some(value)
    }

    /// The elements of an array parameter (`= ANY($1)`), NULLs left out (they equal nothing):
    /// text (`{1,2,3}`) or binary, one-dimensional, of the column's own type. At most
    /// [`MAX_ARRAY`] elements, else `None` (the write counts as one on the whole table).
    pub fn array_param(self, type_oid: u32, binary: bool, bytes: &[u8]) -> Option<Vec<KeyValue>> {
        let (element, array) = match self {
            KeyType::Int => (&[INT2, INT4, INT8][..], &[1005, 1007, 1016][..]),
            KeyType::Uuid => (&[UUID][..], &[2951][..]),
        };
        if type_oid != 0 && !array.contains(&type_oid) {
            return None;
        }
        let values: Vec<KeyValue> = if binary {
            let int = |at: usize| Some(i32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
            let (ndim, elem) = (int(0)?, u32::try_from(int(8)?).ok()?);
            if ndim == 0 {
                return Some(Vec::new());
            }
            let len = usize::try_from(int(12)?).ok()?;
            if ndim != 1 || !element.contains(&elem) || len > MAX_ARRAY {
                return None;
            }
            let mut at = 20;
            let mut out = Vec::with_capacity(len);
            for _ in 0..len {
                let n = int(at)?;
                at += 4;
                if n < 0 {
                    continue;
                }
                let n = n as usize;
                out.push(self.param(elem, true, bytes.get(at..at + n)?)?);
                at += n;
            }
            out
        } else {
            let text = std::str::from_utf8(bytes).ok()?.trim();
            let inner = text.strip_prefix('{')?.strip_suffix('}')?;
            if inner.contains(['{', '}', '\\']) {
                return None;
            }
            let items: Vec<&str> =
                inner.split(',').map(|i| i.trim().trim_matches('"')).filter(|i| !i.is_empty()).collect();
            if items.len() > MAX_ARRAY {
                return None;
            }
            items.iter().filter(|i| !i.eq_ignore_ascii_case("null")).map(|i| self.text(i)).collect::<Option<_>>()?
        };
        Some(values)
    }
}

/// The most elements of an array parameter read as keys.
pub const MAX_ARRAY: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_as_the_key_column_type_says() {
        use KeyValue::{Int, Uuid};
        let int = KeyType::Int;
        assert_eq!(int.text(" 42 "), Some(Int(42)));
        assert_eq!(int.text("-5000000000"), Some(Int(-5_000_000_000)));
        for not in ["5.5", "5a", "1e3", "0x1F", "1_000", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"] {
            assert_eq!(int.text(not), None, "{not}");
        }
        let uuid = KeyType::Uuid;
        let id = Some(Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11));
        for form in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(uuid.text(form), id, "{form}");
        }
        assert_eq!(uuid.text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"), None, "31 digits");
        assert_eq!(uuid.text("5"), None);
    }

    #[test]
    fn array_parameters_are_read_element_by_element() {
        use KeyValue::Int;
        let int = KeyType::Int;
        assert_eq!(int.array_param(0, false, b"{1, 2,NULL,\"3\"}"), Some(vec![Int(1), Int(2), Int(3)]));
        assert_eq!(int.array_param(1016, false, b"{}"), Some(vec![]));
        assert_eq!(int.array_param(1016, false, b"{{1},{2}}"), None, "two dimensions");
        assert_eq!(int.array_param(1009, false, b"{1}"), None, "text[]");
        assert_eq!(int.array_param(0, false, b"{1.5}"), None);
        // Binary int8[] {7, NULL, -1}: ndim, has-null, element type, size, lower bound, elements.
        let mut b = Vec::new();
        for x in [1i32, 1, 20, 3, 1] {
            b.extend(x.to_be_bytes());
        }
        b.extend(8i32.to_be_bytes());
        b.extend(7i64.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.extend(8i32.to_be_bytes());
        b.extend((-1i64).to_be_bytes());
        assert_eq!(int.array_param(0, true, &b), Some(vec![Int(7), Int(-1)]));
        assert_eq!(int.array_param(1016, true, &b[..30]), None, "truncated");
        assert_eq!(KeyType::Uuid.array_param(0, true, &b), None, "int8 elements for a uuid key");
        let many = format!("{{{}}}", (0..=MAX_ARRAY).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        assert_eq!(int.array_param(0, false, many.as_bytes()), None, "too many");
    }

    #[test]
    fn parameters_are_read_only_when_their_type_compares_like_the_key() {
        use KeyValue::{Int, Uuid};
        let int = KeyType::Int;
        assert_eq!(int.param(0, false, b" 42 "), Some(Int(42)));
        assert_eq!(int.param(25, false, b"42"), None);
        assert_eq!(int.param(701, false, b"42"), None, "a float rounds large integers");
        assert_eq!(int.param(1700, false, b"42"), Some(Int(42)));
        assert_eq!(int.param(0, true, &7i32.to_be_bytes()), Some(Int(7)));
        assert_eq!(int.param(20, true, &(-7i64).to_be_bytes()), Some(Int(-7)));
        assert_eq!(int.param(21, true, &3i16.to_be_bytes()), Some(Int(3)));
        assert_eq!(int.param(701, true, &5f64.to_be_bytes()), None);
        assert_eq!(int.param(23, true, &5i64.to_be_bytes()), None);
        let uuid = KeyType::Uuid;
        assert_eq!(uuid.param(0, true, &7u128.to_be_bytes()), Some(Uuid(7)));
        assert_eq!(uuid.param(2950, false, b"00000000-0000-0000-0000-000000000007"), Some(Uuid(7)));
        assert_eq!(uuid.param(25, false, b"00000000-0000-0000-0000-000000000007"), None);
        assert_eq!(uuid.param(0, true, &7u64.to_be_bytes()), None);
    }
}
