#!/usr/bin/env bash
# What hostile clients cost pgcache in memory (release build, one run):
#   1. a client that pipelines N cached 100 kB results and never reads its socket: RSS before,
#      while it is connected, and after it left;
#   2. M SCRAM log-ins as roles that do not exist: RSS before and after, the pools and metric
#      series they left (none), and the refusals counted.
#
# Usage: bench/hostile.sh [pipelined] [logins]   (defaults 20000 and 10000)
source "$(dirname "$0")/lib.sh"
pipelined=${1:-20000}
logins=${2:-10000}
start_cluster 1
port=$(free_port)
admin=$(free_port)
mkdir -p "$work/rules"
printf '[[rule]]\nname = "all"\nmatch = { pattern = "." }\nttl = "10m"\n' >"$work/rules/all.toml"
printf '[auth]\nfailure_delay = "1ms"\n' >"$work/pgcache.toml"
# SCRAM (the default), so unknown roles go through the whole exchange.
PGCACHE_LOG=warn "$root/target/release/pgcache" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
  --upstream "postgres://postgres@127.0.0.1:$pgport/postgres?sslmode=disable" --rules "$work/rules" \
  --config "$work/pgcache.toml" --auth cleartext 2>>"$work/pgcache.log" &
pids+=($!)
pid=$!
for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }

echo "## A client that pipelines $pipelined cached 100 kB results and never reads"
fifo="$work/go"; mkfifo "$fifo"
python3 "$root/bench/hostile_clients.py" pipeline 127.0.0.1 "$port" "$pipelined" <"$fifo" >"$work/hog.out" &
exec 3>"$fifo"
for _ in $(seq 100); do grep -q warm "$work/hog.out" && break; sleep 0.1; done
before=$(rss)
echo >&3
for _ in $(seq 100); do grep -q sent "$work/hog.out" && break; sleep 0.1; done
sleep 1
during=$(rss)
echo >&3
exec 3>&-
sleep 2
after=$(rss)
grep sent "$work/hog.out"
echo "RSS before ${before} KiB, with the client $during KiB (+$(( during - before ))), after it left $after KiB (+$(( after - before )))"
echo

# The log-ins: restart with SCRAM.
kill "$pid"; wait "$pid" 2>/dev/null || true
PGCACHE_LOG=warn "$root/target/release/pgcache" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" \
  --upstream "postgres://postgres@127.0.0.1:$pgport/postgres?sslmode=disable" --rules "$work/rules" \
  --config "$work/pgcache.toml" 2>>"$work/pgcache.log" &
pids+=($!)
pid=$!
for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.1; done
echo "## $logins SCRAM log-ins as roles that do not exist"
series_before=$(curl -s "127.0.0.1:$admin/metrics" | grep -vc '^#')
before=$(rss)
python3 "$root/bench/hostile_clients.py" logins 127.0.0.1 "$port" "$logins" 50
sleep 1
after=$(rss)
series_after=$(curl -s "127.0.0.1:$admin/metrics" | grep -vc '^#')
failures=$(curl -s "127.0.0.1:$admin/metrics" | awk '/^pgcache_login_failures_total/ {print $2}')
echo "RSS before ${before} KiB, after ${after} KiB (+$(( after - before )) KiB, $(python3 -c "print(f'{($after - $before) * 1024 / $logins:.0f}')") bytes per log-in)"
echo "metric series before $series_before, after $series_after; pgcache_login_failures_total $failures"
