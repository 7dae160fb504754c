//! What instances say to each other on the invalidation channel, as JSON small enough for
//! `NOTIFY` (payloads must stay under 8000 bytes).
//!
//! ```json
//! {"v":1,"i":"3f9c1a…","d":"app","t":1733000000123456,"r":[16384,16390],"n":["orders"],"a":false}
//! ```
//!
//! `i` is the sending instance (`"trigger"` for the bypass triggers), `d` the database, `t` the
//! sender's clock in microseconds since the epoch (for the delay histogram), `r` relation OIDs
//! written, `n` relation names written in any schema, `a` "everything in this database". A
//! message with `h` is a heartbeat (nothing written), one with `bye` a clean shutdown.
//!
//! `k` narrows writes in `r` to key values (see [`crate::query::point`]):
//! `"k":[[16384,"id",["i5","i7"]]]` says relation 16384 was written only at keys 5 and 7 of
//! its column `id` (`i` integers, `u` UUIDs as 32 hex digits). A relation in `k` is always in
//! `r` too, so an instance that does not read `k` invalidates the whole relation — never less.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::query::point::KeyValue;

/// Largest message sent, before its seal (about 45 bytes); Postgres refuses payloads of 8000
/// bytes and more.
pub const MAX_PAYLOAD: usize = 7850;

/// Who sends the bypass triggers' messages.
pub const TRIGGER: &str = "trigger";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub v: u32,
    pub i: String,
    pub d: String,
    pub t: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub r: Vec<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub n: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub a: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub h: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bye: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub k: Vec<(u32, String, Vec<String>)>,
}

/// A relation's writes, as far as they were pinned to keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub column: String,
    pub values: BTreeSet<KeyValue>,
}

/// Above this many keys of one relation in one publication, the whole relation is announced.
pub const MAX_KEYS: usize = 256;

/// A key value on the wire.
pub fn key_text(v: &KeyValue) -> String {
    match v {
        KeyValue::Int(i) => format!("i{i}"),
        KeyValue::Uuid(u) => format!("u{u:032x}"),
    }
}

/// A key value from the wire.
pub fn key_value(text: &str) -> Option<KeyValue> {
    match text.split_at_checked(1)? {
        ("i", i) => i.parse().ok().map(KeyValue::Int),
        ("u", u) if u.len() == 32 => u128::from_str_radix(u, 16).ok().map(KeyValue::Uuid),
        _ => None,
    }
}

