//! Message framing: split a byte stream into `type byte + i32 length + body` frames.
//!
//! A frame keeps its raw bytes (header included) as [`Bytes`], so it can be forwarded without
//! re-encoding and sliced without copying. Framing never trusts the length field: a length below
//! 4 or above the caller's limit is an error before any allocation happens
//! (Postgres docs, "Message Formats").

use bytes::{Buf, Bytes, BytesMut};

/// One tagged protocol message, header included.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({:?}, {} bytes)", self.tag() as char, self.raw.len())
    }
}

/// Why a frame could not be taken from the buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("invalid message length {len} for message type {tag:?}")]
    InvalidLength { tag: char, len: i32 },
    #[error("message of type {tag:?} is {len} bytes, over the limit of {max}")]
    TooLarge { tag: char, len: usize, max: usize },
}

impl Frame {
    /// Builds a frame from complete raw bytes (header included). The caller guarantees the
    /// header is valid, e.g. because it encoded the message itself.
    pub fn from_raw(raw: Bytes) -> Self {
        debug_assert!(raw.len() >= 5);
        Frame { raw }
    }

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The body, after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_raw(self) -> Bytes {
        self.raw
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Total size (header included) of the frame at the start of `buf`, if its header is complete.
///
/// Returns `Ok(None)` when more bytes are needed to read the header.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::InvalidLength { tag: tag as char, len });
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLarge { tag: tag as char, len: total, max });
    }
    Ok(Some(total))
}

/// Splits one complete frame off the front of `buf`, or returns `Ok(None)` (reserving room for
/// the rest of the frame) when it is not complete yet.
pub fn take_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    match frame_len(buf, max)? {
        Some(total) if buf.len() >= total => Ok(Some(Frame { raw: buf.split_to(total).freeze() })),
        Some(total) => {
            buf.reserve(total - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Length of the run of complete frames at the start of `buf` (possibly zero), stopping early
/// once `limit` bytes are covered. Used to forward many small frames as one chunk.
pub fn complete_run(buf: &[u8], max: usize, limit: usize) -> Result<usize, FrameError> {
    let mut at = 0;
    while at < limit {
        match frame_len(&buf[at..], max)? {
            Some(total) if buf.len() - at >= total => at += total,
            _ => break,
        }
    }
    Ok(at)
}

/// Appends a frame with the given tag and body to `out`.
pub fn put_frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.reserve(5 + body.len());
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Reads the `i32` length prefix of an untagged startup-phase packet, if complete.
pub fn startup_len(buf: &[u8]) -> Option<i32> {
    if buf.len() < 4 {
        return None;
    }
    Some((&buf[..4]).get_i32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(tag: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        put_frame(&mut b, tag, body);
        b
    }

    #[test]
    fn round_trip_keeps_bytes() {
        let mut buf = frame_bytes(b'Q', b"select 1\0");
        let raw = buf.clone().freeze();
        let f = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"select 1\0");
        assert_eq!(f.raw(), &raw);
        assert!(buf.is_empty());
    }

    #[test]
    fn incomplete_header_and_body_wait_for_more() {
        let full = frame_bytes(b'Q', b"select 1\0");
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(take_frame(&mut part, 1 << 20).unwrap(), None, "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn length_below_four_is_rejected() {
        for len in [-1i32, 0, 3, i32::MIN] {
            let mut buf = BytesMut::from(&b"Q"[..]);
            buf.extend_from_slice(&len.to_be_bytes());
            assert!(matches!(take_frame(&mut buf, 1 << 20), Err(FrameError::InvalidLength { .. })));
        }
    }

    #[test]
    fn oversized_is_rejected_before_allocation() {
        let mut buf = BytesMut::from(&b"Q"[..]);
        buf.extend_from_slice(&i32::MAX.to_be_bytes());
        let err = take_frame(&mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn complete_run_stops_at_partial_frame() {
        let mut buf = frame_bytes(b'D', b"abc");
        buf.extend_from_slice(&frame_bytes(b'D', b"defg"));
        let two = buf.len();
        buf.extend_from_slice(&frame_bytes(b'C', b"SELECT 2\0")[..6]);
        assert_eq!(complete_run(&buf, 1 << 20, usize::MAX).unwrap(), two);
        assert_eq!(complete_run(&buf, 1 << 20, 1).unwrap(), 8);
    }
}
