"""asyncpg through pgcache: what an asyncio app does, checked against what Postgres must answer.

Run by tests/drivers.rs with PGCACHE_URL (through pgcache), PGCACHE_DIRECT_URL (straight to
Postgres, for proofs) and PGCACHE_MODE (plain: no rules; cached: every SELECT cached).
"""
import asyncio
import datetime
import decimal
import json
import os
import sys
import time
import uuid

import asyncpg

URL, DIRECT, MODE = os.environ["PGCACHE_URL"], os.environ["PGCACHE_DIRECT_URL"], os.environ["PGCACHE_MODE"]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok", what, flush=True)


async def executions(fragment):
    d = await asyncpg.connect(DIRECT)
    try:
        return await d.fetchval(
            "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query LIKE '%' || $1 || '%'"
            " AND query NOT LIKE '%pg_stat_statements%'", fragment)
    finally:
        await d.close()


async def main():
    c = await asyncpg.connect(URL)
    await c.execute("CREATE TABLE drv (id int PRIMARY KEY, v text, n numeric, at timestamptz)")
    await c.executemany("INSERT INTO drv VALUES ($1, $2, $3, $4)",
                        [(i, f"v{i}", decimal.Decimal(i) / 4, datetime.datetime(2024, 1, i % 28 + 1, tzinfo=datetime.timezone.utc))
                         for i in range(1, 101)])
    check(await c.fetchval("SELECT count(*) FROM drv") == 100, "executemany (pipelined inserts)")

    # Typed parameters and results in asyncpg's binary format.
    u = uuid.uuid4()
    row = await c.fetchrow(
        "SELECT $1::int4 + 1 AS a, $2::text || '!' AS b, $3::numeric * 2 AS n, $4::timestamptz AS t,"
        " $5::uuid AS u, $6::jsonb AS j, $7::int[] AS arr, $8::bytea AS by, $9::bool AS f, $10::float8 AS x",
        41, "hi", decimal.Decimal("1.25"), datetime.datetime(2024, 2, 29, 12, tzinfo=datetime.timezone.utc), u,
        json.dumps({"a": [1, 2]}), [1, 2, None], b"\x00\xff", False, 0.1)
    check(row["a"] == 42 and row["b"] == "hi!" and row["n"] == decimal.Decimal("2.50"), "typed parameters")
    check(row["u"] == u and json.loads(row["j"]) == {"a": [1, 2]} and row["arr"] == [1, 2, None], "uuid, jsonb, arrays")
    check(row["by"] == b"\x00\xff" and row["f"] is False and row["x"] == 0.1, "bytea, bool, float")

    # Eight connections at once, each with asyncpg's own statement cache and settings (in
    # transaction pooling they share a pool much smaller than their number).
    conns = [await asyncpg.connect(URL) for _ in range(8)]

    async def work(i, conn):
        await conn.execute(f"SET application_name = 'worker{i}'")
        good = True
        for k in range(1, 21):
            good &= await conn.fetchval("SELECT v FROM drv WHERE id = $1", k) == f"v{k}"
            good &= await conn.fetchval("SELECT $1::int + $2::int", i, k) == i + k
        return good and await conn.fetchval("SHOW application_name") == f"worker{i}"

    check(all(await asyncio.gather(*(work(i, cn) for i, cn in enumerate(conns)))),
          "eight connections at once keep their statements and settings")
    for cn in conns:
        await cn.close()

    # Prepared statements (asyncpg names them and keeps a statement cache).
    stmt = await c.prepare("SELECT v FROM drv WHERE id = $1")
    ok = True
    for _ in range(3):
        for i in range(1, 21):
            ok &= await stmt.fetchval(i) == f"v{i}"
    check(ok, "a prepared statement executed 60 times")
    if MODE == "cached":
        before = await executions("SELECT v FROM drv WHERE id =")
        for _ in range(10):
            assert await stmt.fetchval(7) == "v7"
        check(await executions("SELECT v FROM drv WHERE id =") == before, "repeats answered from the cache")
    # A write is seen by the next read, through the same prepared statement.
    await c.execute("UPDATE drv SET v = 'changed' WHERE id = 7")
    check(await stmt.fetchval(7) == "changed", "a write is seen by the next read")
    # A write to another key (a bound parameter) leaves key 7 cached; a write to key 7 does not.
    await c.execute("UPDATE drv SET v = $1 WHERE id = $2", "other", 8)
    check(await stmt.fetchval(8) == "other", "a parameterized write is seen by the next read")
    if MODE == "cached":
        before = await executions("SELECT v FROM drv WHERE id =")
        check(await stmt.fetchval(7) == "changed", "key 7 after a write to key 8")
        check(await executions("SELECT v FROM drv WHERE id =") == before, "a write to key 8 left key 7 cached")
    await c.execute("UPDATE drv SET v = $1 WHERE id = $2", "again", 7)
    check(await stmt.fetchval(7) == "again", "a parameterized write to the key is seen")

    # An error inside a transaction, then rollback (asyncpg sends Parse/Describe/Flush next).
    tr = c.transaction()
    await tr.start()
    try:
        await c.fetch("SELECT 1/0")
        raise AssertionError("no error")
    except asyncpg.DivisionByZeroError as e:
        check(e.sqlstate == "22012", "division by zero reports 22012")
    try:
        await c.fetch("SELECT id FROM drv WHERE id = 2")
        raise AssertionError("no error")
    except asyncpg.InFailedSQLTransactionError as e:
        check(e.sqlstate == "25P02", "statement in a failed transaction reports 25P02")
    await asyncio.wait_for(tr.rollback(), 5)
    check(await c.fetchval("SELECT 42") == 42, "rollback after an error answers")
    async with c.transaction():
        await c.execute("UPDATE drv SET v = 'in tx' WHERE id = 8")
        check(await c.fetchval("SELECT v FROM drv WHERE id = 8") == "in tx", "a transaction reads its own write")
    check(await c.fetchval("SELECT v FROM drv WHERE id = 8") == "in tx", "committed write is visible")

    # SQLSTATE and the other error fields.
    try:
        await c.execute("INSERT INTO drv VALUES (1, 'dup', 0, now())")
        raise AssertionError("no error")
    except asyncpg.UniqueViolationError as e:
        check(e.sqlstate == "23505" and e.constraint_name == "drv_pkey" and e.table_name == "drv", "unique violation fields")
        check("already exists" in e.detail, "error detail")

    # COPY both ways.
    await c.execute("CREATE TABLE drv_copy (a int, b text)")
    res = await c.copy_records_to_table("drv_copy", records=[(i, f"r{i}") for i in range(5000)])
    check(res == "COPY 5000", "copy in")
    out = []

    async def sink(data):
        out.append(data)

    await c.copy_from_query("SELECT a, b FROM drv_copy ORDER BY a", output=sink)
    check(b"".join(out).count(b"\n") == 5000, "copy out")

    # LISTEN/NOTIFY between two connections through pgcache.
    got = asyncio.get_running_loop().create_future()
    await c.add_listener("drv_chan", lambda conn, pid, chan, payload: got.done() or got.set_result(payload))
    other = await asyncpg.connect(URL)
    await other.execute("NOTIFY drv_chan, 'hello'")
    check(await asyncio.wait_for(got, 5) == "hello", "notification delivered to an idle listener")

    # Cancel: a timeout makes asyncpg send a CancelRequest; the session stays usable.
    started = time.monotonic()
    try:
        await c.fetch("SELECT pg_sleep(10)", timeout=0.5)
        raise AssertionError("no timeout")
    except asyncio.TimeoutError:
        pass
    check(await c.fetchval("SELECT 7") == 7 and time.monotonic() - started < 5, "cancel stops the running query")

    # SET persists for the session.
    await c.execute("SET TimeZone = 'Asia/Tokyo'; SET search_path = public")
    check(await c.fetchval("SHOW TimeZone") == "Asia/Tokyo", "SET persists")
    check(await c.fetchval("SELECT to_char(at, 'HH24') FROM drv WHERE id = 1") == "09", "SET TimeZone applies to results")

    # Isolation: a second connection sees nothing of the first's settings or role, while the
    # first is connected and after it has gone (in transaction pooling they share backends).
    d = await asyncpg.connect(DIRECT)
    default_tz = await d.fetchval("SHOW TimeZone")
    await d.close()
    first = await asyncpg.connect(URL)
    await first.execute("SET TimeZone = 'Asia/Kathmandu'; SET ROLE drv_other; SET app.tenant = 'first'")
    for when in ("while the first is connected", "after the first left"):
        second = await asyncpg.connect(URL)
        seen = [await second.fetchval(q) for q in (
            "SHOW TimeZone", "SELECT current_user = session_user", "SELECT coalesce(current_setting('app.tenant', true), '')")]
        check(seen == [default_tz, True, ""], f"isolation: a second connection sees its own session {when} ({seen})")
        await second.close()
        if when.startswith("while"):
            check(await first.fetchval("SHOW TimeZone") == "Asia/Kathmandu", "isolation: the first keeps its settings")
            await first.close()

    # A large result streamed with a cursor.
    async with c.transaction():
        total = 0
        async for r in c.cursor("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g", prefetch=1000):
            total += r[0]
    check(total == 100000 * 100001 // 2, "large result through a cursor")

    # Temporary tables.
    await c.execute("CREATE TEMP TABLE drv_tmp (x int); INSERT INTO drv_tmp VALUES (1), (2)")
    check(await c.fetchval("SELECT sum(x) FROM drv_tmp") == 3, "temporary table")
    await c.execute("INSERT INTO drv_tmp VALUES (3)")
    check(await c.fetchval("SELECT sum(x) FROM drv_tmp") == 6, "temporary table is never served stale")

    await other.close()
    await c.close()


asyncio.run(main())
