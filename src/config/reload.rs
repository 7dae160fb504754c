//! What a reload (`RELOAD`, SIGHUP) may change in the configuration in force, and which
//! changed settings need a restart instead.

use super::Config;

impl Config {
    /// This configuration with the settings of `fresh` that can change while running
    /// (`auth.allow_plaintext_over_network`, `client.startup_timeout`,
    /// `client.max_message_bytes`, `client.max_output_bytes`, `metrics.token`,
    /// `auth.failure_delay`, `client.tls_required` when TLS is configured,
    /// `cache.single_flight_wait`, `cache.unknown_writes`, `cache.invalidate_on_writes`,
    /// `cache.invalidate_by_key`, `cache.admission`, `console.users`, `console.database`, `shutdown.drain_timeout`), and the names of the
    /// other settings that differ and need a restart.
    pub fn reloaded(&self, fresh: Config) -> (Config, Vec<&'static str>) {
        let mut next = self.clone();
        next.auth.allow_plaintext_over_network = fresh.auth.allow_plaintext_over_network;
        next.client.startup_timeout = fresh.client.startup_timeout;
        next.client.max_message_bytes = fresh.client.max_message_bytes;
        next.client.max_output_bytes = fresh.client.max_output_bytes;
        next.metrics_token = fresh.metrics_token.clone();
        next.auth.failure_delay = fresh.auth.failure_delay;
        if self.client.tls_cert.is_some() {
            next.client.tls_required = fresh.client.tls_required;
        }
        next.cache.single_flight_wait = fresh.cache.single_flight_wait;
        next.cache.unknown_writes = fresh.cache.unknown_writes;
        next.cache.invalidate_on_writes = fresh.cache.invalidate_on_writes;
        next.cache.invalidate_by_key = fresh.cache.invalidate_by_key;
        next.cache.adaptive_admission = fresh.cache.adaptive_admission;
        next.console = fresh.console.clone();
        next.drain_timeout = fresh.drain_timeout;
        let mut restart = Vec::new();
        let mut differs = |name: &'static str, a: String, b: String| {
            if a != b {
                restart.push(name);
            }
        };
        differs("listen", self.listen.to_string(), fresh.listen.to_string());
        differs("unix_socket_dir", format!("{:?}", self.unix_socket_dir), format!("{:?}", fresh.unix_socket_dir));
        differs("admin", self.admin.to_string(), fresh.admin.to_string());
        differs("upstream", format!("{:?}", self.upstream), format!("{:?}", fresh.upstream));
        differs("rules", format!("{:?}", self.rules), format!("{:?}", fresh.rules));
        differs("log_format", format!("{:?}", self.log_format), format!("{:?}", fresh.log_format));
        differs("worker_threads", format!("{:?}", self.worker_threads), format!("{:?}", fresh.worker_threads));
        differs("slow_statement", format!("{:?}", self.slow_statement), format!("{:?}", fresh.slow_statement));
        differs("auth.method", format!("{:?}", self.auth.method), format!("{:?}", fresh.auth.method));
        differs("auth.verifiers", format!("{:?}", self.auth.verifiers), format!("{:?}", fresh.auth.verifiers));
        differs("auth.verifier_ttl", format!("{:?}", self.auth.verifier_ttl), format!("{:?}", fresh.auth.verifier_ttl));
        differs(
            "auth.verify_interval",
            format!("{:?}", self.auth.verify_interval),
            format!("{:?}", fresh.auth.verify_interval),
        );
        differs("pool", format!("{:?}", self.pool), format!("{:?}", fresh.pool));
        differs("replicas", format!("{:?}", self.replicas), format!("{:?}", fresh.replicas));
        differs(
            "client.max_connections",
            self.client.max_connections.to_string(),
            fresh.client.max_connections.to_string(),
        );
        differs(
            "client.tls_cert/tls_key",
            format!("{:?}{:?}", self.client.tls_cert, self.client.tls_key),
            format!("{:?}{:?}", fresh.client.tls_cert, fresh.client.tls_key),
        );
        differs("cache.max_bytes", self.cache.max_bytes.to_string(), fresh.cache.max_bytes.to_string());
        differs(
            "cache.max_entry_bytes",
            self.cache.max_entry_bytes.to_string(),
            fresh.cache.max_entry_bytes.to_string(),
        );
        differs(
            "cache.warm_*",
            format!("{:?} {} {}", self.cache.warm_file, self.cache.warm_statements, self.cache.warm_rate),
            format!("{:?} {} {}", fresh.cache.warm_file, fresh.cache.warm_statements, fresh.cache.warm_rate),
        );
        differs("cache.catalog_ttl", format!("{:?}", self.cache.catalog_ttl), format!("{:?}", fresh.cache.catalog_ttl));
        differs("metrics.max_table_labels", self.max_table_labels.to_string(), fresh.max_table_labels.to_string());

        differs("peers", format!("{:?}", self.peers), format!("{:?}", fresh.peers));
        (next, restart)
    }
}
