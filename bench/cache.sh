#!/usr/bin/env bash
# Cache benchmark, measured side by side in one run against one throwaway cluster:
#  1. cached point selects (pgbench_accounts by primary key over a working set of 10 000
#     accounts, warmed first) at 1 and 16 clients, simple and prepared, direct vs pgcache;
#  2. an expensive aggregate over pgbench_accounts at 1 client: mean latency direct vs
#     cached.
#
# Usage: bench/cache.sh [seconds-per-run] [scale]
source "$(dirname "$0")/lib.sh"
secs=${1:-10}
scale=${2:-10}
start_cluster "$scale"
mkdir -p "$work/rules"
cat >"$work/rules/bench.toml" <<'RULES'
[[rule]]
name = "account-balance"
match = { query = "SELECT abalance FROM pgbench_accounts WHERE aid = $1" }
ttl = "10m"

[[rule]]
name = "branch-report"
match = { tables = ["pgbench_accounts"] }
ttl = "10m"
RULES
pcport=$(free_port)
start_pgcache "$pcport" --rules "$work/rules"

cat >"$work/point.sql" <<'SQL'
\set aid random(1, 10000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
cat >"$work/aggregate.sql" <<'SQL'
SELECT bid, count(*), sum(abalance), avg(abalance) FROM pgbench_accounts GROUP BY bid ORDER BY bid;
SQL
# Warm the working set through pgcache in both protocols.
for mode in simple prepared; do
  run_pgbench "$pcport" 8 5 -M "$mode" -f "$work/point.sql" >/dev/null
done

echo "pgcache cache benchmark, scale $scale, ${secs}s per run, $(nproc) cores, $(date -u +%F)"
echo
echo "Cached point selects (10 000-account working set):"
echo
printf '| mode | clients | direct TPS | pgcache TPS | ratio | direct latency (ms) | pgcache latency (ms) |\n|---|---|---|---|---|---|---|\n'
for mode in simple prepared; do
  for clients in 1 16; do
    read -r dt dl < <(run_pgbench "$pgport" "$clients" "$secs" -M "$mode" -f "$work/point.sql")
    read -r ct cl < <(run_pgbench "$pcport" "$clients" "$secs" -M "$mode" -f "$work/point.sql")
    printf '| %s | %s | %.0f | %.0f | %s | %.3f | %.3f |\n' "$mode" "$clients" "$dt" "$ct" "$(ratio "$ct" "$dt")" "$dl" "$cl"
  done
done
echo
echo "Expensive aggregate (GROUP BY over all $((scale * 100000)) accounts), 1 client:"
echo
run_pgbench "$pcport" 1 2 -M prepared -f "$work/aggregate.sql" >/dev/null
read -r dt dl < <(run_pgbench "$pgport" 1 "$secs" -M prepared -f "$work/aggregate.sql")
read -r ct cl < <(run_pgbench "$pcport" 1 "$secs" -M prepared -f "$work/aggregate.sql")
printf '| target | mean latency (ms) | TPS |\n|---|---|---|\n| direct | %.3f | %.1f |\n| pgcache (cached) | %.3f | %.1f |\n' "$dl" "$dt" "$cl" "$ct"
echo
echo "latency ratio direct/pgcache: $(ratio "$dl" "$cl")x"
