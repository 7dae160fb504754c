#!/usr/bin/env bash
# The performance table in one command, every cell measured side by side in one run against one
# throwaway cluster: direct Postgres, PgBouncer (session mode, when installed), pgcache with no
# rules (pass-through) and pgcache with rules (hits), in session and in transaction pooling. For
# each run: TPS, the ratio to direct, p99 latency (from pgbench's per-transaction log, 10 % sampled), and pgcache's own CPU per
# statement (utime+stime from /proc/PID/stat over the run, divided by the statements pgbench
# completed; every transaction here is one statement).
#
# Usage: bench/compare.sh [seconds-per-run] [clients] [results-file]
#   defaults: 10 s, 16 clients, bench/results/compare-<date>.md
# Workloads (scale 10):
#   select-simple / select-prepared   pgbench -S, no rules: the proxy hop and the pool; and
#                                     through the rule: random keys over 1 M accounts, nearly
#                                     every read a miss (what a rule costs)
#   hot-simple / hot-prepared         point select over 1000 accounts, all hits once warm
#   hot-1client                       the same, prepared, one client
#   aggregate                         GROUP BY over all accounts, cached
#   mixed                             90 % hot point selects / 10 % updates of the same rows
#   mixed-random                      90 % point selects / 10 % updates on random keys, with
#                                     no rule and with the rule
# PgBouncer's CPU per statement is read from /proc like pgcache's; pgbench's own CPU per
# transaction and the machine's idle share over each run are reported beside them (on a
# saturated machine TPS is the cores over everyone's CPU per transaction). A last table gives,
# for the workloads run with and without the rule, the rule's TPS over no rule's in ROUNDS
# (default 4: no-rule first in odd rounds, the rule first in even ones) and their median.
# TRANSPORT=unix bench/compare.sh ...: everything through Unix sockets (direct too).
source "$(dirname "$0")/lib.sh"
secs=${1:-10}
clients=${2:-16}
results=${3:-$root/bench/results/compare-$(date -u +%F)$([[ $transport == unix ]] && echo -unix || true).md}
scale=10
rounds=${ROUNDS:-4}
((rounds >= 1)) || { echo "ROUNDS must be at least 1" >&2; exit 2; }
export POOL_SIZE=20
mkdir -p "$(dirname "$results")"
start_cluster "$scale"

mkdir -p "$work/no-rules" "$work/rules"
cat >"$work/rules/bench.toml" <<'RULES'
[[rule]]
name = "accounts"
match = { tables = ["pgbench_accounts"] }
ttl = "10m"
RULES
passport=$(free_port)
start_pgcache "$passport" --rules "$work/no-rules"
passpid=${pids[-1]}
cacheport=$(free_port)
start_pgcache "$cacheport" --rules "$work/rules"
cachepid=${pids[-1]}
# The same rule in transaction pooling: hits are answered while no backend is held.
txnport=$(free_port)
start_pgcache "$txnport" --rules "$work/rules" --pool-mode transaction
txnpid=${pids[-1]}

bouncer=""
bport=$(free_port)
bouncerpid=""
if start_pgbouncer "$bport" session 20; then
  bouncer="pgbouncer:$bport"
  bouncerpid=$(pgrep -n -x pgbouncer)
fi

cat >"$work/hot.sql" <<'SQL'
\set aid random(1, 1000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
cat >"$work/aggregate.sql" <<'SQL'
SELECT bid, count(*), sum(abalance), avg(abalance) FROM pgbench_accounts GROUP BY bid ORDER BY bid;
SQL
# mix_script KEYS: 90 % point selects / 10 % updates over accounts 1..KEYS.
mix_script() {
  cat <<SQL
\\set aid random(1, $1)
\\set r random(1, 100)
\\if :r <= 90
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\\else
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
\\endif
SQL
}
mix_script 1000 >"$work/mixed.sql"
mix_script $((scale * 100000)) >"$work/mixed-random.sql"

# cpu_ticks PID: utime and stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
tick_us=$(python3 -c "import os; print(1e6 / os.sysconf('SC_CLK_TCK'))")
# box_ticks: the machine's idle ticks (idle + iowait) and all its ticks, from /proc/stat.
# (guest time is already counted in user time: fields 2-9 only.)
box_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= 9; i++) t += $i; print $5 + $6, t}' /proc/stat; }

