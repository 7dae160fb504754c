#!/usr/bin/env bash
# Pass-through benchmark: pgbench -S (point selects) against Postgres directly, through
# pgcache, and through PgBouncer when it is installed, all in one run against one throwaway
# cluster, so the ratios compare like with like. No cache rules are loaded: this measures the
# proxy hop and the pool.
#
# Usage: bench/passthrough.sh [seconds-per-run] [scale]
# Prints a Markdown table: TPS and mean latency per target, and the ratio to direct Postgres.
source "$(dirname "$0")/lib.sh"
secs=${1:-10}
scale=${2:-10}
start_cluster "$scale"
pcport=$(free_port)
mkdir -p "$work/no-rules"
start_pgcache "$pcport" --rules "$work/no-rules"
targets=("direct:$pgport" "pgcache:$pcport")
bport=$(free_port)
if start_pgbouncer "$bport" session 32; then
  targets+=("pgbouncer:$bport")
fi

echo "pgbench -S, scale $scale, ${secs}s per run, $(nproc) cores, $(date -u +%F)"
echo
printf '| mode | clients | target | TPS | mean latency (ms) | TPS vs direct |\n|---|---|---|---|---|---|\n'
for mode in simple prepared; do
  for clients in 1 16; do
    base=""
    for t in "${targets[@]}"; do
      read -r tps lat < <(run_pgbench "${t##*:}" "$clients" "$secs" -S -M "$mode")
      [[ -z $base ]] && base=$tps
      printf '| %s | %s | %s | %.0f | %.3f | %s |\n' "$mode" "$clients" "${t%%:*}" "$tps" "$lat" "$(ratio "$tps" "$base")"
    done
  done
done