/// Invalidations waiting to be published, deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    /// Relations written (not only at keys).
    pub oids: BTreeSet<u32>,
    /// Relations written only at keys (none of them in `oids`).
    pub keys: BTreeMap<u32, Keys>,
    pub names: BTreeSet<String>,
    pub all: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.oids.is_empty() && self.keys.is_empty() && self.names.is_empty() && !self.all
    }

    /// How many invalidations this holds (for the coalescing count).
    pub fn len(&self) -> usize {
        self.oids.len() + self.keys.len() + self.names.len() + self.all as usize
    }

    /// A write to relation `oid`, everywhere in it.
    pub fn relation(&mut self, oid: u32) {
        self.keys.remove(&oid);
        self.oids.insert(oid);
    }

    /// A write to relation `oid` at these values of its key `column`. Many keys, or keys of
    /// another column, make it a write to the whole relation.
    pub fn keyed(&mut self, oid: u32, column: &str, values: impl IntoIterator<Item = KeyValue>) {
        if self.oids.contains(&oid) {
            return;
        }
        let keys = self.keys.entry(oid).or_insert_with(|| Keys { column: column.to_owned(), values: BTreeSet::new() });
        keys.values.extend(values);
        if keys.column != column || keys.values.len() > MAX_KEYS {
            self.relation(oid);
        }
    }

    /// Everything `other` holds, too.
    pub fn merge(&mut self, other: Pending) {
        for oid in other.oids {
            self.relation(oid);
        }
        for (oid, k) in other.keys {
            self.keyed(oid, &k.column, k.values);
        }
        self.names.extend(other.names);
        self.all |= other.all;
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// The payloads announcing `pending`, each under [`MAX_PAYLOAD`] (relations split across
/// several when needed; a single name too long to fit becomes "everything").
pub fn payloads(instance: &str, database: &str, pending: &Pending) -> Vec<String> {
    let base = Message { v: 1, i: instance.to_owned(), d: database.to_owned(), t: now_micros(), ..Message::default() };
    if pending.all {
        return vec![encode(&Message { a: true, ..base })];
    }
    let mut out = Vec::new();
    let mut current = base.clone();
    let mut size = encode(&current).len();
    let flush = |current: &mut Message, size: &mut usize, out: &mut Vec<String>| {
        if !current.r.is_empty() || !current.n.is_empty() {
            out.push(encode(current));
        }
        *current = base.clone();
        *size = encode(current).len();
    };
    // A list's first element also brings its key and brackets: `,"r":[` and `]`.
    const LIST: usize = 7;
    let cost = |len: usize, list_empty: bool| len + if list_empty { LIST } else { 1 };
    for oid in &pending.oids {
        let len = oid.to_string().len();
        if size + cost(len, current.r.is_empty()) > MAX_PAYLOAD {
            flush(&mut current, &mut size, &mut out);
        }
        size += cost(len, current.r.is_empty());
        current.r.push(*oid);
    }
    for name in &pending.names {
        let encoded = serde_json::to_string(name).map_or(usize::MAX / 2, |s| s.len());
        if encode(&base).len() + cost(encoded, true) > MAX_PAYLOAD {
            // A name that cannot fit in any message: say "everything" instead.
            return vec![encode(&Message { a: true, ..base })];
        }
        if size + cost(encoded, current.n.is_empty()) > MAX_PAYLOAD {
            flush(&mut current, &mut size, &mut out);
        }
        size += cost(encoded, current.n.is_empty());
        current.n.push(name.clone());
    }
    flush(&mut current, &mut size, &mut out);
    keyed_payloads(&base, pending, &mut out);
    out
}

/// The payloads announcing the relations written only at keys: each relation with its keys
/// (split over several messages when they do not fit one), also listed in `r`.
fn keyed_payloads(base: &Message, pending: &Pending, out: &mut Vec<String>) {
    let mut current = base.clone();
    for (oid, keys) in &pending.keys {
        let mut values = keys.values.iter().map(key_text).peekable();
        while values.peek().is_some() {
            current.r.push(*oid);
            current.k.push((*oid, keys.column.clone(), Vec::new()));
            // A key adds its quoted text, and a comma after the first.
            let mut size = encode(&current).len();
            let entry = &mut current.k.last_mut().expect("just pushed").2;
            let cost = |v: &String, entry: &Vec<String>| v.len() + 2 + usize::from(!entry.is_empty());
            while let Some(v) = values.next_if(|v| size + cost(v, entry) <= MAX_PAYLOAD) {
                size += cost(&v, entry);
                entry.push(v);
            }
            if entry.is_empty() {
                current.r.pop();
                current.k.pop();
                if current.r.is_empty() {
                    // Not even one key fits beside the column's name: the whole relation.
                    out.push(encode(&Message { r: vec![*oid], ..base.clone() }));
                    break;
                }
            }
            if values.peek().is_some() {
                out.push(encode(&current));
                current = base.clone();
            }
        }
    }
    if !current.r.is_empty() {
        out.push(encode(&current));
    }
}

pub fn encode(m: &Message) -> String {
    serde_json::to_string(m).expect("a message of plain fields serializes")
}

/// How every message `instance` encodes begins (its fields serialize in declaration order):
/// an instance hears its own publications too, and knows them by this without decoding them.
pub fn own_prefix(instance: &str) -> String {
    format!("{{\"v\":1,\"i\":{},", serde_json::to_string(instance).expect("a string serializes"))
}

/// Reads a payload; anything else on the channel is not a message of ours.
pub fn decode(payload: &str) -> Option<Message> {
    serde_json::from_str::<Message>(payload).ok().filter(|m| m.v == 1)
}

/// Signs and checks messages with the fleet's secret. A sealed payload is
/// `<base64 HMAC-SHA-256 of the message>.<message>`; the key is derived from the secret (so a
/// secret of any length gives a 32-byte key, which the bypass triggers hold too).
pub struct Seal {
    key: ring::hmac::Key,
    bytes: [u8; 32],
}

impl std::fmt::Debug for Seal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seal(hidden)")
    }
}

