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
pool_mode = transaction
max_client_conn = 1000
default_pool_size = $pool
ignore_startup_parameters = extra_float_digits,options
logfile = $work/pgbouncer.log
INI
  echo '"postgres" ""' >"$work/users.txt"
  [[ $(id -u) -eq 0 ]] && chown postgres "$work"/pgbouncer.ini "$work"/users.txt
  as_pg pgbouncer "$work/pgbouncer.ini" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p "$bport" && break; sleep 0.1; done
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
