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

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Largest payload sent; Postgres refuses 8000 bytes and more.
pub const MAX_PAYLOAD: usize = 7900;

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
}

/// Invalidations waiting to be published, deduplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pending {
    pub oids: BTreeSet<u32>,
    pub names: BTreeSet<String>,
    pub all: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.oids.is_empty() && self.names.is_empty() && !self.all
    }

    /// How many invalidations this holds (for the coalescing count).
    pub fn len(&self) -> usize {
        self.oids.len() + self.names.len() + self.all as usize
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
    out
}

pub fn encode(m: &Message) -> String {
    serde_json::to_string(m).expect("a message of plain fields serializes")
}

/// Reads a payload; anything else on the channel is not a message of ours.
pub fn decode(payload: &str) -> Option<Message> {
    serde_json::from_str::<Message>(payload).ok().filter(|m| m.v == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_trigger_payload_is_a_message() {
        // What the bypass triggers send (see triggers.rs).
        let m = decode(r#"{"v" : 1, "i" : "trigger", "d" : "app", "t" : 1733000000000000, "r" : [16384]}"#);
        assert_eq!(m.map(|m| (m.i, m.r)), Some((TRIGGER.to_owned(), vec![16384])));
    }
}
