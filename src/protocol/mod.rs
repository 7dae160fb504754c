//! Wire format only: no I/O policy, no session state.
//!
//! pgcache forwards Postgres messages as raw bytes. This module frames them by their header
//! ([`frame`]), parses the untagged packets a client may open a connection with ([`startup`]),
//! decodes the handful of frontend messages the proxy must inspect ([`frontend`]), reads the few
//! fields it needs from backend messages and encodes the messages pgcache itself originates
//! ([`backend`]), and names the SQLSTATE codes it uses ([`sqlstate`]).
//!
//! Decoding is done by our own bounds-checked readers rather than pgwire's decoders: those can
//! panic on truncated bodies and re-encode non-UTF-8 SQL lossily (see the crate research notes),
//! and the proxy must never alter what it forwards. pgwire's message types are used to *encode*
//! the messages pgcache generates.
//!
//! Owns the byte layout of messages. Touches nothing else in the crate: everything above may
//! use it.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod scram;
pub mod sqlstate;
pub mod startup;

pub use frame::{Frame, FrameError};

/// A cursor over a message body that never panics: every read checks the remaining length.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

/// The body ended before a field the message format requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message body is truncated or malformed")]
pub struct Truncated;

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        let (&b, rest) = self.buf.split_first().ok_or(Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, Truncated> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, Truncated> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.buf.len() < n {
            return Err(Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// A NUL-terminated string, without its terminator, as raw bytes (encoding is the client's).
    pub fn cstr(&mut self) -> Result<&'a [u8], Truncated> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(Truncated)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A count field (i16) that must not be negative.
    pub fn count16(&mut self) -> Result<usize, Truncated> {
        usize::try_from(self.i16()?).map_err(|_| Truncated)
    }
}