impl Seal {
    pub fn new(secret: &[u8]) -> Seal {
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"pgcache peers v1");
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(ring::hmac::sign(&derive, secret).as_ref());
        Seal { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes), bytes }
    }

    /// The derived key (for the bypass triggers, which sign in SQL).
    pub fn key(&self) -> &[u8; 32] {
        &self.bytes
    }

    pub fn seal(&self, message: &str) -> String {
        use base64::Engine;
        let tag = ring::hmac::sign(&self.key, message.as_bytes());
        format!("{}.{message}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
    }

    /// The message inside a sealed payload, if its seal is right (checked in constant time).
    pub fn open<'a>(&self, payload: &'a str) -> Option<&'a str> {
        use base64::Engine;
        let (tag, message) = payload.split_once('.')?;
        let tag = base64::engine::general_purpose::STANDARD.decode(tag).ok()?;
        ring::hmac::verify(&self.key, message.as_bytes(), &tag).ok()?;
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_open_only_with_the_same_secret() {
        let seal = Seal::new(b"fleet secret");
        let sealed = seal.seal(r#"{"v":1,"i":"x","d":"db","t":0,"a":true}"#);
        assert!(sealed.len() <= 8000 - MAX_PAYLOAD + 45, "a seal costs {} bytes", sealed.len() - 40);
        assert_eq!(seal.open(&sealed), Some(r#"{"v":1,"i":"x","d":"db","t":0,"a":true}"#));
        assert_eq!(Seal::new(b"another").open(&sealed), None, "another secret");
        assert_eq!(seal.open(r#"{"v":1,"i":"x","d":"db","t":0,"a":true}"#), None, "unsigned");
        let forged = sealed.replacen("\"a\":true", "\"a\":false", 1);
        assert_eq!(seal.open(&forged), None, "changed after signing");
    }

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let mut p = Pending::default();
        p.oids.extend(16384..20000);
        p.names.insert("orders".into());
        let out = payloads("abc", "app", &p);
        assert!(out.len() > 1, "split into {} messages", out.len());
        let mut seen = Pending::default();
        for s in &out {
            assert!(s.len() <= MAX_PAYLOAD, "{} bytes", s.len());
            let m = decode(s).expect("decodes");
            assert_eq!((m.i.as_str(), m.d.as_str(), m.a), ("abc", "app", false));
            assert!(s.starts_with(&own_prefix("abc")), "an instance knows its own: {s}");
            assert!(!s.starts_with(&own_prefix("ab")) && !s.starts_with(&own_prefix("abcd")));
            seen.oids.extend(m.r);
            seen.names.extend(m.n);
        }
        assert_eq!(seen, p);
        let huge = Pending { names: ["x".repeat(9000)].into(), ..Pending::default() };
        let out = payloads("abc", "app", &huge);
        assert_eq!(out.len(), 1);
        assert!(decode(&out[0]).expect("decodes").a, "too long for any message: everything");
        assert_eq!(decode("not json"), None);
        assert_eq!(decode(r#"{"v":2,"i":"x","d":"y","t":0}"#), None, "another version is ignored");
    }

    #[test]
    fn keyed_writes_round_trip_and_list_their_relations_in_r() {
        let mut p = Pending::default();
        p.keyed(1, "id", [KeyValue::Int(5), KeyValue::Int(-7)]);
        p.keyed(2, "id", [KeyValue::Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11)]);
        p.keyed(3, "id", (0..100).map(KeyValue::Int));
        p.relation(3);
        p.keyed(3, "id", [KeyValue::Int(1)]);
        p.keyed(4, "id", (0..=MAX_KEYS as i64).map(KeyValue::Int));
        p.keyed(5, "id", [KeyValue::Int(1)]);
        p.keyed(5, "code", [KeyValue::Int(2)]);
        p.keyed(6, "a_rather_long_column_name", (0..200).map(|i| KeyValue::Uuid(i * 0x1234_5678_9abc_def0)));
        // 256 UUID keys need more than one payload.
        p.keyed(7, "id", (0..MAX_KEYS as u128).map(|i| KeyValue::Uuid(u128::MAX - i)));
        assert_eq!(p.oids, [3, 4, 5].into(), "a wide write, too many keys, another column: the whole relation");
        let out = payloads("abc", "app", &p);
        assert!(out.iter().filter(|s| s.contains("[7,")).count() >= 2, "relation 7's keys are split");
        let mut seen = Pending::default();
        for s in &out {
            assert!(s.len() <= MAX_PAYLOAD, "{} bytes", s.len());
            let m = decode(s).expect("decodes");
            let keyed: BTreeSet<u32> = m.k.iter().map(|(oid, _, _)| *oid).collect();
            assert!(keyed.iter().all(|oid| m.r.contains(oid)), "a keyed relation is in r too: {s}");
            for oid in m.r.iter().filter(|oid| !keyed.contains(oid)) {
                seen.relation(*oid);
            }
            for (oid, column, values) in m.k {
                seen.keyed(oid, &column, values.iter().map(|v| key_value(v).expect("a key value")));
            }
        }
        assert_eq!(seen, p);
        assert!(out.iter().any(|s| s.contains(r#"["i-7","i5"]"#)), "{out:?}");
        assert!(out.iter().any(|s| s.contains("ua0eebc999c0b4ef8bb6d6bb9bd380a11")), "{out:?}");
        assert_eq!(key_value("x5"), None);
        assert_eq!(key_value("u12"), None);
    }

    #[test]
    fn the_trigger_payload_is_a_message() {
        // What the bypass triggers send (see triggers.rs).
        let m = decode(r#"{"v" : 1, "i" : "trigger", "d" : "app", "t" : 1733000000000000, "r" : [16384]}"#);
        assert_eq!(m.map(|m| (m.i, m.r)), Some((TRIGGER.to_owned(), vec![16384])));
    }
}
