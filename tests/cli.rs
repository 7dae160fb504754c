//! The binary's configuration surface: flags win over `PGCACHE_*` environment variables, which
//! win over the config file; bad keys and values are refused with the key named.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the binary and returns the port (among `candidates`) it listens on.
fn listening_port(args: &[&str], env: &[(&str, String)], candidates: &[u16]) -> u16 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .env("PGCACHE_ADMIN", format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let found = loop {
        if let Some(p) = candidates.iter().find(|p| std::net::TcpStream::connect(("127.0.0.1", **p)).is_ok()) {
            break Some(*p);
        }
        if start.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    found.expect("pgcache listened on none of the candidate ports")
}

#[test]
fn flag_beats_env_beats_file() {
    let (flag, env, file) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgcache.toml");
    std::fs::write(&config, format!("listen = \"127.0.0.1:{file}\"\n")).unwrap();
    let cfg = config.to_str().unwrap();
    let all = [flag, env, file];
    let env_listen = ("PGCACHE_LISTEN", format!("127.0.0.1:{env}"));
    let flag_arg = format!("127.0.0.1:{flag}");
    assert_eq!(
        listening_port(&["--config", cfg, "--listen", &flag_arg], std::slice::from_ref(&env_listen), &all),
        flag
    );
    assert_eq!(listening_port(&["--config", cfg], std::slice::from_ref(&env_listen), &all), env);
    assert_eq!(listening_port(&["--config", cfg], &[], &all), file);
    assert_eq!(listening_port(&[], &[("PGCACHE_CONFIG", cfg.to_string())], &all), file);
}

fn refused(args: &[&str], file: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgcache"));
    cmd.args(args);
    if let Some(text) = file {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "expected a refusal for {args:?} {file:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_configuration_names_the_key() {
    let e = refused(&[], Some("[pool]\nmax_sise = 3\n"));
    assert!(e.contains("max_sise") && e.contains("line 2"), "{e}");
    let e = refused(&[], Some("[pool]\nacquire_timeout = \"soon\"\n"));
    assert!(e.contains("acquire_timeout") && e.contains("soon"), "{e}");
    let e = refused(&["--upstream", "postgres://u@h/d?sslmode=maybe"], None);
    assert!(e.contains("upstream") && e.contains("sslmode"), "{e}");
    let e = refused(&["--listen", "0.0.0.0:6432", "--auth", "trust"], None);
    assert!(e.contains("auth.method") && e.contains("loopback"), "{e}");
    let e = refused(&["--config", "/nonexistent/pgcache.toml"], None);
    assert!(e.contains("/nonexistent/pgcache.toml"), "{e}");
}

/// Waits until a line containing `marker` appears on `reader`, returning what was read.
fn read_until(reader: &mut impl std::io::BufRead, marker: &str, limit: Duration) -> String {
    let start = Instant::now();
    let mut seen = String::new();
    let mut line = String::new();
    while start.elapsed() < limit {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains(marker) {
            break;
        }
    }
    seen
}

fn psql_at(port: u16, db: &str, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", db, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap()
}

#[test]
fn demo_starts_serves_from_cache_and_cleans_up() {
    let (port, admin) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}"), "--admin", &format!("127.0.0.1:{admin}")])
        .env("PGCACHE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let banner = read_until(&mut out, "Press Ctrl-C", Duration::from_secs(120));
    assert!(banner.contains(&format!("psql -h 127.0.0.1 -p {port} -U postgres demo")), "{banner}");
    let sql = "SELECT name FROM products WHERE category_id = 3 ORDER BY id LIMIT 2";
    let first = psql_at(port, "demo", sql);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(psql_at(port, "demo", sql).stdout, first.stdout);
    let stats = psql_at(port, "pgcache", "SHOW STATS");
    assert!(String::from_utf8_lossy(&stats.stdout).contains("hits|1|"), "{}", String::from_utf8_lossy(&stats.stdout));
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let rest = read_until(&mut out, "done", Duration::from_secs(30));
    assert!(rest.contains("pgcache demo: done."), "{rest}");
    assert!(child.wait().unwrap().success());
    let leftovers: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(&format!("-{}", child.id())) || n.contains(&format!("-{}-", child.id())))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn json_logs_parse_and_never_show_parameter_values() {
    let cluster = pgcache::demo::cluster::Cluster::start(&pgcache::demo::cluster::Options {
        watchdog: true,
        ..Default::default()
    })
    .unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgcache"))
        .args([
            "--log-format",
            "json",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &cluster.url("postgres"),
            "--auth",
            "cleartext",
        ])
        .env("PGCACHE_ADMIN", format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    read_until(&mut err, "pgcache listening", Duration::from_secs(20));
    // slow_statement defaults to 1s: a 1.1s statement is logged, with its normalized text.
    let out = psql_at(port, "postgres", "SELECT pg_sleep(1.1), 'secret-literal'");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = read_until(&mut err, "client disconnected", Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let mut messages = Vec::new();
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        messages.push(v["fields"]["message"].as_str().unwrap_or("").to_owned());
        assert!(!line.contains("secret-literal"), "a literal value was logged: {line}");
        if v["fields"]["message"] == "slow statement" {
            assert_eq!(v["fields"]["query"], "SELECT pg_sleep($1), $2");
            assert!(v["fields"]["duration_ms"].as_u64().unwrap() >= 1100);
        }
        if v["fields"]["message"] == "client connected" {
            assert_eq!(v["fields"]["user"], "postgres");
            assert!(v["fields"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        }
    }
    for expected in ["client connected", "slow statement", "client disconnected"] {
        assert!(messages.iter().any(|m| m == expected), "{expected} missing from {messages:?}");
    }
}
