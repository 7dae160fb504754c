#!/usr/bin/env bash
# Pass-through benchmark: pgbench -S (point selects) against Postgres directly, through
# pgcache, and through PgBouncer when it is installed, all in one run against one throwaway
# cluster, so the ratios compare like with like. No cache rules are loaded: this measures the
# proxy hop and the pool.
#
# Usage: bench/passthrough.sh [seconds-per-run] [scale]
# Prints a Markdown table: TPS and mean latency per target, and the ratio to direct Postgres.
set -euo pipefail
secs=${1:-10}
scale=${2:-10}
root=$(cd "$(dirname "$0")/.." && pwd)

pgbin=$(dirname "$(command -v pg_ctl 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --quiet --manifest-path "$root/Cargo.toml"

work=$(mktemp -d /tmp/pgcache-bench.XXXXXX)
chmod 755 "$work"
[[ $(id -u) -eq 0 ]] && chown postgres "$work"
pgport=$(free_port); pcport=$(free_port); bport=$(free_port); admin=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  as_pg "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

as_pg "$pgbin/initdb" -D "$work/data" -A trust -U postgres --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
port = $pgport
listen_addresses = '127.0.0.1'
unix_socket_directories = '$work'
max_connections = 200
shared_buffers = 256MB
fsync = off
synchronous_commit = off
CONF
as_pg "$pgbin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
pgbench -h 127.0.0.1 -p "$pgport" -U postgres -i -s "$scale" -q postgres >/dev/null 2>&1

PGCACHE_LOG=warn "$root/target/release/pgcache" --listen "127.0.0.1:$pcport" --admin "127.0.0.1:$admin" \
  --upstream "postgres://postgres@127.0.0.1:$pgport/postgres?sslmode=disable" --pool-size 32 2>"$work/pgcache.log" &
pids+=($!)
targets=("direct:$pgport" "pgcache:$pcport")
if command -v pgbouncer >/dev/null 2>&1; then
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
fi
sleep 1

run() { # mode clients port -> "tps latency_ms"
  local out
  out=$(pgbench -h 127.0.0.1 -p "$3" -U postgres -n -S -M "$1" -c "$2" -j "$(( $2 < 2 ? $2 : 2 ))" -T "$secs" postgres 2>&1)
  echo "$(grep -oP 'tps = \K[0-9.]+' <<<"$out") $(grep -oP 'latency average = \K[0-9.]+' <<<"$out")"
}

echo "pgbench -S, scale $scale, ${secs}s per run, $(nproc) cores, $(date -u +%F)"
echo
printf '| mode | clients | target | TPS | mean latency (ms) | TPS vs direct |\n|---|---|---|---|---|---|\n'
for mode in simple prepared; do
  for clients in 1 16; do
    base=""
    for t in "${targets[@]}"; do
      name=${t%%:*}; port=${t##*:}
      read -r tps lat < <(run "$mode" "$clients" "$port")
      [[ -z $base ]] && base=$tps
      ratio=$(python3 -c "print(f'{$tps/$base:.2f}')")
      printf '| %s | %s | %s | %.0f | %.3f | %s |\n' "$mode" "$clients" "$name" "$tps" "$lat" "$ratio"
    done
  done
done
