//! SCRAM-SHA-256 as PostgreSQL speaks it (RFC 5802, RFC 7677; PostgreSQL's `auth-scram.c`),
//! without I/O: the stored verifier, the server's side of the exchange with a client, and the
//! client's side of an exchange with Postgres that proves a role with the keys a client's
//! proof gave up rather than with its password (SCRAM pass-through).
//!
//! Why not pgwire's SCRAM server: pgwire 0.42 verifies a client against a stored verifier
//! (`ScramSecret::Verifier`) but drops the ClientKey it recovers from the proof, which is what
//! logging into Postgres without the password needs, and compares the proof with `==`. So the
//! exchange is ours, built on `ring`'s HMAC, SHA-256 and PBKDF2 (the crypto is not
//! hand-rolled), with constant-time comparisons (`subtle`).
//!
//! The keys: `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, i)`,
//! `ClientKey = HMAC(SaltedPassword, "Client Key")`, `StoredKey = SHA-256(ClientKey)`,
//! `ServerKey = HMAC(SaltedPassword, "Server Key")`. A proof is `ClientKey XOR
//! HMAC(StoredKey, AuthMessage)`; the server's signature `HMAC(ServerKey, AuthMessage)`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::{digest, hmac};
use subtle::ConstantTimeEq;

pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type PostgreSQL supports.
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

/// A malformed or refused SCRAM message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Refused(&'static str),
}

/// A role's stored SCRAM secret: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({} iterations, keys hidden)", self.iterations)
    }
}

fn key32(b64: &str) -> Option<[u8; 32]> {
    B64.decode(b64).ok()?.try_into().ok()
}

fn hmac256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

impl Verifier {
    /// Parses a verifier as `pg_authid.rolpassword` holds it; `None` for anything else (an
    /// md5 hash, a plain password, NULL).
    pub fn parse(s: &str) -> Option<Verifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok().filter(|s| !s.is_empty())?,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// The verifier of `password` (for tests and userlists): keys derived as Postgres does.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(password, salt, iterations);
        let client_key = hmac256(&salted, &[b"Client Key"]);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac256(&salted, &[b"Server Key"]),
        }
    }

    /// A verifier for a role that has none (unknown, md5 only, expired): the exchange runs
    /// as for any role and fails at its end, so roles cannot be told apart. Its salt depends
    /// only on the name and this process's secret, so it is the same each time (as Postgres's
    /// `mock_scram_secret`); its iteration count is the one real verifiers have.
    pub fn mock(user: &str, process_secret: &[u8; 32], iterations: u32) -> Verifier {
        let salt = sha256(&[user.as_bytes(), process_secret.as_slice()].concat());
        Verifier {
            iterations,
            salt: salt[..16].to_vec(),
            stored_key: hmac256(process_secret, &[b"stored", user.as_bytes()]),
            server_key: hmac256(process_secret, &[b"server", user.as_bytes()]),
        }
    }

    /// The text form, as Postgres stores it.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// `PBKDF2-HMAC-SHA-256` of the password (SASLprep is not applied: PostgreSQL uses the raw
/// bytes when the password is not valid for it, and ASCII passwords are unchanged by it).
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0; 32];
    let iterations = std::num::NonZeroU32::new(iterations.max(1)).expect("at least one iteration");
    ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA256, iterations, salt, password.as_bytes(), &mut out);
    out
}

/// What a role proved in an exchange: enough to log into any server that holds the same
/// verifier, without the password. Kept in memory only; never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub client_key: [u8; 32],
    pub verifier: Verifier,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(hidden)")
    }
}

/// The channel binding a client asked for in its gs2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// `n`: the client does not support it.
    None,
    /// `y`: the client supports it but thinks the server does not.
    Unused,
    /// `p=tls-server-end-point`.
    ServerEndPoint,
}

/// The client's first message, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    pub binding: Binding,
    /// The gs2 header as sent (`n,,`, `y,,`, `p=tls-server-end-point,,`).
    pub gs2_header: String,
    /// `client-first-message-bare` (`n=...,r=...`).
    pub bare: String,
    pub nonce: String,
}

