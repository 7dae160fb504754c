#!/usr/bin/env bash
# Memory per idle client in transaction pooling: pgcache's RSS with N clients connected, each
# having run one statement and now idle (holding no backend), against its RSS before they came.
#
# Usage: bench/idle.sh [clients] [pool-size]
# IDLE_QUERY=0: the clients only log in (no statement) before idling.
# Prints the RSS before and after, and the difference per client.
source "$(dirname "$0")/lib.sh"
clients=${1:-10000}
POOL_SIZE=${2:-8}
ulimit -n "$(ulimit -Hn)"  # each process holds one socket per client
start_cluster 1
port=$(free_port)
start_pgcache "$port" --pool-mode transaction --auth trust
pid=${pids[-1]}
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
# Warm: one client through the whole path, so what is allocated once is not counted per client.
python3 "$root/bench/idle_clients.py" 127.0.0.1 "$port" postgres postgres 10 </dev/null >/dev/null
sleep 3
before=$(rss)
fifo="$work/hold"
mkfifo "$fifo"
python3 "$root/bench/idle_clients.py" 127.0.0.1 "$port" postgres postgres "$clients" <"$fifo" >"$work/idle.out" &
holder=$!
exec 3>"$fifo"
for _ in $(seq 600); do grep -q ready "$work/idle.out" 2>/dev/null && break; sleep 0.2; done
grep -q ready "$work/idle.out" || { echo "the clients did not all connect" >&2; cat "$work/idle.out" >&2; exit 1; }
# pgcache gives the heap's free pages back after a crowd of clients, at the first upkeep tick
# (once a second) with none coming or going: measured after that.
sleep 4
after=$(rss)
backends=$(psql -h 127.0.0.1 -p "$pgport" -U postgres -Atc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" postgres)
exec 3>&-
wait "$holder" 2>/dev/null || true
echo "clients: $clients  pool: $POOL_SIZE  Postgres client backends: $backends"
echo "pgcache RSS before: ${before} KiB  with idle clients: ${after} KiB"
python3 -c "print(f'per idle client: {($after - $before) * 1024 / $clients:.0f} bytes')"
