//! A raw protocol client: sends hand-built frames and records every message received, so a
//! test can compare what Postgres sends with what pgcache sends, byte for byte.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use pgcache::protocol::frame::{put_frame, take_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One message received: type byte and body.
#[derive(Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Bytes,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{:?}", self.tag as char, String::from_utf8_lossy(&self.body))
    }
}

pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    pub params: BTreeMap<String, String>,
    pub key: (i32, i32),
}

impl RawConn {
    /// Connects with trust or cleartext/md5-free auth (trust only) and waits for ReadyForQuery.
    pub async fn connect(addr: SocketAddr, user: &str, db: &str, extra: &[(&str, &str)]) -> RawConn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = RawConn { stream, buf: BytesMut::new(), params: BTreeMap::new(), key: (0, 0) };
        let mut params = vec![("user".to_string(), user.to_string()), ("database".into(), db.into())];
        params.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut out,
        )
        .expect("no NUL in the parameters");
        c.send(&out).await;
        loop {
            let m = c.recv().await;
            match m.tag {
                b'R' => assert_eq!(&m.body[..4], &[0, 0, 0, 0], "test raw client only supports trust auth"),
                b'S' => {
                    let parts: Vec<&[u8]> = m.body.split(|b| *b == 0).collect();
                    c.params.insert(String::from_utf8_lossy(parts[0]).into(), String::from_utf8_lossy(parts[1]).into());
                }
                b'K' => {
                    c.key = (
                        i32::from_be_bytes(m.body[..4].try_into().unwrap()),
                        i32::from_be_bytes(m.body[4..8].try_into().unwrap()),
                    )
                }
                b'Z' => return c,
                b'E' => panic!("startup failed: {m:?}"),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn recv(&mut self) -> Msg {
        self.try_recv().await.expect("connection closed")
    }

    /// The next message, or `None` at EOF.
    pub async fn try_recv(&mut self) -> Option<Msg> {
        loop {
            if let Some(f) = take_frame(&mut self.buf, 1 << 30).unwrap() {
                return Some(Msg { tag: f.tag(), body: Bytes::copy_from_slice(f.body()) });
            }
            if self.stream.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Every message up to and including the `n`th ReadyForQuery.
    pub async fn until_ready(&mut self, n: usize) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < n {
            let m = self.recv().await;
            seen += (m.tag == b'Z') as usize;
            out.push(m);
        }
        out
    }

    /// Sends `frames` and returns everything up to the `n`th ReadyForQuery.
    pub async fn exchange(&mut self, frames: &[u8], n: usize) -> Vec<Msg> {
        self.send(frames).await;
        self.until_ready(n).await
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn query(sql: &str) -> BytesMut {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    frame(b'Q', &body)
}

pub fn frame(tag: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    put_frame(&mut out, tag, body);
    out
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> BytesMut {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    frame(b'P', &body)
}

/// Bind with text parameters (`None` = NULL) and the given result format codes.
pub fn bind(portal: &str, stmt: &str, params: &[Option<&str>], result_formats: &[i16]) -> BytesMut {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    cstr(&mut body, stmt);
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    body.extend_from_slice(&(result_formats.len() as i16).to_be_bytes());
    for f in result_formats {
        body.extend_from_slice(&f.to_be_bytes());
    }
    frame(b'B', &body)
}

pub fn describe(kind: u8, name: &str) -> BytesMut {
    let mut body = vec![kind];
    cstr(&mut body, name);
    frame(b'D', &body)
}

pub fn close(kind: u8, name: &str) -> BytesMut {
    let mut body = vec![kind];
    cstr(&mut body, name);
    frame(b'C', &body)
}

pub fn execute(portal: &str, max_rows: i32) -> BytesMut {
    let mut body = Vec::new();
    cstr(&mut body, portal);
    body.extend_from_slice(&max_rows.to_be_bytes());
    frame(b'E', &body)
}

pub fn sync() -> BytesMut {
    frame(b'S', &[])
}

pub fn flush() -> BytesMut {
    frame(b'H', &[])
}

/// Concatenates frames into one write (a pipeline).
pub fn batch(frames: &[BytesMut]) -> BytesMut {
    let mut out = BytesMut::new();
    for f in frames {
        out.extend_from_slice(f);
    }
    out
}