/// Parses `client-first-message`. The user name in it is ignored, as by Postgres (the
/// startup packet's counts); an authorization identity or an extension is refused.
pub fn client_first(message: &[u8]) -> Result<ClientFirst, ScramError> {
    let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
    let (binding, rest) = if let Some(rest) = text.strip_prefix("n,") {
        (Binding::None, rest)
    } else if let Some(rest) = text.strip_prefix("y,") {
        (Binding::Unused, rest)
    } else if let Some(rest) = text.strip_prefix("p=") {
        let (kind, rest) = rest.split_once(',').ok_or(ScramError::Malformed("gs2 header"))?;
        if kind != TLS_SERVER_END_POINT {
            return Err(ScramError::Refused("unsupported SCRAM channel-binding type"));
        }
        (Binding::ServerEndPoint, rest)
    } else {
        return Err(ScramError::Malformed("gs2 header"));
    };
    let (authzid, bare) = rest.split_once(',').ok_or(ScramError::Malformed("gs2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Refused("client uses authorization identity, but it is not supported"));
    }
    let gs2_header = text[..text.len() - bare.len()].to_owned();
    let mut attrs = bare.split(',');
    let user = attrs.next().ok_or(ScramError::Malformed("client-first-message"))?;
    if user.starts_with("m=") {
        return Err(ScramError::Refused("client requires an unsupported SCRAM extension"));
    }
    if !user.starts_with("n=") {
        return Err(ScramError::Malformed("expected the user name attribute"));
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
        .ok_or(ScramError::Malformed("expected a printable client nonce"))?;
    Ok(ClientFirst { binding, gs2_header, bare: bare.to_owned(), nonce: nonce.to_owned() })
}

/// The server's side of an exchange, between its first message and the client's final one.
#[derive(Debug)]
pub struct ServerExchange {
    first: ClientFirst,
    server_first: String,
    nonce: String,
    verifier: Verifier,
}

impl ServerExchange {
    /// Answers the client's first message with `server-first-message`: the combined nonce
    /// (`server_nonce` must be printable and without commas), the salt and iterations.
    pub fn new(first: ClientFirst, verifier: Verifier, server_nonce: &str) -> ServerExchange {
        let nonce = format!("{}{server_nonce}", first.nonce);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&verifier.salt), verifier.iterations);
        ServerExchange { first, server_first, nonce, verifier }
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks `client-final-message`: channel binding (`cbind_data`: the hash of the server's
    /// certificate, when the client bound to it), the nonce and the proof. On success, the
    /// keys the proof gave up and `server-final-message`; otherwise why it failed (a wrong
    /// proof is `Refused`, and must be answered like a wrong password).
    pub fn finish(&self, message: &[u8], cbind_data: Option<&[u8]>) -> Result<(Keys, String), ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed("expected a proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .and_then(|c| B64.decode(c).ok())
            .ok_or(ScramError::Malformed("expected channel binding data"))?;
        let mut expected = self.first.gs2_header.as_bytes().to_vec();
        if self.first.binding == Binding::ServerEndPoint {
            expected.extend_from_slice(cbind_data.ok_or(ScramError::Refused("channel binding is not available"))?);
        }
        if binding.ct_eq(&expected).unwrap_u8() != 1 {
            return Err(ScramError::Refused("SCRAM channel binding check failed"));
        }
        if attrs.next().and_then(|a| a.strip_prefix("r=")) != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("malformed proof in client-final-message"))?;
        let auth = format!("{},{},{}", self.first.bare, self.server_first, without_proof);
        let signature = hmac256(&self.verifier.stored_key, &[auth.as_bytes()]);
        let client_key = xor(&proof, &signature);
        if sha256(&client_key).ct_eq(&self.verifier.stored_key).unwrap_u8() != 1 {
            return Err(ScramError::Refused("password authentication failed"));
        }
        let server_signature = hmac256(&self.verifier.server_key, &[auth.as_bytes()]);
        let keys = Keys { client_key, verifier: self.verifier.clone() };
        Ok((keys, format!("v={}", B64.encode(server_signature))))
    }
}

/// The client's side of an exchange with a server, proving a role with its [`Keys`] (no
/// password): `n,,` (no channel binding towards the server).
#[derive(Debug)]
pub struct KeysClient {
    keys: Keys,
    bare: String,
    nonce: String,
    auth: Option<String>,
}

impl KeysClient {
    pub fn new(keys: Keys, nonce: &str) -> KeysClient {
        KeysClient { keys, bare: format!("n=,r={nonce}"), nonce: nonce.to_owned(), auth: None }
    }

    /// `client-first-message`.
    pub fn first(&self) -> String {
        format!("n,,{}", self.bare)
    }

    /// Answers `server-first-message` with `client-final-message`. The server must hold the
    /// very verifier the keys came from (same salt and iterations).
    pub fn respond(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = B64.decode(v).ok(),
                Some(("i", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let nonce = nonce.filter(|n| n.starts_with(&self.nonce) && n.len() > self.nonce.len());
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(ScramError::Malformed("server-first-message"));
        };
        // (No bound on the iteration count: the keys are already derived, nothing is hashed
        // that many times here.)
        if salt != self.keys.verifier.salt || iterations != self.keys.verifier.iterations {
            return Err(ScramError::Refused(
                "the server's SCRAM verifier is not the one the client proved its password against",
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{},{text},{without_proof}", self.bare);
        let signature = hmac256(&self.keys.verifier.stored_key, &[auth.as_bytes()]);
        let proof = xor(&self.keys.client_key, &signature);
        self.auth = Some(auth);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks `server-final-message`: only a server that holds the verifier can sign it.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth = self.auth.as_ref().ok_or(ScramError::Malformed("server-final before server-first"))?;
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let given = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("server-final-message"))?;
        let expected = hmac256(&self.keys.verifier.server_key, &[auth.as_bytes()]);
        if given.ct_eq(&expected).unwrap_u8() != 1 {
            return Err(ScramError::Refused("the server's SCRAM signature is wrong"));
        }
        Ok(())
    }
}

/// A random nonce of 18 bytes, base64 (printable, no commas).
pub fn nonce() -> String {
    let mut bytes = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("the system's random source");
    B64.encode(bytes)
}

/// `tls-server-end-point` data for a certificate (RFC 5929 §4.1): its DER hashed with its
/// signature's hash, SHA-256 for MD5 and SHA-1. `None` when that hash is not known here (an
/// Ed25519 certificate has none): channel binding is then not offered.
pub fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let algorithm = match oid.as_str() {
        // md5, sha1 and sha256 with RSA; sha1 and sha256 with ECDSA.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.3.2"
        | "1.3.14.3.2.29"
        | "1.2.840.10045.4.1" => &digest::SHA256,
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &digest::SHA384,
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(algorithm, der).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 §3, as the research notes recomputed it.
    const VERIFIER: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    #[test]
    fn the_rfc_exchange_verifies_and_signs() {
        let v = Verifier::parse(VERIFIER).unwrap();
        assert_eq!(v.encode(), VERIFIER);
        assert_eq!(Verifier::from_password("pencil", &v.salt, 4096), v, "keys derived as Postgres does");
        let first = client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        let ex = ServerExchange::new(first, v.clone(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        assert_eq!(
            ex.server_first(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let final_ = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let (keys, server_final) = ex.finish(final_, None).unwrap();
        assert_eq!(server_final, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        assert_eq!(sha256(&keys.client_key), v.stored_key, "the ClientKey was recovered");
        let wrong = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(ex.finish(wrong, None).unwrap_err(), ScramError::Refused("password authentication failed"));
    }

    #[test]
    fn keys_log_in_where_the_verifier_is_the_same() {
        let v = Verifier::from_password("secret", b"0123456789abcdef", 4096);
        // A server with the verifier, a client with only the keys an exchange gave up.
        let first = client_first(b"n,,n=,r=abc").unwrap();
        let ex = ServerExchange::new(first, v.clone(), "xyz");
        let salted = salted_password("secret", b"0123456789abcdef", 4096);
        let client_key = hmac256(&salted, &[b"Client Key"]);
        let keys = Keys { client_key, verifier: v.clone() };
        let mut client = KeysClient::new(keys.clone(), "abc");
        let final_ = client.respond(ex.server_first().as_bytes()).unwrap();
        let (proved, server_final) = ex.finish(final_.as_bytes(), None).unwrap();
        assert_eq!(proved, keys);
        client.verify(server_final.as_bytes()).unwrap();
        assert!(client.verify(b"v=AAAA").is_err(), "a server without the verifier cannot sign");
        let other = Verifier::from_password("secret", b"another salt....", 4096);
        let ex = ServerExchange::new(client_first(b"n,,n=,r=abc").unwrap(), other, "xyz");
        assert!(KeysClient::new(keys, "abc").respond(ex.server_first().as_bytes()).is_err(), "another verifier");
    }

    #[test]
    fn headers_and_binding_are_checked() {
        assert_eq!(client_first(b"y,,n=,r=x").unwrap().binding, Binding::Unused);
        assert_eq!(client_first(b"p=tls-server-end-point,,n=,r=x").unwrap().binding, Binding::ServerEndPoint);
        assert!(client_first(b"p=tls-unique,,n=,r=x").is_err());
        assert!(client_first(b"n,a=admin,n=,r=x").is_err(), "authzid");
        assert!(client_first(b"n,,m=ext,n=,r=x").is_err(), "extension");
        assert!(client_first(b"n,,n=,r=").is_err(), "empty nonce");
        assert!(client_first(b"x,,n=,r=a").is_err());
        let v = Verifier::from_password("pw", b"salt", 4096);
        let first = client_first(b"p=tls-server-end-point,,n=,r=abc").unwrap();
        let ex = ServerExchange::new(first, v, "s");
        let data = [b"p=tls-server-end-point,,".as_slice(), b"CERTHASH"].concat();
        let final_ = format!("c={},r=abcs,p={}", B64.encode(&data), B64.encode([0u8; 32]));
        // The binding is right (the proof is not): refused for the proof, not the binding.
        assert_eq!(
            ex.finish(final_.as_bytes(), Some(b"CERTHASH")).unwrap_err(),
            ScramError::Refused("password authentication failed")
        );
        assert_eq!(
            ex.finish(final_.as_bytes(), Some(b"OTHER")).unwrap_err(),
            ScramError::Refused("SCRAM channel binding check failed")
        );
    }

    #[test]
    fn only_scram_verifiers_parse_and_mocks_are_stable() {
        assert!(Verifier::parse("md5abcdef").is_none());
        assert!(Verifier::parse("SCRAM-SHA-256$0:c2FsdA==$x:y").is_none());
        let secret = [7; 32];
        assert_eq!(Verifier::mock("alice", &secret, 4096), Verifier::mock("alice", &secret, 4096));
        assert_ne!(Verifier::mock("alice", &secret, 4096).salt, Verifier::mock("bob", &secret, 4096).salt);
    }
}
