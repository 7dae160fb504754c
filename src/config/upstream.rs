//! The upstream Postgres address, parsed from the forms users paste from `DATABASE_URL`:
//! `postgres[ql]://user:pass@host:port/db?sslmode=...` (libpq "Connection URIs") and the
//! `host=... port=... dbname=...` keyword/value form. Percent-encoding is decoded in the URI
//! form; single quotes and backslash escapes in the keyword form.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

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

impl SslMode {
    fn parse(s: &str) -> Result<Self, UpstreamError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(UpstreamError::Invalid("sslmode", s.to_owned())),
        })
    }
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
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    pub application_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL: {0}")]
    Syntax(String),
    #[error("invalid value for upstream parameter {0}: {1:?}")]
    Invalid(&'static str, String),
    #[error("unsupported upstream parameter {0:?}")]
    Unknown(String),
    #[error("several upstream hosts are not supported: {0:?}")]
    MultipleHosts(String),
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
        let s = s.trim();
        let mut b = Builder::default();
        if let Some(rest) = s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")) {
            parse_uri(rest, &mut b)?;
        } else if s.contains('=') {
            for (k, v) in keyword_pairs(s)? {
                b.set(&k, v)?;
            }
        } else {
            return Err(UpstreamError::Syntax("expected postgres://... or postgresql://... or key=value pairs".into()));
        }
        b.finish()
    }
}

#[derive(Default)]
struct Builder {
    host: Option<String>,
    port: Option<String>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    connect_timeout: Option<String>,
    application_name: Option<String>,
}

impl Builder {
    fn set(&mut self, key: &str, value: String) -> Result<(), UpstreamError> {
        let slot = match key {
            "host" | "hostaddr" => &mut self.host,
            "port" => &mut self.port,
            "user" => &mut self.user,
            "password" => &mut self.password,
            "dbname" => &mut self.dbname,
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "connect_timeout" => &mut self.connect_timeout,
            "application_name" => &mut self.application_name,
            _ => return Err(UpstreamError::Unknown(key.to_owned())),
        };
        *slot = Some(value);
        Ok(())
    }

    fn finish(self) -> Result<Upstream, UpstreamError> {
        let host_s = self.host.filter(|h| !h.is_empty()).unwrap_or_else(|| "localhost".into());
        if host_s.contains(',') {
            return Err(UpstreamError::MultipleHosts(host_s));
        }
        let host = if host_s.starts_with('/') { Host::Unix(host_s.into()) } else { Host::Tcp(host_s) };
        let port = match self.port.filter(|p| !p.is_empty()) {
            Some(p) => p.parse().map_err(|_| UpstreamError::Invalid("port", p))?,
            None => 5432,
        };
        let user = self.user.filter(|u| !u.is_empty()).unwrap_or_else(|| "postgres".into());
        let dbname = self.dbname.filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
        let sslmode = match &self.sslmode {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::default(),
        };
        let connect_timeout = match self.connect_timeout {
            Some(t) => {
                let secs: u64 = t.parse().map_err(|_| UpstreamError::Invalid("connect_timeout", t))?;
                (secs > 0).then(|| Duration::from_secs(secs))
            }
            None => None,
        };
        Ok(Upstream {
            host,
            port,
            user,
            password: self.password.map(Password),
            dbname,
            sslmode,
            sslrootcert: self.sslrootcert.map(PathBuf::from),
            connect_timeout,
            application_name: self.application_name,
        })
    }
}

fn decode(s: &str, what: &'static str) -> Result<String, UpstreamError> {
    percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|_| UpstreamError::Invalid(what, s.to_owned()))
}

/// `[user[:password]@][host][:port][/dbname][?k=v&...]` (the part after the scheme).
fn parse_uri(rest: &str, b: &mut Builder) -> Result<(), UpstreamError> {
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    // The password may contain '@' when not percent-encoded; the last '@' ends the userinfo.
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    if let Some(u) = userinfo {
        let (user, pass) = match u.split_once(':') {
            Some((user, pass)) => (user, Some(pass)),
            None => (u, None),
        };
        b.user = Some(decode(user, "user")?);
        b.password = pass.map(|p| decode(p, "password")).transpose()?;
    }
    if hostport.contains(',') {
        return Err(UpstreamError::MultipleHosts(hostport.to_owned()));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| UpstreamError::Syntax("unterminated [ in host".into()))?;
        (h.to_owned(), after.strip_prefix(':').map(str::to_owned))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (decode(h, "host")?, Some(p.to_owned())),
            None => (decode(hostport, "host")?, None),
        }
    };
    if !host.is_empty() {
        b.host = Some(host);
    }
    b.port = port.filter(|p| !p.is_empty()).or(b.port.take());
    if let Some(p) = path.filter(|p| !p.is_empty()) {
        b.dbname = Some(decode(p, "dbname")?);
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| UpstreamError::Syntax(format!("missing = in {pair:?}")))?;
        b.set(&decode(k, "parameter")?, decode(v, "parameter")?)?;
    }
    Ok(())
}

/// libpq keyword/value form: `k=v k='quoted \' value'`.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>, UpstreamError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(UpstreamError::Syntax(format!("missing = after {key:?}")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(UpstreamError::Syntax("unterminated quoted value".into())),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
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
    fn debug_hides_password() {
        let u = up("postgres://u:hunter2@h/d");
        assert!(!format!("{u:?}").contains("hunter2"));
    }
}
