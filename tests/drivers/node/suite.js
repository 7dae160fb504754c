// node-postgres through pgcache: what a Node app does, checked against what Postgres must answer.
//
// Run by tests/drivers.rs with PGCACHE_URL (through pgcache), PGCACHE_DIRECT_URL (straight to
// Postgres, for proofs) and PGCACHE_MODE (plain: no rules; cached: every SELECT cached).
'use strict'
const { Client } = require('pg')
const Cursor = require('pg-cursor')
const { from: copyFrom, to: copyTo } = require('pg-copy-streams')
const { pipeline } = require('stream/promises')
const { Readable, Writable } = require('stream')

const URL = process.env.PGCACHE_URL
const DIRECT = process.env.PGCACHE_DIRECT_URL
const MODE = process.env.PGCACHE_MODE

function check (cond, what) {
  if (!cond) throw new Error('FAILED: ' + what)
  console.log('ok', what)
}

async function connect (url, extra = {}) {
  const c = new Client({ connectionString: url, ...extra })
  await c.connect()
  return c
}

async function executions (fragment) {
  const d = await connect(DIRECT)
  try {
    const r = await d.query(
      "SELECT coalesce(sum(calls), 0)::int8 AS n FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query LIKE '%' || $1 || '%' " +
        "AND query NOT LIKE '%pg_stat_statements%'", [fragment])
    return Number(r.rows[0].n)
  } finally {
    await d.end()
  }
}

async function expectError (promise, code, what) {
  try {
    await promise
  } catch (e) {
    check(e.code === code, `${what} reports ${code}`)
    return e
  }
  throw new Error('FAILED: no error for ' + what)
}

