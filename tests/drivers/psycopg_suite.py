"""psycopg 3 through pgcache: what a Python app does, checked against what Postgres must answer.

Run by tests/drivers.rs with PGCACHE_URL (through pgcache), PGCACHE_DIRECT_URL (straight to
Postgres, for proofs) and PGCACHE_MODE (plain: no rules; cached: every SELECT cached).
"""
import datetime
import decimal
import os
import threading
import time
import uuid

import psycopg
from psycopg import errors, sql
from psycopg.types.json import Jsonb

URL, DIRECT, MODE = os.environ["PGCACHE_URL"], os.environ["PGCACHE_DIRECT_URL"], os.environ["PGCACHE_MODE"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok", what, flush=True)


def executions(fragment):
    with psycopg.connect(DIRECT, autocommit=True) as d:
        return d.execute(
            "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query LIKE '%%' || %s || '%%'"
            " AND query NOT LIKE '%%pg_stat_statements%%'", (fragment,)).fetchone()[0]


c = psycopg.connect(URL, autocommit=True)
c.execute("CREATE TABLE drv (id int PRIMARY KEY, v text, n numeric, at timestamptz)")
with c.cursor() as cur:
    cur.executemany("INSERT INTO drv VALUES (%s, %s, %s, %s)",
                    [(i, f"v{i}", decimal.Decimal(i) / 4, datetime.datetime(2024, 1, i % 28 + 1, tzinfo=datetime.timezone.utc))
                     for i in range(1, 101)])
check(c.execute("SELECT count(*) FROM drv").fetchone()[0] == 100, "executemany")

# Typed parameters, binary and text.
u = uuid.uuid4()
for binary in (False, True):
    row = c.cursor(binary=binary).execute(
        "SELECT %s::int4 + 1, %s || '!', %s * 2, %s::timestamptz, %s::uuid, %s, %s::int[], %s::bytea, %s::bool",
        (41, "hi", decimal.Decimal("1.25"), datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc), u,
         Jsonb({"a": [1, 2]}), [1, 2, None], b"\x00\xff", False)).fetchone()
    check(row[0] == 42 and row[1] == "hi!" and row[2] == decimal.Decimal("2.50") and row[4] == u, f"typed parameters (binary={binary})")
    check(row[5] == {"a": [1, 2]} and row[6] == [1, 2, None] and row[7] == b"\x00\xff" and row[8] is False, f"json, arrays, bytea (binary={binary})")

# Eight connections from threads at once, every query prepared server-side at once
# (prepare_threshold=0), each with its own settings (in transaction pooling they share a
# pool much smaller than their number).
def work(i, results):
    with psycopg.connect(URL, autocommit=True, prepare_threshold=0) as conn:
        conn.execute(f"SET application_name = 'worker{i}'")
        good = True
        for k in range(1, 21):
            good &= conn.execute("SELECT v FROM drv WHERE id = %s", (k,)).fetchone()[0] == f"v{k}"
            good &= conn.execute("SELECT %s::int + %s::int", (i, k)).fetchone()[0] == i + k
        results[i] = good and conn.execute("SHOW application_name").fetchone()[0] == f"worker{i}"


