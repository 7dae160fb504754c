//! `--replica` / `[[replicas]]` and `[replica]`: the streaming replicas reads may go to, and how
//! they are used ([`crate::replica`] acts on them).

use std::time::Duration;

use super::cli::Cli;
use super::file::{ReplicaFile, ReplicaSettingsFile};
use super::{ConfigError, Upstream, invalid, upstream};

/// `--replica` / `[[replicas]]` and `[replica]`: streaming replicas reads are spread over.
#[derive(Debug, Clone, Default)]
pub struct ReplicasConfig {
    pub nodes: Vec<ReplicaNode>,
    /// A replica further behind the primary than this (bytes of WAL) gets no reads.
    pub max_lag_bytes: u64,
    /// ... or that has lacked WAL the primary had for longer than this (`None`: not used).
    pub max_lag_time: Option<Duration>,
    /// How often the primary's WAL position and each replica's replay position are read.
    pub check_interval: Duration,
    /// Longest a check may take before the replica counts as down.
    pub check_timeout: Duration,
    pub read_your_writes: ReadYourWrites,
    /// The primary's share of the reads a replica could take, against the replicas'
    /// weights (0: none; reads go to the primary only when no replica will do).
    pub primary_weight: u32,
    /// Fills from a replica are stored only if it replayed the last invalidation. Not a
    /// setting: only the tests turn it off, to show their checker sees the stale entries this
    /// prevents.
    #[doc(hidden)]
    pub check_fills: bool,
}

/// One replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaNode {
    /// Host, port and TLS settings (user, password and database are not used: a session logs
    /// in as itself, the monitor as the upstream URL's user).
    pub upstream: Upstream,
    /// Its share of the reads, against the other replicas' (default 1; 0: none).
    pub weight: u32,
}

/// Which writes a read sent to a replica must see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReadYourWrites {
    /// The session's own committed writes (default).
    #[default]
    Session,
    /// Every write this instance saw commit or heard of, whoever made it.
    Causal,
    /// None: a replica is used however far behind it is (within `max_lag_bytes`).
    Off,
}

/// The replicas from `--replica` (which replace the file's `[[replicas]]`) and `[replica]`.
pub(super) fn load(cli: &Cli, listed: &[ReplicaFile], f: &ReplicaSettingsFile) -> Result<ReplicasConfig, ConfigError> {
    let given: Vec<(String, u32)> = if cli.replicas.is_empty() {
        listed.iter().map(|r| (r.url.clone(), r.weight.unwrap_or(1))).collect()
    } else {
        cli.replicas.iter().filter(|u| !u.is_empty()).map(|u| (u.clone(), 1)).collect()
    };
    let mut nodes = Vec::with_capacity(given.len());
    for (url, weight) in given {
        let upstream: Upstream =
            url.parse().map_err(|e: upstream::UpstreamError| invalid("replicas.url", e.to_string()))?;
        nodes.push(ReplicaNode { upstream, weight });
    }
    let read_your_writes = match f.read_your_writes.as_deref() {
        None | Some("session") => ReadYourWrites::Session,
        Some("causal") => ReadYourWrites::Causal,
        Some("off") => ReadYourWrites::Off,
        Some(other) => {
            return Err(invalid(
                "replica.read_your_writes",
                format!("{other:?} (expected \"session\", \"causal\" or \"off\")"),
            ));
        }
    };
    let check_interval = f.check_interval.unwrap_or(Duration::from_millis(100));
    if check_interval.is_zero() {
        return Err(invalid("replica.check_interval", "must be above 0"));
    }
    if f.check_timeout.is_some_and(|t| t.is_zero()) {
        return Err(invalid("replica.check_timeout", "must be above 0"));
    }
    Ok(ReplicasConfig {
        nodes,
        max_lag_bytes: f.max_lag_bytes.unwrap_or(16 << 20),
        max_lag_time: f.max_lag_time.filter(|t| !t.is_zero()),
        check_interval,
        check_timeout: f.check_timeout.unwrap_or(Duration::from_secs(1)),
        read_your_writes,
        primary_weight: f.primary_weight.unwrap_or(0),
        check_fills: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, FileConfig};

    fn cli(args: &[&str]) -> Cli {
        <Cli as clap::Parser>::try_parse_from(std::iter::once("pgcache").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn replicas_come_from_the_file_or_the_flags_which_replace_them() {
        let f = || {
            FileConfig::parse(
                "[[replicas]]\nurl = \"postgres://r1:5433\"\nweight = 3\n\
                 [[replicas]]\nurl = \"host=r2 port=5434\"\n\
                 [replica]\nread_your_writes = \"causal\"\nmax_lag_bytes = 1024\ncheck_interval = \"50ms\"\n\
                 primary_weight = 2\nmax_lag_time = \"3s\"\n",
            )
            .unwrap()
        };
        let c = Config::merge(&Cli::default(), f()).unwrap();
        let nodes: Vec<(String, u32)> = c.replicas.nodes.iter().map(|n| (n.upstream.describe(), n.weight)).collect();
        assert_eq!(nodes, [("r1:5433".to_owned(), 3), ("r2:5434".to_owned(), 1)]);
        assert_eq!(c.replicas.read_your_writes, ReadYourWrites::Causal);
        assert_eq!((c.replicas.max_lag_bytes, c.replicas.check_interval), (1024, Duration::from_millis(50)));
        assert!(c.replicas.check_fills);
        assert_eq!(c.replicas.primary_weight, 2);
        assert_eq!(c.replicas.max_lag_time, Some(Duration::from_secs(3)));
        let c = Config::merge(&cli(&["--replica", "postgres://r3:6000", "--replica", "postgres://r4"]), f()).unwrap();
        let nodes: Vec<String> = c.replicas.nodes.iter().map(|n| n.upstream.describe()).collect();
        assert_eq!(nodes, ["r3:6000", "r4:5432"]);
        let none = Config::merge(&Cli::default(), FileConfig::default()).unwrap();
        assert!(none.replicas.nodes.is_empty());
        assert_eq!(none.replicas.read_your_writes, ReadYourWrites::Session);
        for (file, key) in [
            ("[replica]\nread_your_writes = \"eventual\"\n", "replica.read_your_writes"),
            ("[replica]\ncheck_timeout = \"0s\"\n", "replica.check_timeout"),
            ("[[replicas]]\nurl = \"postgres://h/d?sslmode=x\"\n", "replicas.url"),
        ] {
            let e = Config::merge(&Cli::default(), FileConfig::parse(file).unwrap()).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
