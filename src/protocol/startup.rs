//! The untagged packets that open a connection: StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest (Postgres docs, "Message Formats" and "Start-up").
//!
//! They share one shape — an `i32` length then an `i32` code — and are capped at 10 000 bytes,
//! as Postgres caps them (`MAX_STARTUP_PACKET_LENGTH`).

use super::{Reader, Truncated};

/// Largest startup-phase packet accepted, as in Postgres.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol 3.0, the only version pgcache speaks to clients and backends.
pub const PROTOCOL_3_0: i32 = 196_608;

/// A decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Vec<u8> },
    Startup(Startup),
}

/// A StartupMessage: the protocol version asked for and the parameters in the order sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A startup packet that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    InvalidLength(i32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: expected terminator as last byte")]
    Malformed,
    #[error("startup packet contains a parameter that is not valid UTF-8")]
    NotUtf8,
}

impl From<Truncated> for StartupError {
    fn from(_: Truncated) -> Self {
        StartupError::Malformed
    }
}

/// Checks the length prefix of the packet at the start of `buf`. Returns the total length once
/// the prefix is complete.
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, StartupError> {
    let Some(len) = super::frame::startup_len(buf) else {
        return Ok(None);
    };
    if len < 8 || len as usize > MAX_STARTUP_PACKET {
        return Err(StartupError::InvalidLength(len));
    }
    Ok(Some(len as usize))
}

/// Decodes one complete packet (length prefix included).
pub fn decode(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = Reader::new(&packet[4..]);
    let code = r.i32()?;
    match code {
        SSL_REQUEST => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let secret = r.bytes(r.remaining())?.to_vec();
            if secret.len() < 4 {
                return Err(StartupError::Malformed);
            }
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let key = r.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((utf8(key)?, utf8(value)?));
            }
            if r.remaining() != 0 {
                return Err(StartupError::Malformed);
            }
            Ok(StartupPacket::Startup(Startup { major, minor, params }))
        }
    }
}

fn utf8(b: &[u8]) -> Result<String, StartupError> {
    String::from_utf8(b.to_vec()).map_err(|_| StartupError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = ((rest.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn startup_keeps_parameter_order() {
        let p = packet(PROTOCOL_3_0, b"user\0bob\0database\0app\0options\0-c x=1\0\0");
        let StartupPacket::Startup(s) = decode(&p).unwrap() else { panic!() };
        assert_eq!(s.param("user"), Some("bob"));
        assert_eq!(s.params[2], ("options".into(), "-c x=1".into()));
        let mut out = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            s.params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &p[..]);
    }

    #[test]
    fn special_requests() {
        assert_eq!(decode(&packet(SSL_REQUEST, b"")).unwrap(), StartupPacket::SslRequest);
        assert_eq!(decode(&packet(GSSENC_REQUEST, b"")).unwrap(), StartupPacket::GssEncRequest);
        let mut rest = 7i32.to_be_bytes().to_vec();
        rest.extend_from_slice(&9i32.to_be_bytes());
        assert_eq!(
            decode(&packet(CANCEL_REQUEST, &rest)).unwrap(),
            StartupPacket::Cancel { pid: 7, secret: 9i32.to_be_bytes().to_vec() }
        );
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert!(decode(&packet(PROTOCOL_3_0, b"user\0bob")).is_err());
        assert!(decode(&packet(PROTOCOL_3_0, b"user\0bob\0\0extra")).is_err());
        assert!(decode(&packet(CANCEL_REQUEST, b"\0\0")).is_err());
        assert!(matches!(decode(&packet(2 << 16, b"\0")), Err(StartupError::UnsupportedProtocol { major: 2, .. })));
        assert!(packet_len(&[0, 0, 0, 3]).is_err());
        assert!(packet_len(&[0, 1, 0, 0]).is_err());
        assert_eq!(packet_len(&[0, 0]).unwrap(), None);
    }
}
