#!/usr/bin/env bash
# Read replicas, in one run against one throwaway primary and one streaming replica
# (pg_basebackup -R) on this machine: pgbench through pgcache in transaction pooling with no
# replica, and with one under each read_your_writes mode, beside direct Postgres (and the
# select and mix workloads again in session pooling, no replica and one):
#  - point selects on random keys (pgbench -S): every read may go to the replica;
#  - 90 % point selects / 10 % updates per client: a session's reads after its own update go
#    to the primary until the replica has replayed it (session), or every read after any
#    update does (causal) — what tracking WAL positions costs.
# Without rules (what routing and tracking cost), and the mix again with a cache rule on
# pgbench_accounts (misses filled from the replica when it has replayed the writes to their
# keys). The share of reads the replica took is read from SHOW REPLICAS. Primary and replica share
# this machine's cores, so a replica cannot add throughput here: the figures show what routing
# and tracking cost, not what a replica on its own host would add.
#
# Usage: bench/replicas.sh [seconds] [clients]
source "$(dirname "$0")/lib.sh"
secs=${1:-10}
clients=${2:-16}
start_cluster 10
rport=$(free_port)
basebackup=$(dirname "$(readlink -f "$pgbin/pg_ctl")")/pg_basebackup
as_pg "$basebackup" -D "$work/replica" -h "$work" -p "$pgport" -U postgres -X stream -c fast -R --no-sync
cat >>"$work/replica/postgresql.conf" <<CONF
port = $rport
hot_standby = on
CONF
as_pg "$pgbin/pg_ctl" -D "$work/replica" -l "$work/replica.log" -w start >/dev/null
trap 'as_pg "$pgbin/pg_ctl" -D "$work/replica" -m immediate stop >/dev/null 2>&1 || true; cleanup' EXIT

for mode in session causal off; do
  printf '[replica]\nread_your_writes = "%s"\ncheck_interval = "20ms"\n' "$mode" >"$work/$mode.toml"
done
cat >"$work/mix.sql" <<'SQL'
\set aid random(1, 1000000)
\set r random(1, 10)
\if :r = 1
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
\else
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
\endif
SQL
mkdir -p "$work/none" "$work/rule"
cat >"$work/rule/r.toml" <<'TOML'
[[rule]]
name  = "accounts"
match = { tables = ["pgbench_accounts"] }
ttl   = "1h"
TOML
replica=(--replica "host=127.0.0.1 port=$rport sslmode=disable")
tx=(--pool-mode transaction)
none=$(free_port); start_pgcache "$none" "${tx[@]}" --rules "$work/none"
session=$(free_port); start_pgcache "$session" "${tx[@]}" --rules "$work/none" "${replica[@]}" --config "$work/session.toml"
causal=$(free_port); start_pgcache "$causal" "${tx[@]}" --rules "$work/none" "${replica[@]}" --config "$work/causal.toml"
off=$(free_port); start_pgcache "$off" "${tx[@]}" --rules "$work/none" "${replica[@]}" --config "$work/off.toml"
none_rule=$(free_port); start_pgcache "$none_rule" "${tx[@]}" --rules "$work/rule"
session_rule=$(free_port); start_pgcache "$session_rule" "${tx[@]}" --rules "$work/rule" "${replica[@]}" --config "$work/session.toml"
sp=(--pool-mode session)
sp_none=$(free_port); start_pgcache "$sp_none" "${sp[@]}" --rules "$work/none"
sp_session=$(free_port); start_pgcache "$sp_session" "${sp[@]}" --rules "$work/none" "${replica[@]}" --config "$work/session.toml"
sleep 1
reads_on_replica() {
  psql -X -q -At -h 127.0.0.1 -p "$1" -U postgres -c "SHOW REPLICAS" pgcache | cut -d'|' -f7
}

for workload in select mix mix_rule select_sp mix_sp; do
  targets=(direct:$pgport none:$none session:$session causal:$causal off:$off)
  [[ $workload == mix_rule ]] && targets=(direct:$pgport none:$none_rule session:$session_rule)
  [[ $workload == *_sp ]] && targets=(direct:$pgport none:$sp_none session:$sp_session)
  args=(-S)
  [[ $workload == mix* ]] && args=(-f "$work/mix.sql")
  declare -A tps lat share
  for t in "${targets[@]}"; do run_pgbench "${t#*:}" "$clients" 2 "${args[@]}" >/dev/null; done
  for t in "${targets[@]}"; do
    name=${t%%:*} port=${t#*:}
    before=0
    [[ $name != direct && $name != none ]] && before=$(reads_on_replica "$port")
    [[ $workload == mix_rule && $name != direct ]] && psql -X -q -h 127.0.0.1 -p "$port" -U postgres -c "INVALIDATE ALL" pgcache >/dev/null
    read -r tps[$name] lat[$name] < <(run_pgbench "$port" "$clients" "$secs" "${args[@]}")
    if [[ $name != direct && $name != none ]]; then
      after=$(reads_on_replica "$port")
      # Reads are 100 % of -S and about 90 % of the mix.
      share[$name]=$(python3 -c "r=$after-$before; t=${tps[$name]}*$secs*(1 if '$workload'.startswith('select') else 0.9); print(f'{100*r/t:.0f} %')")
    else
      share[$name]="–"
    fi
  done
  echo
  title="${workload%_sp}" pooling="transaction pooling"
  [[ $workload == mix_rule ]] && title="mix with a cache rule on pgbench_accounts"
  [[ $workload == *_sp ]] && pooling="session pooling"
  echo "| $title, $clients clients, $pooling | TPS | ratio to direct | ratio to no replica | latency ms | reads on the replica |"
  echo "|---|---|---|---|---|---|"
  for t in "${targets[@]}"; do
    name=${t%%:*}
    label=$name
    case $name in
      direct) label="direct Postgres" ;;
      none) label="pgcache, no replica" ;;
      *) label="pgcache, 1 replica, read_your_writes = $name" ;;
    esac
    echo "| $label | ${tps[$name]} | $(ratio "${tps[$name]}" "${tps[direct]}") | $(ratio "${tps[$name]}" "${tps[none]}") | ${lat[$name]} | ${share[$name]} |"
  done
  unset tps lat share
done
