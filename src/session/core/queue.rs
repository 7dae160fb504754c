//! An outgoing byte queue of shared chunks. Frames relayed from the other side are pushed as
//! the `Bytes` they were read into — no copy — and written with vectored I/O.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes};

/// Chunks waiting to be written, in order.
#[derive(Debug, Default)]
pub struct OutQueue {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl OutQueue {
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
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
        self.chunks.front().map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end of the queue");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.chunks.front_mut().expect("length accounts for every chunk");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, chunk) in dst.iter_mut().zip(&self.chunks) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_across_chunks() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::new());
        q.push(Bytes::from_static(b"defg"));
        assert_eq!(q.remaining(), 7);
        q.advance(4);
        assert_eq!(q.chunk(), b"efg");
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(q.chunks_vectored(&mut slices), 1);
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.chunk(), b"");
    }
}
