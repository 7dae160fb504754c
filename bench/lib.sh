# Shared by the benchmark scripts: a throwaway cluster and a release build of pgcache.
# Source it; it defines $pgport, $work, $host, start_cluster, start_pgcache, run_pgbench, cleanup.
# PGCACHE_BIN=path: run that pgcache binary instead of building one (to compare two builds).
# TRANSPORT=unix: clients, PgBouncer and pgcache's upstream connect through Unix sockets in
# $work (what a sidecar on the same host can use) instead of loopback TCP; $host is then $work.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pgbin=$(dirname "$(command -v pg_ctl 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
as_pg() { if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

work=$(mktemp -d /tmp/pgcache-bench.XXXXXX)
chmod 755 "$work"
[[ $(id -u) -eq 0 ]] && chown postgres "$work"
pgport=$(free_port)
transport=${TRANSPORT:-tcp}
case $transport in
  tcp) host=127.0.0.1 ;;
  unix) host=$work ;;
  *) echo "TRANSPORT must be tcp or unix, not $transport" >&2; exit 2 ;;
esac
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # What runuser started (PgBouncer) outlives killing runuser.
  pkill -f "$work/" 2>/dev/null || true
  as_pg "$pgbin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  [[ -n ${KEEP_WORK:-} ]] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT

# start_cluster SCALE: initdb, start, pgbench -i.
start_cluster() {
  [[ -n ${PGCACHE_BIN:-} ]] || cargo build --release --quiet --manifest-path "$root/Cargo.toml"
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
  pgbench -h 127.0.0.1 -p "$pgport" -U postgres -i -s "$1" -q postgres >/dev/null 2>&1
}

# start_pgcache PORT [ARGS...]: pgcache in front of the cluster (log filter: BENCH_LOG, default warn).
start_pgcache() {
  local port=$1
  shift
  local unix=() auth=(--auth trust)
  [[ $transport == unix ]] && unix=(--unix-socket-dir "$work")
  # The throwaway cluster trusts postgres: so does pgcache here (loopback only), unless told.
  [[ " $* " == *" --auth "* ]] && auth=()
  PGCACHE_LOG=${BENCH_LOG:-warn} "${PGCACHE_BIN:-$root/target/release/pgcache}" --listen "127.0.0.1:$port" --admin "127.0.0.1:$(free_port)" "${unix[@]}" \
    --upstream "host=$host port=$pgport user=postgres dbname=postgres sslmode=disable" --pool-size "${POOL_SIZE:-32}" "${auth[@]}" "$@" 2>>"$work/pgcache.log" &
  pids+=($!)
  for _ in $(seq 50); do pg_isready -q -h "$host" -p "$port" && return; sleep 0.1; done
}

# start_pgbouncer PORT MODE POOL: PgBouncer (trust auth, pool_mode MODE, POOL connections) in
# front of the cluster; returns 1 if PgBouncer is not installed.
start_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 || return 1
  local port=$1 mode=$2 pool=$3
  cat >"$work/pgbouncer.ini" <<INI
[databases]
postgres = host=$host port=$pgport
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $([[ $transport == unix ]] && echo "$work")
auth_type = trust
auth_file = $work/users.txt
pool_mode = $mode
max_client_conn = 1000
default_pool_size = $pool
ignore_startup_parameters = extra_float_digits,options
logfile = $work/pgbouncer.log
INI
  echo '"postgres" ""' >"$work/users.txt"
  [[ $(id -u) -eq 0 ]] && chown postgres "$work"/pgbouncer.ini "$work"/users.txt
  as_pg pgbouncer "$work/pgbouncer.ini" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 50); do pg_isready -q -h "$host" -p "$port" && return 0; sleep 0.1; done
}

# run_pgbench PORT CLIENTS SECONDS ARGS... -> "tps latency_ms"
run_pgbench() {
  local port=$1 clients=$2 secs=$3 out
  shift 3
  out=$(pgbench -h "$host" -p "$port" -U postgres -n -c "$clients" -j "$(( clients < 2 ? clients : 2 ))" -T "$secs" "$@" postgres 2>&1)
  echo "$(grep -oP 'tps = \K[0-9.]+' <<<"$out") $(grep -oP 'latency average = \K[0-9.]+' <<<"$out")"
}

ratio() { python3 -c "import sys; a, b = (float(x or 0) for x in sys.argv[1:3]); print(f'{a / b:.2f}' if b else '-')" "${1:-}" "${2:-}"; }
