//! An outgoing byte queue. Large chunks — result rows relayed from the other side, stored
//! results — are queued as the `Bytes` they already are, without a copy; small ones are copied
//! into one tail buffer, so a typical answer (a few short frames around a stored result) goes
//! out as one contiguous write instead of a vectored write of many slices, which costs the
//! kernel more per slice than the copy costs here.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Chunks up to this size are copied into the tail instead of queued by reference.
const COPY_UP_TO: usize = 4096;

/// Bytes waiting to be written, in order: `chunks`, then `tail`.
#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
}

impl OutQueue {
    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.len += chunk.len();
        if chunk.len() <= COPY_UP_TO {
            self.tail.extend_from_slice(&chunk);
            return;
        }
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.chunks.push_back(chunk);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Buf for OutQueue {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&self.tail, |c| c.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of the queue");
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.tail.advance(cnt);
                break;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
        if self.len == 0 {
            // Written out: the next pushes start at the front of the tail's buffer again.
            self.tail.clear();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let tail = (!self.tail.is_empty()).then_some(&self.tail[..]);
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(self.chunks.iter().map(|c| &c[..]).chain(tail)) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big(byte: u8) -> Bytes {
        Bytes::from(vec![byte; COPY_UP_TO + 1])
    }

    fn written(q: &mut OutQueue) -> Vec<u8> {
        let mut out = Vec::new();
        while q.has_remaining() {
            let n = q.chunk().len().min(3000);
            out.extend_from_slice(&q.chunk()[..n]);
            q.advance(n);
        }
        out
    }

    #[test]
    fn small_chunks_coalesce_into_one_slice() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::new());
        q.push(Bytes::from_static(b"defg"));
        assert_eq!(q.remaining(), 7);
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(q.chunks_vectored(&mut slices), 1);
        assert_eq!(&*slices[0], b"abcdefg");
        q.advance(4);
        assert_eq!(q.chunk(), b"efg");
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.chunk(), b"");
    }

    #[test]
    fn large_chunks_keep_their_place_between_small_ones() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"ab"));
        q.push(big(b'x'));
        q.push(Bytes::from_static(b"cd"));
        q.push(big(b'y'));
        q.push(Bytes::from_static(b"e"));
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(q.chunks_vectored(&mut slices), 5);
        let mut expected = b"ab".to_vec();
        expected.extend(big(b'x'));
        expected.extend(b"cd");
        expected.extend(big(b'y'));
        expected.extend(b"e");
        assert_eq!(q.remaining(), expected.len());
        assert_eq!(written(&mut q), expected);
        q.push(Bytes::from_static(b"again"));
        assert_eq!(written(&mut q), b"again");
    }
}
