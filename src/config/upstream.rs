//! The upstream Postgres address, parsed from the forms users paste from `DATABASE_URL`:
//! `postgres[ql]://user:pass@host:port/db?sslmode=...` (libpq "Connection URIs") and the
//! `host=... port=... dbname=...` keyword/value form. `tokio_postgres::Config` does the parsing
//! (percent-decoding, quoting, IPv6 brackets, Unix socket paths); this module takes out first
//! the two TLS settings it does not know (`sslmode=verify-ca|verify-full`, `sslrootcert`) and
//! refuses afterwards what pgcache would not honour (several hosts, `options`, keepalive
//! tuning, ...), so no setting is accepted and then ignored.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use subtle::ConstantTimeEq;

/// How pgcache uses TLS towards Postgres (libpq `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// Try TLS, fall back to plain if the server refuses (libpq's default).
    #[default]
    Prefer,
    /// TLS without certificate checks (with `sslrootcert`, behaves as `verify-ca`, as libpq).
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where a backend connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    Unix(PathBuf),
}

/// A secret that never appears in logs or `Debug` output, compared in constant time.
#[derive(Clone)]
pub struct Password(String);

impl PartialEq for Password {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Password {}

impl Password {
    pub fn new(s: impl Into<String>) -> Self {
        Password(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// The parsed upstream settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<Password>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// tokio-postgres's own message says only "invalid connection string"; its source names
    /// the option.
    #[error("invalid upstream URL: {}", std::error::Error::source(.0).map_or_else(|| .0.to_string(), |s| s.to_string()))]
    Parse(#[source] tokio_postgres::Error),
    #[error("invalid value for upstream parameter {0}: {1:?}")]
    Invalid(&'static str, String),
    #[error("unsupported upstream parameter {0:?}: {1}")]
    Unsupported(&'static str, &'static str),
    #[error("several upstream hosts are not supported (give one host and one port)")]
    MultipleHosts,
}

impl Upstream {
    /// The server's address for logs (never includes the password).
    pub fn describe(&self) -> String {
        address(&self.host, self.port)
    }

    /// Whether the host is a loopback address or Unix socket.
    pub fn is_local(&self) -> bool {
        match &self.host {
            Host::Unix(_) => true,
            Host::Tcp(h) => h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        }
    }
}

/// `host:port`, `[v6]:port` or the Unix socket path, for messages and logs.
pub fn address(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(h) if h.contains(':') => format!("[{h}]:{port}"),
        Host::Tcp(h) => format!("{h}:{port}"),
        Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
    }
}

impl std::str::FromStr for Upstream {
    type Err = UpstreamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let tls = TlsParams::take(s.trim())?;
        let config: tokio_postgres::Config = tls.rest.parse().map_err(UpstreamError::Parse)?;
        refuse_unhonoured(&config)?;
        let host = match (config.get_hostaddrs(), config.get_hosts()) {
            ([], []) => Host::Tcp("localhost".into()),
            ([addr], _) => Host::Tcp(addr.to_string()),
            ([], [tokio_postgres::config::Host::Tcp(h)]) => Host::Tcp(h.clone()),
            ([], [tokio_postgres::config::Host::Unix(dir)]) => Host::Unix(dir.clone()),
            _ => return Err(UpstreamError::MultipleHosts),
        };
        let port = match config.get_ports() {
            [] => 5432,
            [p] => *p,
            _ => return Err(UpstreamError::MultipleHosts),
        };
        let user = config.get_user().filter(|u| !u.is_empty()).unwrap_or("postgres").to_owned();
        let password = match config.get_password() {
            Some(p) => Some(Password(
                String::from_utf8(p.to_vec()).map_err(|_| UpstreamError::Invalid("password", "(not UTF-8)".into()))?,
            )),
            None => None,
        };
        let dbname = config.get_dbname().filter(|d| !d.is_empty()).unwrap_or(&user).to_owned();
        let sslmode = match (tls.verify, config.get_ssl_mode()) {
            (Some(verify), _) => verify,
            (None, tokio_postgres::config::SslMode::Disable) => SslMode::Disable,
            (None, tokio_postgres::config::SslMode::Require) => SslMode::Require,
            (None, _) => SslMode::Prefer,
        };
        Ok(Upstream {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert: tls.rootcert.map(PathBuf::from),
            connect_timeout: config.get_connect_timeout().copied(),
        })
    }
}

/// Parameters `tokio_postgres::Config` accepts but pgcache would not act on: an error names
/// them rather than letting them look as if they worked.
fn refuse_unhonoured(c: &tokio_postgres::Config) -> Result<(), UpstreamError> {
    let default = tokio_postgres::Config::new();
    let unsupported = |name, why| Err(UpstreamError::Unsupported(name, why));
    if c.get_options().is_some() {
        return unsupported("options", "set server options in each client's own connection instead");
    }
    if c.get_application_name().is_some() {
        return unsupported("application_name", "each client's own application_name is forwarded");
    }
    let keepalives = c.get_keepalives() != default.get_keepalives()
        || c.get_keepalives_idle() != default.get_keepalives_idle()
        || c.get_keepalives_interval().is_some()
        || c.get_keepalives_retries().is_some()
        || c.get_tcp_user_timeout().is_some();
    if keepalives {
        return unsupported("keepalives", "TCP keepalive tuning towards Postgres is not configurable");
    }
    if format!("{:?}", c.get_target_session_attrs()) != format!("{:?}", default.get_target_session_attrs()) {
        return unsupported("target_session_attrs", "pgcache connects to one server");
    }
    if format!("{:?}", c.get_load_balance_hosts()) != format!("{:?}", default.get_load_balance_hosts()) {
        return unsupported("load_balance_hosts", "pgcache connects to one server");
    }
    if format!("{:?}", c.get_channel_binding()) != format!("{:?}", default.get_channel_binding()) {
        return unsupported("channel_binding", "pgcache does not offer SCRAM channel binding");
    }
    if format!("{:?}", c.get_ssl_negotiation()) != format!("{:?}", default.get_ssl_negotiation()) {
        return unsupported("sslnegotiation", "pgcache always sends SSLRequest first");
    }
    Ok(())
}

/// The TLS settings libpq has and `tokio_postgres::Config` lacks, taken out of the string
/// before it is parsed: `sslmode=verify-ca|verify-full` (replaced by `require`, so the
/// parser still sees that TLS is wanted) and `sslrootcert`.
struct TlsParams {
    rest: String,
    verify: Option<SslMode>,
    rootcert: Option<String>,
}

impl TlsParams {
    fn take(s: &str) -> Result<TlsParams, UpstreamError> {
        let mut tls = TlsParams { rest: String::new(), verify: None, rootcert: None };
        // What to put in place of a pair: itself, nothing, or a value the parser knows.
        let mut rewrite = |key: &str, value: &str| -> Option<Option<&'static str>> {
            match (key, value) {
                ("sslmode", "verify-ca" | "verify-full") => {
                    tls.verify = Some(if value == "verify-ca" { SslMode::VerifyCa } else { SslMode::VerifyFull });
                    Some(Some("sslmode=require"))
                }
                // libpq's `allow` tries plain first; pgcache tries TLS first, as `prefer`.
                ("sslmode", "allow") => {
                    tls.verify = None;
                    Some(Some("sslmode=prefer"))
                }
                ("sslmode", _) => {
                    tls.verify = None;
                    Some(None)
                }
                ("sslrootcert", v) => {
                    tls.rootcert = Some(v.to_owned());
                    None
                }
                _ => Some(None),
            }
        };
        let rest = if let Some(uri) = s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")) {
            let (main, query) = uri.split_once('?').map_or((uri, None), |(m, q)| (m, Some(q)));
            let mut out = format!("postgres://{}", encode_extra_at(main));
            let mut sep = '?';
            for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let decoded = |x: &str| percent_decode_str(x).decode_utf8_lossy().into_owned();
                if let Some(replacement) = rewrite(&decoded(k), &decoded(v)) {
                    out.push(sep);
                    out.push_str(replacement.unwrap_or(pair));
                    sep = '&';
                }
            }
            out
        } else {
            let mut out = String::new();
            for (span, key, value) in keyword_spans(s)? {
                if let Some(replacement) = rewrite(&key, &value) {
                    out.push_str(replacement.unwrap_or(&s[span]));
                    out.push(' ');
                }
            }
            out
        };
        Ok(TlsParams { rest, ..tls })
    }
}