async function main () {
  const c = await connect(URL)
  await c.query('CREATE TABLE drv (id int PRIMARY KEY, v text, n numeric, at timestamptz)')
  for (let i = 1; i <= 100; i++) {
    await c.query('INSERT INTO drv VALUES ($1, $2, $3, $4)', [i, `v${i}`, i / 4, new Date(Date.UTC(2024, 0, (i % 28) + 1))])
  }
  check((await c.query('SELECT count(*)::int AS n FROM drv')).rows[0].n === 100, 'parameterized inserts')

  // Typed parameters (node-postgres sends text parameters, receives text results).
  const r = await c.query(
    "SELECT $1::int4 + 1 AS a, $2::text || '!' AS b, $3::numeric * 2 AS n, $4::timestamptz AS t, $5::jsonb AS j, " +
      '$6::int[] AS arr, $7::bytea AS by, $8::bool AS f',
    [41, 'hi', '1.25', new Date(Date.UTC(2024, 1, 29, 12)), { a: [1, 2] }, [1, 2, null], Buffer.from([0, 255]), false])
  const row = r.rows[0]
  check(row.a === 42 && row.b === 'hi!' && row.n === '2.50' && row.t.getTime() === Date.UTC(2024, 1, 29, 12), 'typed parameters')
  check(JSON.stringify(row.j) === '{"a":[1,2]}' && JSON.stringify(row.arr) === '[1,2,null]', 'jsonb and arrays')
  check(row.by.equals(Buffer.from([0, 255])) && row.f === false, 'bytea and bool')

  // Eight clients at once, each with the same statement name for different text and its own
  // settings (in transaction pooling they share a pool much smaller than their number).
  const workers = await Promise.all([...Array(8).keys()].map(() => connect(URL)))
  const workerResults = await Promise.all(workers.map(async (w, i) => {
    await w.query(`SET application_name = 'worker${i}'`)
    let good = true
    for (let k = 1; k <= 20; k++) {
      const a = await w.query({ name: 'mine', text: `SELECT $1::int + ${i} AS x`, values: [k] })
      good = good && a.rows[0].x === k + i
      const b = await w.query({ name: 'by_id', text: 'SELECT v FROM drv WHERE id = $1', values: [k] })
      good = good && b.rows[0].v === `v${k}`
    }
    return good && (await w.query('SHOW application_name')).rows[0].application_name === `worker${i}`
  }))
  check(workerResults.every(Boolean), 'eight clients at once keep their statements and settings')
  await Promise.all(workers.map((w) => w.end()))

  // Named prepared statements.
  let ok = true
  for (let n = 0; n < 60; n++) {
    const id = (n % 20) + 1
    const res = await c.query({ name: 'by_id', text: 'SELECT v FROM drv WHERE id = $1', values: [id] })
    ok = ok && res.rows[0].v === `v${id}`
  }
  check(ok, 'a named prepared statement executed 60 times')
  if (MODE === 'cached') {
    const before = await executions('SELECT v FROM drv WHERE id =')
    for (let n = 0; n < 10; n++) await c.query({ name: 'by_id', text: 'SELECT v FROM drv WHERE id = $1', values: [7] })
    check(await executions('SELECT v FROM drv WHERE id =') === before, 'repeats answered from the cache')
  }
  await c.query("UPDATE drv SET v = 'changed' WHERE id = 7")
  const seen = await c.query({ name: 'by_id', text: 'SELECT v FROM drv WHERE id = $1', values: [7] })
  check(seen.rows[0].v === 'changed', 'a write is seen by the next read')

  // An error in a transaction, then rollback.
  await c.query('BEGIN')
  await expectError(c.query('SELECT 1/0'), '22012', 'division by zero')
  await expectError(c.query('SELECT $1::int', [2]), '25P02', 'statement in a failed transaction')
  await c.query('ROLLBACK')
  check((await c.query('SELECT 42 AS x')).rows[0].x === 42, 'rollback after an error answers')
  await c.query('BEGIN')
  await c.query("UPDATE drv SET v = 'in tx' WHERE id = 8")
  check((await c.query('SELECT v FROM drv WHERE id = 8')).rows[0].v === 'in tx', 'a transaction reads its own write')
  await c.query('COMMIT')
  check((await c.query('SELECT v FROM drv WHERE id = 8')).rows[0].v === 'in tx', 'committed write is visible')

  // SQLSTATE and the other error fields.
  const e = await expectError(c.query("INSERT INTO drv VALUES (1, 'dup', 0, now())"), '23505', 'unique violation')
  check(e.constraint === 'drv_pkey' && e.table === 'drv' && e.detail.includes('already exists'), 'unique violation fields')

  // Pipeline mode: queries in flight together, one of them failing.
  const p = await connect(URL, { pipeline: true })
  const results = await Promise.allSettled([
    p.query('SELECT v FROM drv WHERE id = $1', [1]),
    p.query('SELECT 1/0'),
    p.query('SELECT v FROM drv WHERE id = $1', [2])
  ])
  check(results[0].status === 'fulfilled' && results[0].value.rows[0].v === 'v1', 'pipeline: first query')
  check(results[1].status === 'rejected' && results[1].reason.code === '22012', 'pipeline: the failing query')
  check(results[2].status === 'fulfilled' && results[2].value.rows[0].v === 'v2', 'pipeline: the query after the error')
  await p.end()

  // COPY both ways.
  await c.query('CREATE TABLE drv_copy (a int, b text)')
  const lines = []
  for (let i = 0; i < 5000; i++) lines.push(`${i}\tr${i}\n`)
  await pipeline(Readable.from(lines), c.query(copyFrom('COPY drv_copy FROM STDIN')))
  check((await c.query('SELECT count(*)::int AS n FROM drv_copy')).rows[0].n === 5000, 'copy in')
  let bytes = ''
  await pipeline(c.query(copyTo('COPY (SELECT a, b FROM drv_copy) TO STDOUT')), new Writable({
    write (chunk, enc, cb) { bytes += chunk.toString(); cb() }
  }))
  check(bytes.split('\n').length - 1 === 5000, 'copy out')

  // LISTEN/NOTIFY.
  const listener = await connect(URL)
  const heard = new Promise((resolve) => listener.on('notification', (m) => resolve(m.payload)))
  await listener.query('LISTEN drv_chan')
  await c.query("NOTIFY drv_chan, 'hello'")
  check(await Promise.race([heard, new Promise((resolve) => setTimeout(() => resolve('timeout'), 5000))]) === 'hello',
    'notification delivered')
  await listener.end()

  // Cancel through a second client (node-postgres sends a CancelRequest with the key it got).
  const victim = await connect(URL)
  const started = Date.now()
  const sleeping = victim.query('SELECT pg_sleep(10)')
  await new Promise((resolve) => setTimeout(resolve, 500))
  new Client({ connectionString: URL }).cancel(victim, victim.activeQuery)
  await expectError(sleeping, '57014', 'cancelled query')
  check((await victim.query('SELECT 7 AS x')).rows[0].x === 7 && Date.now() - started < 5000, 'cancelled session carries on')
  await victim.end()

  // SET persists for the session.
  await c.query("SET TimeZone = 'Asia/Tokyo'")
  check((await c.query('SHOW TimeZone')).rows[0].TimeZone === 'Asia/Tokyo', 'SET persists')
  const hour = await c.query("SELECT to_char(at, 'HH24') AS h FROM drv WHERE id = 1")
  check(hour.rows[0].h === '09', 'SET TimeZone applies to results')

  // Isolation: a second connection sees nothing of the first's settings or role, while the
  // first is connected and after it has gone (in transaction pooling they share backends).
  const d = await connect(DIRECT)
  const defaultTz = (await d.query('SHOW TimeZone')).rows[0].TimeZone
  await d.end()
  const first = await connect(URL)
  await first.query("SET TimeZone = 'Asia/Kathmandu'; SET ROLE drv_other; SET app.tenant = 'first'")
  for (const when of ['while the first is connected', 'after the first left']) {
    const second = await connect(URL)
    const seen = [
      (await second.query('SHOW TimeZone')).rows[0].TimeZone,
      (await second.query('SELECT current_user = session_user AS u')).rows[0].u,
      (await second.query("SELECT coalesce(current_setting('app.tenant', true), '') AS t")).rows[0].t
    ]
    await second.end()
    check(JSON.stringify(seen) === JSON.stringify([defaultTz, true, '']),
      `isolation: a second connection sees its own session ${when} (${seen})`)
    if (when.startsWith('while')) {
      check((await first.query('SHOW TimeZone')).rows[0].TimeZone === 'Asia/Kathmandu', 'isolation: the first keeps its settings')
      await first.end()
    }
  }

  // A large result through a cursor (a portal read 1000 rows at a time, in a transaction).
  await c.query('BEGIN')
  const cursor = c.query(new Cursor("SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 100000) g"))
  let total = 0
  for (;;) {
    const batch = await cursor.read(1000)
    if (batch.length === 0) break
    for (const b of batch) total += b.g
  }
  await cursor.close()
  await c.query('COMMIT')
  check(total === 100000 * 100001 / 2, 'large result through a cursor')

  // Temporary tables.
  await c.query('CREATE TEMP TABLE drv_tmp (x int)')
  await c.query('INSERT INTO drv_tmp VALUES (1), (2)')
  check((await c.query('SELECT sum(x)::int AS s FROM drv_tmp')).rows[0].s === 3, 'temporary table')
  await c.query('INSERT INTO drv_tmp VALUES (3)')
  check((await c.query('SELECT sum(x)::int AS s FROM drv_tmp')).rows[0].s === 6, 'temporary table is never served stale')
  await c.end()
}

main().then(() => process.exit(0), (e) => { console.error(e); process.exit(1) })
