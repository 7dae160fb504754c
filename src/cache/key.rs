//! Cache keys. Every part is length-prefixed, so no two different combinations of parts can
//! produce the same bytes (unlike keys built by concatenation, e.g. `user || query || db`).

use bytes::{BufMut, Bytes, BytesMut};

/// A complete cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key(pub Bytes);

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

    pub fn u32s(&mut self, v: &[u32]) -> &mut Self {
        self.buf.put_u32(v.len() as u32);
        v.iter().for_each(|x| self.buf.put_u32(*x));
        self
    }

    pub fn finish(&mut self) -> Key {
        Key(std::mem::take(&mut self.buf).freeze())
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
}
