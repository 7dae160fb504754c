//! What the session knows about its backend's protocol state, from the messages it relays.
//!
//! The backend is *at rest* — safe to hand to another client, or to leave for a cache hit —
//! when every Query, Sync and FunctionCall sent has been answered by ReadyForQuery, no
//! extended-protocol message is waiting for a Sync, no COPY is running, and the transaction
//! status is idle. Transitions (Postgres docs, "Message Flow"):
//!
//! ```text
//! client Query / Sync / FunctionCall        awaiting_ready += 1   (Sync also ends `unsynced`)
//! client Parse/Bind/Describe/Execute/Close/Flush                  unsynced = true
//! backend CopyInResponse/CopyOutResponse/CopyBothResponse         copy = In/Out/Both
//! backend CommandComplete or ErrorResponse during COPY            copy = None
//! backend ReadyForQuery(status)             awaiting_ready -= 1, status recorded
//! ```

use crate::protocol::Truncated;
use crate::protocol::backend::{self as be, TransactionStatus};
use crate::protocol::frontend as fe;

/// A COPY in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Copy {
    #[default]
    None,
    In,
    Out,
    Both,
}

/// Protocol state of one backend connection, as seen by the session relaying it.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub status: TransactionStatus,
    pub awaiting_ready: usize,
    pub unsynced: bool,
    pub copy: Copy,
    /// Whether the client sent anything that can change session state (any statement).
    pub used: bool,
}

impl Tracker {
    /// Notes a frame the client sent to the backend.
    pub fn client_sent(&mut self, tag: u8) {
        match tag {
            fe::QUERY | fe::FUNCTION_CALL => {
                self.awaiting_ready += 1;
                self.used = true;
            }
            fe::SYNC => {
                self.awaiting_ready += 1;
                self.unsynced = false;
            }
            fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::CLOSE | fe::FLUSH => {
                self.unsynced = true;
                self.used = true;
            }
            _ => {}
        }
    }

    /// Notes a frame the backend sent.
    pub fn backend_sent(&mut self, tag: u8, body: &[u8]) -> Result<(), Truncated> {
        match tag {
            be::READY_FOR_QUERY => {
                self.status = be::ready_status(body)?;
                self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
                self.copy = Copy::None;
            }
            be::COPY_IN_RESPONSE => self.copy = Copy::In,
            be::COPY_OUT_RESPONSE => self.copy = Copy::Out,
            be::COPY_BOTH_RESPONSE => self.copy = Copy::Both,
            be::COMMAND_COMPLETE | be::ERROR_RESPONSE => self.copy = Copy::None,
            _ => {}
        }
        Ok(())
    }

    /// A COPY started by the extended protocol swallowed the Sync sent with it: that Sync
    /// gets no ReadyForQuery, and Postgres waits for another after CopyDone.
    pub fn copy_ate_sync(&mut self) {
        self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
        self.unsynced = true;
    }

    /// No request is waiting for its answer (the transaction may still be open).
    pub fn between_requests(&self) -> bool {
        self.awaiting_ready == 0 && !self.unsynced && self.copy == Copy::None
    }

    /// Between requests and outside any transaction: the connection can be reused.
    pub fn at_rest(&self) -> bool {
        self.between_requests() && self.status == TransactionStatus::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_query_cycle() {
        let mut t = Tracker::default();
        assert!(t.at_rest());
        t.client_sent(fe::QUERY);
        assert!(!t.at_rest());
        t.backend_sent(be::READY_FOR_QUERY, b"T").unwrap();
        assert!(t.between_requests() && !t.at_rest());
        t.client_sent(fe::QUERY);
        t.backend_sent(be::READY_FOR_QUERY, b"I").unwrap();
        assert!(t.at_rest() && t.used);
    }

    #[test]
    fn pipelined_extended_batch() {
        let mut t = Tracker::default();
        for tag in [fe::PARSE, fe::BIND, fe::EXECUTE, fe::SYNC, fe::BIND, fe::EXECUTE] {
            t.client_sent(tag);
        }
        assert!(t.unsynced && t.awaiting_ready == 1);
        t.client_sent(fe::SYNC);
        t.backend_sent(be::READY_FOR_QUERY, b"I").unwrap();
        assert!(!t.at_rest());
        t.backend_sent(be::READY_FOR_QUERY, b"I").unwrap();
        assert!(t.at_rest());
    }

    #[test]
    fn copy_keeps_connection_busy() {
        let mut t = Tracker::default();
        t.client_sent(fe::QUERY);
        t.backend_sent(be::COPY_IN_RESPONSE, b"").unwrap();
        assert_eq!(t.copy, Copy::In);
        t.backend_sent(be::COMMAND_COMPLETE, b"COPY 1\0").unwrap();
        t.backend_sent(be::READY_FOR_QUERY, b"I").unwrap();
        assert!(t.at_rest());
    }
}
