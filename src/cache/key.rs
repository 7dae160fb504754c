//! Cache keys. Every part is length-prefixed, so no two different combinations of parts can
//! produce the same bytes (unlike keys built by concatenation, e.g. `user || query || db`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;

/// Above this many distinct parts the interner starts over (ids are never reused, so entries
/// keyed by a forgotten id are simply never found again).
const MAX_INTERNED: usize = 65_536;

/// Interns long key parts that many keys share — a session's settings, about a kilobyte — so a
/// key carries an 8-byte id instead: shorter keys to build, hash and compare on every hit.
/// Still exact: two parts get the same id only if their bytes are equal.
#[derive(Debug, Default)]
pub struct Interner {
    ids: Mutex<HashMap<Bytes, u64>>,
    next: AtomicU64,
}

impl Interner {
    pub fn id(&self, part: &Bytes) -> u64 {
        let mut ids = self.ids.lock();
        if let Some(id) = ids.get(part) {
            return *id;
        }
        if ids.len() >= MAX_INTERNED {
            ids.clear();
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        ids.insert(part.clone(), id);
        id
    }
}

/// A complete cache key: its bytes, and their hash, taken once as the key is built. The store,
/// the single flights, admission and the statistics all go by that hash instead of each
/// hashing the bytes (a statement's text and parameters) again; equal keys still compare their
/// bytes.
#[derive(Debug, Clone)]
pub struct Key {
    bytes: Bytes,
    hash: u64,
}

impl Key {
    pub fn new(bytes: Bytes) -> Key {
        use std::hash::BuildHasher;
        Key { hash: KEY_STATE.hash_one(&bytes[..]), bytes }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The same key in an allocation of its own, sized exactly (a stored entry's key does not
    /// keep the buffer it was built in alive), with the hash it has.
    pub fn copied(&self) -> Key {
        Key { bytes: Bytes::copy_from_slice(&self.bytes), hash: self.hash }
    }

    /// The key's hash, for this process only: foldhash, a fraction of SipHash's cost on keys
    /// of tens to hundreds of bytes, seeded at random once per process (a client chooses the
    /// bytes).
    pub fn hashed(&self) -> u64 {
        self.hash
    }
}

static KEY_STATE: std::sync::LazyLock<foldhash::quality::RandomState> = std::sync::LazyLock::new(Default::default);

/// A hasher seeded as cache keys are hashed ([`Key::hashed`]), for what stands for a key where
/// there is none (the statistics' hash of a read no rule caches).
pub fn hasher() -> foldhash::quality::FoldHasher<'static> {
    use std::hash::BuildHasher;
    KEY_STATE.build_hasher()
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.bytes == other.bytes
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Builds a key part by part.
#[derive(Debug, Default)]
pub struct KeyBuilder {
    buf: BytesMut,
}

impl KeyBuilder {
    pub fn new(kind: u8) -> Self {
        let mut buf = BytesMut::with_capacity(256);
        buf.put_u8(kind);
        KeyBuilder { buf }
    }

    /// A byte string (or `None`, distinct from every string, for SQL NULL).
    pub fn part(&mut self, bytes: Option<&[u8]>) -> &mut Self {
        match bytes {
            Some(b) => {
                self.buf.put_u32(b.len() as u32);
                self.buf.put_slice(b);
            }
            None => self.buf.put_u32(u32::MAX),
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.part(Some(s.as_bytes()))
    }

    pub fn i16s(&mut self, v: &[i16]) -> &mut Self {
        self.buf.put_u32(v.len() as u32);
        v.iter().for_each(|x| self.buf.put_i16(*x));
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.put_u64(v);
        self
    }

    pub fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.buf.put_u32(v.len() as u32);
        v.iter().for_each(|x| self.buf.put_u32(*x));
        self
    }

    pub fn finish(&mut self) -> Key {
        Key::new(self.finish_part())
    }

    /// The bytes built, when they are a part of keys (interned, say) rather than a key.
    pub fn finish_part(&mut self) -> Bytes {
        std::mem::take(&mut self.buf).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenation_ambiguity_is_impossible() {
        let a = KeyBuilder::new(b'Q').str("ab").str("c").finish();
        let b = KeyBuilder::new(b'Q').str("a").str("bc").finish();
        assert_ne!(a, b);
        let null = KeyBuilder::new(b'E').part(None).finish();
        let empty = KeyBuilder::new(b'E').part(Some(b"")).finish();
        assert_ne!(null, empty);
        assert_ne!(KeyBuilder::new(b'Q').str("x").finish(), KeyBuilder::new(b'E').str("x").finish());
    }

    #[test]
    fn interned_parts_get_equal_ids_exactly_when_equal() {
        let i = Interner::default();
        let a = i.id(&Bytes::from_static(b"TimeZone=UTC"));
        assert_eq!(i.id(&Bytes::from(b"TimeZone=UTC".to_vec())), a);
        assert_ne!(i.id(&Bytes::from_static(b"TimeZone=CET")), a);
    }
}