# measure NAME PORT PID CLIENTS ARGS... -> prints one table row; PID is "" for non-pgcache.
measure() {
  local name=$1 port=$2 pid=$3 n=$4
  shift 4
  local logdir="$work/log-$RANDOM"
  mkdir -p "$logdir"
  local before="0 0" after="0 0" box_before box_after client
  [[ -n $pid ]] && before=$(cpu_ticks "$pid")
  box_before=$(box_ticks)
  local out TIMEFORMAT='%3U %3S' LC_NUMERIC=C
  # pgbench's own CPU (bash's `time`: user and system seconds of what it ran).
  client=$( { time (cd "$logdir" && pgbench -h "$host" -p "$port" -U postgres -n -c "$n" -j "$(( n < 2 ? n : 2 ))" -T "$secs" \
    --log --sampling-rate=0.1 "$@" postgres >"$logdir/out" 2>&1); } 2>&1)
  out=$(cat "$logdir/out")
  box_after=$(box_ticks)
  [[ -n $pid ]] && after=$(cpu_ticks "$pid")
  local tps txns p99 cpu="-"
  tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -1)
  txns=$(grep -oP 'number of transactions actually processed: \K[0-9]+' <<<"$out")
  # Column 3 of pgbench's log is the transaction's latency in microseconds.
  p99=$(cat "$logdir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {i=int(NR*0.99); if (i<1) i=1; printf "%.3f", a[i]/1000}')
  # Total (user + system) and, in parentheses, userland alone.
  [[ -n $pid && $txns -gt 0 ]] && cpu=$(python3 -c "
b, a = [int(x) for x in '$before'.split()], [int(x) for x in '$after'.split()]
u, s = (a[0] - b[0]) * $tick_us / $txns, (a[1] - b[1]) * $tick_us / $txns
print(f'{u + s:.1f} ({u:.1f})')")
  local per_txn idle
  per_txn=$(python3 -c "u, s = '$client'.split(); n = int('${txns:-0}' or 0); print(f'{(float(u) + float(s)) * 1e6 / n:.1f}' if n else '-')")
  idle=$(python3 -c "b, a = '$box_before'.split(), '$box_after'.split(); print(f'{100 * (int(a[0]) - int(b[0])) / max(int(a[1]) - int(b[1]), 1):.0f}')")
  rm -rf "$logdir"
  echo "$name|$tps|$p99|$cpu|$per_txn|$idle"
}

warm() {
  for p in "$cacheport" "$txnport"; do
    pgbench -h "$host" -p "$p" -U postgres -n -c 4 -j 2 -T 3 "$@" postgres >/dev/null 2>&1
  done
}

{
  echo "# pgcache vs direct Postgres ($(date -u '+%F %H:%M') UTC)"
  echo
  echo "$(nproc) cores; pgbench scale $scale; ${secs}s per run; $clients clients unless said; every target in"
  echo "one run against one cluster, over $transport sockets. pgcache: release build, --pool-size 20. CPU is the proxy's own per statement (pgcache's or PgBouncer's, from /proc);"
  echo "pgbench's own per transaction, and how much of the machine's CPU time was idle during the run (0: saturated)."
  echo
  echo "| workload | target | TPS | vs direct | p99 (ms) | proxy CPU/stmt, µs (userland) | pgbench CPU/txn, µs | box idle % |"
  echo "|---|---|---|---|---|---|---|---|"
} >"$results"

# row WORKLOAD BASE [ROUND]: the table row of what measure printed (only round 1's is written).
row() {
  local workload=$1 base=$2 round=${3:-1} name tps p99 cpu client idle
  IFS="|" read -r name tps p99 cpu client idle
  ((round == 1)) && printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$workload" "$name" "$tps" \
    "$(ratio "$tps" "${base:-$tps}")" "$p99" "$cpu" "$client" "$idle" >>"$results"
  echo "$tps"
}

run_workload() {
  local workload=$1 n=$2 port_for_cache=$3
  shift 3
  local base
  base=$(measure direct "$pgport" "" "$n" "$@" | row "$workload" "")
  if [[ -n $bouncer ]]; then
    measure pgbouncer "${bouncer##*:}" "$bouncerpid" "$n" "$@" | row "$workload" "$base" >/dev/null
  fi
  if [[ $port_for_cache == pass ]]; then
    measure "pgcache (no rules)" "$passport" "$passpid" "$n" "$@" | row "$workload" "$base" >/dev/null
  elif [[ $port_for_cache == both ]]; then
    # The main table gets the first round; the rule-vs-none table every round (alternating
    # which instance runs first: the second of a pair fares worse on this kind of box) and
    # the median of their ratios.
    local plain ruled plains=() ruleds=() ratios=() round
    for round in $(seq "$rounds"); do
      if ((round % 2)); then
        plain=$(measure "pgcache (no rules)" "$passport" "$passpid" "$n" "$@" | row "$workload" "$base" "$round")
        ruled=$(measure "pgcache (rule)" "$cacheport" "$cachepid" "$n" "$@" | row "$workload" "$base" "$round")
      else
        ruled=$(measure "pgcache (rule)" "$cacheport" "$cachepid" "$n" "$@" | row "$workload" "$base" "$round")
        plain=$(measure "pgcache (no rules)" "$passport" "$passpid" "$n" "$@" | row "$workload" "$base" "$round")
      fi
      plains+=("$(printf '%.0f' "$plain")")
      ruleds+=("$(printf '%.0f' "$ruled")")
      ratios+=("$(ratio "$ruled" "$plain")")
    done
    local median
    median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {m = int((NR+1)/2); printf "%.2f", NR % 2 ? a[m] : (a[m]+a[m+1])/2}')
    printf '| %s | %s | %s | %s | **%s** |\n' "$workload" "${plains[*]}" "${ruleds[*]}" "${ratios[*]}" "$median" >>"$work/rule-vs-none"
  else
    measure "pgcache (rule)" "$cacheport" "$cachepid" "$n" "$@" | row "$workload" "$base" >/dev/null
    measure "pgcache (rule, transaction pooling)" "$txnport" "$txnpid" "$n" "$@" | row "$workload" "$base" >/dev/null
  fi
}

run_workload "select, simple" "$clients" both -S -M simple
run_workload "select, prepared" "$clients" both -S -M prepared
run_workload "mixed 90/10, random keys" "$clients" both -M prepared -f "$work/mixed-random.sql"
warm -M simple -f "$work/hot.sql"
run_workload "hot select, simple" "$clients" cache -M simple -f "$work/hot.sql"
warm -M prepared -f "$work/hot.sql"
run_workload "hot select, prepared" "$clients" cache -M prepared -f "$work/hot.sql"
run_workload "hot select, prepared, 1 client" 1 cache -M prepared -f "$work/hot.sql"
warm -M prepared -f "$work/aggregate.sql"
run_workload "aggregate" "$clients" cache -M prepared -f "$work/aggregate.sql"
run_workload "mixed 90/10" "$clients" cache -M prepared -f "$work/mixed.sql"

{
  echo
  echo "A rule on the table against none, same run (random keys: nearly every read a miss), $rounds"
  echo "rounds of each, alternating which instance runs first:"
  echo
  echo "| workload | no rules TPS | rule TPS | rule / no rules | median |"
  echo "|---|---|---|---|---|"
  cat "$work/rule-vs-none"
} >>"$results"
cat "$results"
echo
echo "written to $results"
