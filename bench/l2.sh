#!/usr/bin/env bash
# The shared L2 and warm starts, in one run against one throwaway cluster and one redis-server:
#  - a fleet of three instances reading the same keys: Postgres executions per key with and
#    without the L2 (pg_stat_statements);
#  - point reads over 1000 hot keys at CLIENTS clients: direct Postgres, L1 hits (no L2), L1
#    hits with an L2 (peers on: the L2 is not asked), L2 hits (an instance whose L1 holds
#    64 kB), and L1 hits each confirmed by the L2 (peers off);
#  - a new instance reading every key: cold, warm from the L2, and warm from a warm file
#    (cache.warm_file) written by a previous instance's shutdown — time and Postgres executions.
#
# Usage: bench/l2.sh [keys] [seconds] [clients]   (needs redis-server)
source "$(dirname "$0")/lib.sh"
keys=${1:-2000}
secs=${2:-10}
clients=${3:-16}
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 2; }
start_cluster 10
echo "shared_preload_libraries = 'pg_stat_statements'" >>"$work/data/postgresql.conf"
as_pg "$pgbin/pg_ctl" -D "$work/data" -w restart >/dev/null
sql() { psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -c "$2" postgres; }
sql "$pgport" "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
executions() {
  sql "$pgport" "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query LIKE 'SELECT abalance FROM pgbench_accounts%'"
}
reset_stats() { sql "$pgport" "SELECT pg_stat_statements_reset()" >/dev/null; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
l2=(--l2 "redis://127.0.0.1:$redis_port")

mkdir -p "$work/rules"
cat >"$work/rules/r.toml" <<'TOML'
[[rule]]
name  = "accounts"
match = { tables = ["pgbench_accounts"] }
ttl   = "1h"
TOML
cat >"$work/small.toml" <<'TOML'
[cache]
max_bytes = 65536
max_entry_bytes = 16384
TOML
cat >"$work/warm.toml" <<TOML
[cache]
warm_file = "$work/warm.json"
warm_rate = 1000
warm_statements = $keys
TOML
for k in $(seq 1 "$keys"); do echo "SELECT abalance FROM pgbench_accounts WHERE aid = $k;"; done >"$work/reads.sql"
cat >"$work/hot.sql" <<'SQL'
\set aid random(1, 1000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
read_all() { psql -X -q -h 127.0.0.1 -p "$1" -U postgres -f "$work/reads.sql" postgres >/dev/null; }
# The first read of a database starts the instance's peer link; the L2 is used once it listens.
first_read() { sql "$1" "SELECT abalance FROM pgbench_accounts WHERE aid = 0" >/dev/null; sleep 0.5; }
seconds() { python3 -c "import time; print(time.monotonic())"; }

echo "| measurement | without the L2 | with the L2 |"
echo "|---|---|---|"
# 1. A fleet of three reading the same keys.
plain=(); shared=()
for _ in 1 2 3; do
  p=$(free_port); start_pgcache "$p" --rules "$work/rules"; plain+=("$p")
  p=$(free_port); start_pgcache "$p" --rules "$work/rules" "${l2[@]}"; shared+=("$p")
done
for p in "${plain[@]}" "${shared[@]}"; do first_read "$p"; done
reset_stats
for p in "${plain[@]}"; do read_all "$p"; done
without=$(executions)
reset_stats
for p in "${shared[@]}"; do read_all "$p"; done
with=$(executions)
echo "| three instances read $keys keys: Postgres executions | $without ($(ratio "$without" "$keys") per key) | $with ($(ratio "$with" "$keys") per key) |"

# 2. Point reads over 1000 hot keys, side by side.
small=$(free_port); start_pgcache "$small" --rules "$work/rules" --config "$work/small.toml" "${l2[@]}"
guarded=$(free_port); start_pgcache "$guarded" --rules "$work/rules" --peers off "${l2[@]}"
for p in "$small" "$guarded"; do first_read "$p"; done
declare -A tps lat
targets=(direct:$pgport l1:${plain[0]} l1_with_l2:${shared[0]} l2_hits:$small l1_confirmed:$guarded)
for t in "${targets[@]}"; do run_pgbench "${t#*:}" "$clients" 2 -f "$work/hot.sql" >/dev/null; done
for t in "${targets[@]}"; do
  read -r tps["${t%%:*}"] lat["${t%%:*}"] < <(run_pgbench "${t#*:}" "$clients" "$secs" -f "$work/hot.sql")
done
d=${tps[direct]}
echo
echo "| point read, 1000 hot keys, $clients clients, simple protocol | TPS | ratio to direct | latency ms |"
echo "|---|---|---|---|"
echo "| direct Postgres | ${tps[direct]} | 1.00 | ${lat[direct]} |"
echo "| L1 hits, no L2 | ${tps[l1]} | $(ratio "${tps[l1]}" "$d") | ${lat[l1]} |"
echo "| L1 hits, L2 configured (peers on) | ${tps[l1_with_l2]} | $(ratio "${tps[l1_with_l2]}" "$d") | ${lat[l1_with_l2]} |"
echo "| mostly L2 hits (L1 of 64 kB) | ${tps[l2_hits]} | $(ratio "${tps[l2_hits]}" "$d") | ${lat[l2_hits]} |"
echo "| L1 hits confirmed by the L2 (peers off) | ${tps[l1_confirmed]} | $(ratio "${tps[l1_confirmed]}" "$d") | ${lat[l1_confirmed]} |"

# 3. A new instance reading every key.
echo
echo "| a new instance reads $keys keys | seconds | Postgres executions |"
echo "|---|---|---|"
cold=$(free_port); start_pgcache "$cold" --rules "$work/rules"
first_read "$cold"; reset_stats
t0=$(seconds); read_all "$cold"; t1=$(seconds)
echo "| cold (no L2, no warm file) | $(python3 -c "print(f'{$t1-$t0:.2f}')") | $(executions) |"
warm=$(free_port); start_pgcache "$warm" --rules "$work/rules" "${l2[@]}"
first_read "$warm"; reset_stats
t0=$(seconds); read_all "$warm"; t1=$(seconds)
echo "| from the L2 | $(python3 -c "print(f'{$t1-$t0:.2f}')") | $(executions) |"
# A warm file: one instance reads every key and shuts down (SIGTERM); the next starts from it.
first=$(free_port); start_pgcache "$first" --rules "$work/rules" --config "$work/warm.toml"
read_all "$first"
kill -TERM "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true
saved=$(python3 -c "import json; print(len(json.load(open('$work/warm.json'))['statements']))")
t0=$(seconds)
next=$(free_port); start_pgcache "$next" --rules "$work/rules" --config "$work/warm.toml"
# Warming runs at warm_rate (1000/s): wait for it, then read.
sleep "$(python3 -c "print($keys / 1000 + 2)")"
reset_stats
t1=$(seconds); read_all "$next"; t2=$(seconds)
echo "| from a warm file of $saved statements (warming took under $(python3 -c "print(f'{$t1-$t0:.1f}')") s) | $(python3 -c "print(f'{$t2-$t1:.2f}')") | $(executions) |"
