#!/usr/bin/env bash
# Fleet coherence, in one run against one throwaway cluster:
#  - the cross-instance window: a write through instance A, until instance B (which holds the
#    row in its cache) answers with it — p50, p99, max over many writes;
#  - the bypass window: a write straight to Postgres, with `pgcache triggers install`, until
#    an instance answers with it;
#  - the cost of peer invalidation on writes: pgbench TPC-B through pgcache with peers on and
#    off, interleaved, same rules.
#
# Usage: bench/peers.sh [rounds] [tpcb-seconds] [scale]
source "$(dirname "$0")/lib.sh"
rounds=${1:-300}
secs=${2:-15}
scale=${3:-10}
start_cluster "$scale"
cargo build --release --quiet --example peer_window --manifest-path "$root/Cargo.toml"
psql -X -q -h 127.0.0.1 -p "$pgport" -U postgres -c "CREATE TABLE window_probe (id int PRIMARY KEY, v text); INSERT INTO window_probe VALUES (1, 'start');" postgres
mkdir -p "$work/rules"
cat >"$work/rules/r.toml" <<'TOML'
[[rule]]
name  = "probe"
match = { tables = ["window_probe"] }
ttl   = "1h"

[[rule]]
name  = "pgbench"
match = { tables = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers"] }
ttl   = "1h"
TOML
a=$(free_port); b=$(free_port); off=$(free_port)
start_pgcache "$a" --rules "$work/rules"
start_pgcache "$b" --rules "$work/rules"
start_pgcache "$off" --rules "$work/rules" --peers off
url() { echo "postgres://postgres@127.0.0.1:$1/postgres?sslmode=disable"; }
window() { "$root/target/release/examples/peer_window" "$(url "$1")" "$(url "$2")" "$rounds"; }

read -r p50 p99 max < <(window "$a" "$b")
echo "| cross-instance window (write through A, read through B) | p50 ${p50} ms | p99 ${p99} ms | max ${max} ms |"

"$root/target/release/pgcache" triggers install --upstream "$(url "$pgport")" --rules "$work/rules" >/dev/null
read -r p50 p99 max < <(window "$pgport" "$b")
echo "| bypass window (write straight to Postgres, triggers installed) | p50 ${p50} ms | p99 ${p99} ms | max ${max} ms |"
# The triggers' cost per write: TPC-B straight to Postgres with and without them, interleaved.
with_total=0; without_total=0
for i in 1 2; do
  read -r tps _ < <(run_pgbench "$pgport" 8 "$secs")
  with_total=$(python3 -c "print($with_total + $tps)")
  "$root/target/release/pgcache" triggers uninstall --upstream "$(url "$pgport")" --rules "$work/rules" >/dev/null
  read -r tps _ < <(run_pgbench "$pgport" 8 "$secs")
  without_total=$(python3 -c "print($without_total + $tps)")
  [[ $i -eq 1 ]] && "$root/target/release/pgcache" triggers install --upstream "$(url "$pgport")" --rules "$work/rules" >/dev/null
done
echo "| TPC-B straight to Postgres, 8 clients: triggers installed / not | $(python3 -c "print(f'{$with_total/2:.0f}')") / $(python3 -c "print(f'{$without_total/2:.0f}')") TPS | ratio $(ratio "$with_total" "$without_total") | |"

on_total=0; off_total=0
for i in 1 2; do
  read -r tps _ < <(run_pgbench "$a" 8 "$secs")
  on_total=$(python3 -c "print($on_total + $tps)")
  read -r tps _ < <(run_pgbench "$off" 8 "$secs")
  off_total=$(python3 -c "print($off_total + $tps)")
done
echo "| TPC-B through pgcache, 8 clients: peers on / off | $(python3 -c "print(f'{$on_total/2:.0f}')") / $(python3 -c "print(f'{$off_total/2:.0f}')") TPS | ratio $(ratio "$on_total" "$off_total") | |"
