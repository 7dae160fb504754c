//! The deployment files cannot run here (no container engine or cluster), so they are checked
//! offline: YAML and JSON parse, every metric they use is one pgcache exports, and the image
//! and the pod follow the documented shape.

use std::collections::BTreeSet;

use pgcache::metrics::{ALL, Kind};

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/deploy/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Vec<yaml_rust2::Yaml> {
    yaml_rust2::YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

/// Every `pgcache_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"pgcache_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_owned()).collect()
}

/// Whether `name` is an exported series (histograms also as _bucket, _sum, _count).
fn exported(name: &str) -> bool {
    ALL.iter().any(|(n, kind, _)| {
        *n == name
            || (*kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(n)))
    })
}

#[test]
fn alerts_and_dashboard_use_only_real_metric_names() {
    let alerts = read("prometheus/alerts.yaml");
    let dashboard = read("grafana/pgcache-dashboard.json");
    let parsed = yaml("prometheus/alerts.yaml");
    let rules = parsed[0]["groups"][0]["rules"].as_vec().expect("a rule group");
    assert!(rules.len() >= 6);
    for rule in rules {
        assert!(rule["alert"].as_str().is_some() && rule["expr"].as_str().is_some(), "{rule:?}");
    }
    for required in [
        "PgcacheLowHitRatio",
        "PgcacheBackendErrors",
        "PgcachePoolSaturation",
        "PgcacheRulesReloadFailed",
        "PgcacheInvalidationStorm",
    ] {
        assert!(rules.iter().any(|r| r["alert"].as_str() == Some(required)), "{required}");
    }
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let used: BTreeSet<String> = metric_names(&alerts).into_iter().chain(metric_names(&dashboard)).collect();
    let unknown: Vec<&String> = used.iter().filter(|n| !exported(n)).collect();
    assert!(unknown.is_empty(), "not exported by pgcache: {unknown:?}");
    // And the dashboard shows every metric pgcache has.
    for (name, _, _) in ALL {
        assert!(metric_names(&dashboard).iter().any(|u| u.starts_with(name)), "{name} is on no dashboard panel");
    }
}

#[test]
fn the_sidecar_pod_is_wired_to_the_endpoints() {
    let docs = yaml("kubernetes/sidecar.yaml");
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["ConfigMap", "Secret", "Secret", "Deployment"]);
    let pod = &docs[3]["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"].as_str(), Some("9930"));
    let containers = pod["spec"]["containers"].as_vec().unwrap();
    assert_eq!(containers.len(), 2, "the app and its pgcache sidecar");
    let sidecar = containers.iter().find(|c| c["name"].as_str() == Some("pgcache")).unwrap();
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert!(!sidecar["lifecycle"]["preStop"].is_badvalue());
    assert!(sidecar["resources"]["limits"]["memory"].as_str().is_some());
    assert_eq!(sidecar["env"][0]["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("pgcache-upstream"));
    // /metrics on the pod's address wants a token, from a Secret; Prometheus sends it.
    let env = sidecar["env"].as_vec().unwrap();
    let token = env.iter().find(|e| e["name"].as_str() == Some("PGCACHE_METRICS_TOKEN")).expect("a metrics token");
    assert_eq!(token["valueFrom"]["secretKeyRef"]["name"].as_str(), Some("pgcache-metrics"));
    let scrape = &yaml("prometheus/scrape.yaml")[0]["scrape_configs"][0];
    assert_eq!(scrape["authorization"]["type"].as_str(), Some("Bearer"));
    assert_eq!(pod["spec"]["volumes"][0]["configMap"]["name"].as_str(), Some("pgcache-rules"));
    // The sidecar's flags parse, and its Unix socket directory is a volume both containers mount.
    let args: Vec<&str> = sidecar["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let cli =
        <pgcache::config::Cli as clap::Parser>::try_parse_from(std::iter::once("pgcache").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("the sidecar's args: {e}"));
    let socket_dir = cli.unix_socket_dir.expect("the sidecar listens on a Unix socket");
    let mounted = |c: &yaml_rust2::Yaml| {
        c["volumeMounts"].as_vec().into_iter().flatten().find_map(|m| {
            (m["mountPath"].as_str() == socket_dir.to_str()).then(|| m["name"].as_str().unwrap().to_owned())
        })
    };
    let app = containers.iter().find(|c| c["name"].as_str() == Some("app")).unwrap();
    let volume = mounted(sidecar).expect("pgcache mounts its socket directory");
    assert_eq!(mounted(app).as_ref(), Some(&volume), "the app mounts the same volume there");
    // The rules shipped in the ConfigMap are valid.
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in docs[0]["data"].as_hash().unwrap() {
        std::fs::write(dir.path().join(name.as_str().unwrap()), text.as_str().unwrap()).unwrap();
    }
    assert_eq!(pgcache::rules::load_dir(dir.path(), 1).unwrap().rules.len(), 2);
    assert!(yaml("prometheus/scrape.yaml")[0]["scrape_configs"].as_vec().is_some());
}

#[test]
fn the_image_is_multi_stage_unprivileged_and_health_checked() {
    let dockerfile = read("Dockerfile");
    let stages = dockerfile.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage");
    assert!(dockerfile.contains("libclang-dev"), "the builder installs libclang");
    let user = dockerfile.lines().find_map(|l| l.strip_prefix("USER ")).expect("a USER line");
    assert!(!user.starts_with("root") && !user.starts_with("0"), "runs unprivileged: {user}");
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("pgcache\", \"healthcheck"));
    // Everything the builder copies exists.
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ") && !l.contains("--from")) {
        for path in line.split_whitespace().skip(1).filter(|p| !p.starts_with("./")) {
            assert!(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
                "{path} is copied but missing"
            );
        }
    }
}
