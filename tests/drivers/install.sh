#!/usr/bin/env bash
# Installs what the driver suite (tests/drivers.rs) runs: asyncpg and psycopg 3 from PyPI,
# node-postgres from npm (into tests/drivers/node/node_modules), pgjdbc and a JRE from Debian.
# Idempotent; .ci/run calls it, and so can you once.
set -euo pipefail
cd "$(dirname "$0")"
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
need=()
command -v java >/dev/null 2>&1 || need+=(default-jre-headless)
[[ -f /usr/share/java/postgresql.jar ]] || need+=(libpostgresql-jdbc-java)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
if ! python3 -c 'import asyncpg, psycopg' 2>/dev/null; then
  # Debian's own python3 refuses system-wide installs (PEP 668) unless told otherwise.
  python3 -m pip install -q -r requirements.txt 2>/dev/null ||
    python3 -m pip install -q --break-system-packages -r requirements.txt
fi
[[ -d node/node_modules/pg ]] || npm ci --prefix node --no-audit --no-fund --loglevel=error
echo "driver suite ready: $(python3 -c 'import asyncpg, psycopg; print("asyncpg", asyncpg.__version__, "psycopg", psycopg.__version__)'), node-postgres $(node -p 'require("./node/node_modules/pg/package.json").version'), $(basename "$(readlink -f /usr/share/java/postgresql.jar)")"
