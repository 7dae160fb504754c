#!/usr/bin/env bash
# Transaction pooling under many clients, side by side in one run against one throwaway
# cluster: `pgbench -S` with N clients straight to Postgres (N backends), through pgcache in
# transaction mode with a pool of P backends, and through PgBouncer in transaction mode with
# the same pool (when installed; before 1.21 it cannot run -M prepared there).
#
# Usage: bench/transaction.sh [seconds] [clients] [pool]   (defaults: 10 s, 64 clients, pool 8)
source "$(dirname "$0")/lib.sh"
secs=${1:-10}
clients=${2:-64}
pool=${3:-8}
start_cluster 10
mkdir -p "$work/no-rules"
port=$(free_port)
POOL_SIZE=$pool start_pgcache "$port" --pool-mode transaction --rules "$work/no-rules"
bouncer=""
bport=$(free_port)
if start_pgbouncer "$bport" transaction "$pool"; then
  bouncer=$bport
fi
echo "pgbench -S, $clients clients, ${secs}s; pgcache and PgBouncer in transaction mode with $pool backends"
echo
echo "| mode | target | TPS | vs direct | failed |"
echo "|---|---|---|---|---|"
for mode in simple prepared; do
  direct=""
  for target in direct pgcache pgbouncer; do
    case $target in
      direct) p=$pgport ;;
      pgcache) p=$port ;;
      pgbouncer) [[ -z $bouncer ]] && continue; p=$bouncer ;;
    esac
    if ! out=$(pgbench -h 127.0.0.1 -p "$p" -U postgres -n -S -M "$mode" -c "$clients" -j 2 -T "$secs" postgres 2>&1); then
      echo "| $mode | $target | fails: $(grep -m1 -oP 'ERROR: +\K.*' <<<"$out" || echo "pgbench error") | | |"
      continue
    fi
    tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out")
    failed=$(grep -oP 'number of failed transactions: \K[0-9]+' <<<"$out" || echo 0)
    [[ -z $direct ]] && direct=$tps
    printf '| %s | %s | %.0f | %s | %s |\n' "$mode" "$target" "$tps" "$(ratio "$tps" "$direct")" "$failed"
  done
done