results = [False] * 8
threads = [threading.Thread(target=work, args=(i, results)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check(all(results), "eight connections at once keep their statements and settings")

# Prepared statements: psycopg prepares a query server-side after prepare_threshold (5) runs.
ok = all(c.execute("SELECT v FROM drv WHERE id = %s", (i % 20 + 1,)).fetchone()[0] == f"v{i % 20 + 1}" for i in range(60))
check(ok, "a query run 60 times (prepared after 5)")
ok = all(c.execute("SELECT v FROM drv WHERE id = %s", (3,), prepare=True).fetchone()[0] == "v3" for _ in range(5))
check(ok, "explicitly prepared statement")
if MODE == "cached":
    before = executions("SELECT v FROM drv WHERE id =")
    for _ in range(10):
        assert c.execute("SELECT v FROM drv WHERE id = %s", (7,)).fetchone()[0] == "v7"
    check(executions("SELECT v FROM drv WHERE id =") == before, "repeats answered from the cache")
c.execute("UPDATE drv SET v = 'changed' WHERE id = 7")
check(c.execute("SELECT v FROM drv WHERE id = %s", (7,)).fetchone()[0] == "changed", "a write is seen by the next read")
# A write to another key (a bound parameter) leaves key 7 cached; a write to key 7 does not.
c.execute("UPDATE drv SET v = %s WHERE id = %s", ("other", 8))
check(c.execute("SELECT v FROM drv WHERE id = %s", (8,)).fetchone()[0] == "other", "a parameterized write is seen")
if MODE == "cached":
    before = executions("SELECT v FROM drv WHERE id =")
    check(c.execute("SELECT v FROM drv WHERE id = %s", (7,)).fetchone()[0] == "changed", "key 7 after a write to key 8")
    check(executions("SELECT v FROM drv WHERE id =") == before, "a write to key 8 left key 7 cached")
c.execute("DELETE FROM drv WHERE id = %s", (7,))
check(c.execute("SELECT v FROM drv WHERE id = %s", (7,)).fetchone() is None, "a parameterized delete is seen")
c.execute("INSERT INTO drv (id, v) VALUES (%s, %s)", (7, "back"))
check(c.execute("SELECT v FROM drv WHERE id = %s", (7,)).fetchone()[0] == "back", "a parameterized insert is seen")

# An error in a transaction, then rollback.
t = psycopg.connect(URL)
try:
    t.execute("SELECT 1/0")
    raise AssertionError("no error")
except errors.DivisionByZero as e:
    check(e.sqlstate == "22012", "division by zero reports 22012")
try:
    t.execute("SELECT 2")
    raise AssertionError("no error")
except errors.InFailedSqlTransaction as e:
    check(e.sqlstate == "25P02", "statement in a failed transaction reports 25P02")
t.rollback()
check(t.execute("SELECT 42").fetchone()[0] == 42, "rollback after an error answers")
with t.transaction():
    t.execute("UPDATE drv SET v = 'in tx' WHERE id = 8")
    check(t.execute("SELECT v FROM drv WHERE id = 8").fetchone()[0] == "in tx", "a transaction reads its own write")
t.commit()
check(c.execute("SELECT v FROM drv WHERE id = 8").fetchone()[0] == "in tx", "committed write is visible")

# SQLSTATE and the other error fields.
try:
    c.execute("INSERT INTO drv VALUES (1, 'dup', 0, now())")
    raise AssertionError("no error")
except errors.UniqueViolation as e:
    d = e.diag
    check(e.sqlstate == "23505" and d.constraint_name == "drv_pkey" and d.table_name == "drv", "unique violation fields")
    check("already exists" in d.message_detail, "error detail")

# Pipeline mode: many statements in flight, one error among them.
with c.pipeline() as p:
    cursors = [c.execute("SELECT v FROM drv WHERE id = %s", (i,)) for i in range(1, 11)]
    p.sync()
check([cur.fetchone()[0] for cur in cursors][:3] == ["v1", "v2", "v3"], "pipeline mode")
try:
    with c.pipeline():
        c.execute("SELECT 1")
        c.execute("SELECT 1/0")
        c.execute("SELECT 2")
    raise AssertionError("no error")
except errors.DivisionByZero:
    pass
check(c.execute("SELECT 3").fetchone()[0] == 3, "pipeline with an error, then the session carries on")

# COPY both ways.
c.execute("CREATE TABLE drv_copy (a int, b text)")
with c.cursor().copy("COPY drv_copy FROM STDIN") as cp:
    for i in range(5000):
        cp.write_row((i, f"r{i}"))
check(c.execute("SELECT count(*) FROM drv_copy").fetchone()[0] == 5000, "copy in")
rows = 0
with c.cursor().copy("COPY (SELECT a, b FROM drv_copy) TO STDOUT") as cp:
    for _ in cp.rows():
        rows += 1
check(rows == 5000, "copy out")

# LISTEN/NOTIFY.
listener = psycopg.connect(URL, autocommit=True)
listener.execute("LISTEN drv_chan")
c.execute("NOTIFY drv_chan, 'hello'")
got = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
check(got == ["hello"], "notification delivered")

# Cancel from another thread; the session stays usable.
victim = psycopg.connect(URL, autocommit=True)
threading.Timer(0.5, victim.cancel_safe).start()
started = time.monotonic()
try:
    victim.execute("SELECT pg_sleep(10)")
    raise AssertionError("not cancelled")
except errors.QueryCanceled as e:
    check(e.sqlstate == "57014", "cancel reports 57014")
check(victim.execute("SELECT 7").fetchone()[0] == 7 and time.monotonic() - started < 5, "cancelled session carries on")

# SET persists for the session.
c.execute("SET TimeZone = 'Asia/Tokyo'")
check(c.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo", "SET persists")
check(c.execute("SELECT to_char(at, 'HH24') FROM drv WHERE id = 1").fetchone()[0] == "09", "SET TimeZone applies to results")

# Isolation: a second connection sees nothing of the first's settings or role, while the
# first is connected and after it has gone (in transaction pooling they share backends).
with psycopg.connect(DIRECT, autocommit=True) as d:
    default_tz = d.execute("SHOW TimeZone").fetchone()[0]
first = psycopg.connect(URL, autocommit=True)
first.execute("SET TimeZone = 'Asia/Kathmandu'")
first.execute("SET ROLE drv_other")
first.execute("SELECT set_config('app.tenant', 'first', false)")
for when in ("while the first is connected", "after the first left"):
    with psycopg.connect(URL, autocommit=True) as second:
        seen = [second.execute(q).fetchone()[0] for q in (
            "SHOW TimeZone", "SELECT current_user = session_user", "SELECT coalesce(current_setting('app.tenant', true), '')")]
    check(seen == [default_tz, True, ""], f"isolation: a second connection sees its own session {when} ({seen})")
    if when.startswith("while"):
        check(first.execute("SHOW TimeZone").fetchone()[0] == "Asia/Kathmandu", "isolation: the first keeps its settings")
        first.close()

# A large result: client-side, and through a server-side (named) cursor.
total = sum(r[0] for r in c.execute("SELECT g FROM generate_series(1, 100000) g"))
check(total == 100000 * 100001 // 2, "large result")
with psycopg.connect(URL) as s:
    with s.cursor(name="drv_cursor") as cur:
        cur.itersize = 1000
        cur.execute("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g")
        total = sum(r[0] for r in cur)
check(total == 100000 * 100001 // 2, "large result through a server-side cursor")

# Temporary tables.
c.execute("CREATE TEMP TABLE drv_tmp (x int)")
c.execute("INSERT INTO drv_tmp VALUES (1), (2)")
check(c.execute("SELECT sum(x) FROM drv_tmp").fetchone()[0] == 3, "temporary table")
c.execute("INSERT INTO drv_tmp VALUES (3)")
check(c.execute("SELECT sum(x) FROM drv_tmp").fetchone()[0] == 6, "temporary table is never served stale")

for conn in (c, t, listener, victim):
    conn.close()
