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
    assert!(e.contains("auth.mode") && e.contains("loopback"), "{e}");
    let e = refused(&["--config", "/nonexistent/pgcache.toml"], None);
    assert!(e.contains("/nonexistent/pgcache.toml"), "{e}");
}