/// libpq ends the user information at the first `@`; passwords pasted with a raw `@` are
/// common enough that the last `@` before the host is taken instead, as pgcache always has.
fn encode_extra_at(main: &str) -> String {
    let authority_end = main.find('/').unwrap_or(main.len());
    let (authority, path) = main.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains('@') => format!("{}@{host}{path}", userinfo.replace('@', "%40")),
        _ => main.to_owned(),
    }
}

/// The `key=value` pairs of the keyword form with where each lies in `s`, values unquoted
/// (only to find the TLS settings; `tokio_postgres` parses the rest from the original text).
fn keyword_spans(s: &str) -> Result<Vec<(std::ops::Range<usize>, String, String)>, UpstreamError> {
    let bad = |why: &str| UpstreamError::Invalid("connection string", why.to_owned());
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    let skip_space = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_space(&mut chars);
        let Some(&(start, _)) = chars.peek() else { return Ok(out) };
        let key: String =
            std::iter::from_fn(|| chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace())).map(|(_, c)| c).collect();
        skip_space(&mut chars);
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(bad("expected key=value pairs or a postgres:// URL"));
        }
        skip_space(&mut chars);
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\\') => value.extend(chars.next().map(|(_, c)| c)),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(bad("unterminated quoted value")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                value.extend(if c == '\\' { chars.next().map(|(_, c)| c) } else { Some(c) });
            }
        }
        let end = chars.peek().map_or(s.len(), |&(i, _)| i);
        out.push((start..end, key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(s: &str) -> Upstream {
        s.parse().unwrap()
    }

    #[test]
    fn full_uri_with_encoded_password() {
        let u = up("postgres://app:p%40ss%3Aw0rd@db.internal:6543/shop?sslmode=verify-full&sslrootcert=/ca.pem");
        assert_eq!(u.host, Host::Tcp("db.internal".into()));
        assert_eq!((u.port, u.user.as_str(), u.dbname.as_str()), (6543, "app", "shop"));
        assert_eq!(u.password.unwrap().expose(), "p@ss:w0rd");
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert_eq!(u.sslrootcert, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn defaults_follow_libpq() {
        let u = up("postgresql://");
        assert_eq!(u.host, Host::Tcp("localhost".into()));
        assert_eq!((u.port, u.user.as_str(), u.dbname.as_str()), (5432, "postgres", "postgres"));
        assert_eq!(u.sslmode, SslMode::Prefer);
        let u = up("postgres://bob@localhost");
        assert_eq!(u.dbname, "bob");
    }

    #[test]
    fn ipv6_unix_socket_and_unencoded_at() {
        let u = up("postgres://u:a@b@[::1]:5433/d");
        assert_eq!(u.host, Host::Tcp("::1".into()));
        assert_eq!(u.password.unwrap().expose(), "a@b");
        assert_eq!(u.port, 5433);
        let u = up("postgres:///db?host=/var/run/postgresql&port=5433");
        assert_eq!(u.host, Host::Unix("/var/run/postgresql".into()));
        assert_eq!(u.describe(), "/var/run/postgresql/.s.PGSQL.5433");
        let u = up("postgres://%2Ftmp%2Fsock/db");
        assert_eq!(u.host, Host::Unix("/tmp/sock".into()));
    }

    #[test]
    fn keyword_value_form() {
        let u = up("host=10.0.0.5 port=5433 user=app password='it\\'s x' dbname=shop sslmode=require");
        assert_eq!(u.host, Host::Tcp("10.0.0.5".into()));
        assert_eq!(u.password.unwrap().expose(), "it's x");
        assert_eq!(u.sslmode, SslMode::Require);
    }

    #[test]
    fn errors_name_the_parameter() {
        let e = "postgres://h/d?sslmode=sometimes".parse::<Upstream>().unwrap_err();
        assert!(e.to_string().contains("sslmode"), "{e}");
        let e = "postgres://h/d?bogus=1".parse::<Upstream>().unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = "postgres://h:notaport/d".parse::<Upstream>().unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        assert!("mysql://x".parse::<Upstream>().is_err());
        assert!("postgres://a,b/d".parse::<Upstream>().is_err());
    }

    #[test]
    fn tls_settings_tokio_postgres_lacks_are_taken_out_first() {
        let u = up("host=h sslrootcert='/etc/ca dir/ca.pem' password='x sslmode=verify-full' sslmode=verify-ca");
        assert_eq!(u.sslmode, SslMode::VerifyCa);
        assert_eq!(u.sslrootcert, Some(PathBuf::from("/etc/ca dir/ca.pem")));
        assert_eq!(u.password.unwrap().expose(), "x sslmode=verify-full");
        assert_eq!(up("postgres://h/d?sslmode=allow").sslmode, SslMode::Prefer);
        assert_eq!(up("postgres://h/d?sslmode=verify-full&sslmode=disable").sslmode, SslMode::Disable);
        assert_eq!(up("postgres://h/d?sslmode=require").sslmode, SslMode::Require);
        assert_eq!(up("host=h connect_timeout=7").connect_timeout, Some(Duration::from_secs(7)));
    }

    #[test]
    fn settings_pgcache_would_ignore_are_refused() {
        for (url, name) in [
            ("postgres://h/d?options=-c%20x%3D1", "options"),
            ("postgres://h/d?application_name=app", "application_name"),
            ("postgres://h/d?keepalives_idle=30", "keepalives"),
            ("postgres://h/d?target_session_attrs=read-write", "target_session_attrs"),
            ("host=h,i port=5432", "several"),
            ("host=h port=5432,5433", "several"),
        ] {
            let e = url.parse::<Upstream>().unwrap_err();
            assert!(e.to_string().contains(name), "{url}: {e}");
        }
    }

    #[test]
    fn password_equality_is_by_value() {
        assert_eq!(Password::new("a"), Password::new("a"));
        assert_ne!(Password::new("a"), Password::new("ab"));
        assert_ne!(Password::new("a"), Password::new("b"));
    }

    #[test]
    fn debug_hides_password() {
        let u = up("postgres://u:hunter2@h/d");
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
