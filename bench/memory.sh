#!/usr/bin/env bash
# Memory under sustained traffic with nobody scraping /metrics: pgcache's RSS sampled while
# pgbench sends a given number of statements through it (a cached point select and a write,
# so hits, misses, pass-through and invalidations all record their timings).
#
# Usage: bench/memory.sh [statements] [scale]
# Prints the RSS after warm-up and at every fifth of the run, and the growth.
source "$(dirname "$0")/lib.sh"
total=${1:-1000000}
scale=${2:-1}
start_cluster "$scale"
port=$(free_port)
mkdir -p "$work/rules"
cat >"$work/rules/r.toml" <<'TOML'
[[rule]]
name  = "accounts"
match = { tables = ["pgbench_accounts"] }
ttl   = "60s"
TOML
start_pgcache "$port" --rules "$work/rules"
pid=${pids[-1]}
cat >"$work/mix.sql" <<'SQL'
\set aid random(1, 1000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT 1;
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
SQL
per_tx=5
clients=8
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c "$clients" -j 2 -M prepared -t 2000 -f "$work/mix.sql" postgres >/dev/null
base=$(rss)
echo "| statements | RSS (KiB) |"
echo "|---|---|"
echo "| warm-up | $base |"
step=$(( total / 5 / per_tx / clients ))
for i in 1 2 3 4 5; do
  pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c "$clients" -j 2 -M prepared -t "$step" -f "$work/mix.sql" postgres >/dev/null
  sleep 1.5
  echo "| $(( i * step * per_tx * clients )) | $(rss) |"
done
echo
echo "RSS growth over $(( 5 * step * per_tx * clients )) statements: $(( $(rss) - base )) KiB"
