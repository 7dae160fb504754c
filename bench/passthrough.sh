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
if command -v pgbouncer >/dev/null 2>&1; then
  bport=$(free_port)
  cat >"$work/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$pgport
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bport
unix_socket_dir =
auth_type = trust
auth_file = $work/users.txt
pool_mode = session
max_client_conn = 200
default_pool_size = 32
ignore_startup_parameters = extra_float_digits,options
logfile = $work/pgbouncer.log
INI
  echo '"postgres" ""' >"$work/users.txt"
  [[ $(id -u) -eq 0 ]] && chown postgres "$work"/pgbouncer.ini "$work"/users.txt
  as_pg pgbouncer "$work/pgbouncer.ini" >/dev/null 2>&1 &
  pids+=($!)
  targets+=("pgbouncer:$bport")
  sleep 1
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
