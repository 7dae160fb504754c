#!/usr/bin/env bash
# What many rules cost a hot read: pgbench point selects over 1000 hot keys (all cache hits)
# through pgcache with one `tables` rule, and with N `pattern` rules (that match nothing) and N
# `tables` rules (on other tables) ahead of it, side by side in one run, alternating.
#
# Usage: bench/rules.sh [rules] [seconds] [clients] [protocol]
source "$(dirname "$0")/lib.sh"
n=${1:-1000}
secs=${2:-10}
clients=${3:-16}
protocol=${4:-simple}
start_cluster 10
mkdir -p "$work/one" "$work/patterns" "$work/tables"
table_rule='[[rule]]
name  = "accounts"
match = { tables = ["pgbench_accounts"] }
ttl   = "1h"'
echo "$table_rule" >"$work/one/r.toml"
{
  for i in $(seq 1 "$n"); do printf '[[rule]]\nname = "p%d"\nmatch = { pattern = "(?i)\\\\bfrom orders_%d\\\\b" }\nttl = "1m"\n\n' "$i" "$i"; done
  echo "$table_rule"
} >"$work/patterns/r.toml"
{
  for i in $(seq 1 "$n"); do printf '[[rule]]\nname = "t%d"\nmatch = { tables = ["orders_%d"] }\nttl = "1m"\n\n' "$i" "$i"; done
  echo "$table_rule"
} >"$work/tables/r.toml"
cat >"$work/hot.sql" <<'SQL'
\set aid random(1, 1000)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL
one=$(free_port); start_pgcache "$one" --rules "$work/one"
pat=$(free_port); start_pgcache "$pat" --rules "$work/patterns"
tab=$(free_port); start_pgcache "$tab" --rules "$work/tables"
for p in "$one" "$pat" "$tab"; do run_pgbench "$p" "$clients" 2 -M "$protocol" -f "$work/hot.sql" >/dev/null; done
declare -A total=([one]=0 [pat]=0 [tab]=0)
for round in 1 2; do
  for t in one:$one pat:$pat tab:$tab; do
    read -r tps _ < <(run_pgbench "${t#*:}" "$clients" "$secs" -M "$protocol" -f "$work/hot.sql")
    total[${t%%:*}]=$(python3 -c "print(${total[${t%%:*}]} + $tps)")
  done
done
echo "| hot reads, 1000 keys, $clients clients, $protocol protocol (two rounds, alternating) | TPS | ratio to one rule |"
echo "|---|---|---|"
echo "| one tables rule | $(python3 -c "print(f'{${total[one]}/2:.0f}')") | 1.00 |"
echo "| $n pattern rules ahead of it | $(python3 -c "print(f'{${total[pat]}/2:.0f}')") | $(ratio "${total[pat]}" "${total[one]}") |"
echo "| $n tables rules ahead of it | $(python3 -c "print(f'{${total[tab]}/2:.0f}')") | $(ratio "${total[tab]}" "${total[one]}") |"
