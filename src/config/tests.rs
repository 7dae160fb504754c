//! The merge of flags, environment and file, and its errors.

use clap::Parser;

use super::*;

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("pgcache").chain(args.iter().copied())).unwrap()
}

#[test]
fn pool_overrides_pick_a_mode_by_database_and_user() {
    let f = FileConfig::parse(
        "[pool]\nmode = \"session\"\n\
         [[pool.override]]\ndatabase = \"app\"\nuser = \"batch\"\nmode = \"session\"\n\
         [[pool.override]]\ndatabase = \"app\"\nmode = \"transaction\"\n",
    )
    .unwrap();
    let c = Config::merge(&Cli::default(), f).unwrap();
    assert_eq!(c.pool.mode_for("app", "web"), PoolMode::Transaction);
    assert_eq!(c.pool.mode_for("app", "batch"), PoolMode::Session, "the first match wins");
    assert_eq!(c.pool.mode_for("other", "web"), PoolMode::Session);
    let bad = FileConfig::parse("[[pool.override]]\nmode = \"transaction\"\n").unwrap();
    let e = Config::merge(&Cli::default(), bad).unwrap_err().to_string();
    assert!(e.contains("pool.override"), "{e}");
    let bad = FileConfig::parse("[[pool.override]]\nuser = \"x\"\nmode = \"statement\"\n").unwrap();
    let e = Config::merge(&Cli::default(), bad).unwrap_err().to_string();
    assert!(e.contains("pool.override.mode"), "{e}");
}

#[test]
fn defaults() {
    let c = Config::merge(&Cli::default(), FileConfig::default()).unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.admin.to_string(), DEFAULT_ADMIN);
    assert_eq!(c.upstream.user, "postgres");
    assert_eq!(c.rules, PathBuf::from("./rules"));
    assert_eq!(c.auth.method, AuthMethod::ScramSha256);
    assert_eq!(c.pool.max_size, 20);
}

#[test]
fn flag_wins_over_file() {
    let f =
        FileConfig::parse("listen = \"127.0.0.1:7000\"\nadmin = \"127.0.0.1:7001\"\n[pool]\nmax_size = 3\n").unwrap();
    let c = Config::merge(&cli(&["--listen", "127.0.0.1:7100"]), f).unwrap();
    assert_eq!(c.listen.port(), 7100);
    assert_eq!(c.admin.port(), 7001);
    assert_eq!(c.pool.max_size, 3);
}

#[test]
fn unknown_file_key_is_named() {
    let e = FileConfig::parse("[pool]\nmax_sise = 3\n").unwrap_err().to_string();
    assert!(e.contains("max_sise"), "{e}");
    let e = FileConfig::parse("[pool]\nidle_timeout = \"forever\"\n").unwrap_err().to_string();
    assert!(e.contains("idle_timeout") && e.contains("forever"), "{e}");
}

#[test]
fn invalid_values_name_the_key() {
    let e = Config::merge(&cli(&["--listen", "nowhere"]), FileConfig::default()).unwrap_err().to_string();
    assert!(e.contains("listen"), "{e}");
    let e = Config::merge(&cli(&["--upstream", "postgres://h/d?sslmode=x"]), FileConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("upstream") && e.contains("sslmode"), "{e}");
    let e = Config::merge(&cli(&["--auth", "trust", "--listen", "0.0.0.0:6432"]), FileConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("auth.method") && e.contains("loopback"), "{e}");
    let f = FileConfig::parse("[pool]\nmin_idle = 50\n").unwrap();
    let e = Config::merge(&Cli::default(), f).unwrap_err().to_string();
    assert!(e.contains("pool.min_idle"), "{e}");
}
