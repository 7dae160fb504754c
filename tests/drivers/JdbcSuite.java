// pgjdbc through pgcache: what a JVM app does, checked against what Postgres must answer.
//
// Run by tests/drivers.rs as `java -cp postgresql.jar JdbcSuite.java`, with PGCACHE_URL (a
// jdbc:postgresql URL through pgcache), PGCACHE_DIRECT_URL (straight to Postgres, for proofs)
// and PGCACHE_MODE (plain: no rules; cached: every SELECT cached).

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.*;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;
import org.postgresql.util.ServerErrorMessage;

public class JdbcSuite {
    static final String URL = System.getenv("PGCACHE_URL");
    static final String DIRECT = System.getenv("PGCACHE_DIRECT_URL");
    static final String MODE = System.getenv("PGCACHE_MODE");

    static void check(boolean cond, String what) {
        if (!cond) throw new AssertionError(what);
        System.out.println("ok " + what);
    }

    static long executions(String fragment) throws SQLException {
        try (Connection d = DriverManager.getConnection(DIRECT);
             PreparedStatement ps = d.prepareStatement(
                 "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND query LIKE '%' || ? || '%' "
                     + "AND query NOT LIKE '%pg_stat_statements%'")) {
            ps.setString(1, fragment);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        }
    }

    static String one(Connection c, String sql) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery(sql)) {
            rs.next();
            return rs.getString(1);
        }
    }

    static SQLException expectError(Statement s, String sql, String state, String what) {
        try {
            s.execute(sql);
        } catch (SQLException e) {
            check(state.equals(e.getSQLState()), what + " reports " + state);
            return e;
        }
        throw new AssertionError("no error for " + what);
    }

    public static void main(String[] args) throws Exception {
        Connection c = DriverManager.getConnection(URL);
        Statement s = c.createStatement();
        s.execute("CREATE TABLE drv (id int PRIMARY KEY, v text, n numeric, at timestamptz)");

        // Batched inserts (pgjdbc pipelines the batch).
        try (PreparedStatement ins = c.prepareStatement("INSERT INTO drv VALUES (?, ?, ?, ?)")) {
            for (int i = 1; i <= 100; i++) {
                ins.setInt(1, i);
                ins.setString(2, "v" + i);
                ins.setBigDecimal(3, new java.math.BigDecimal(i).divide(new java.math.BigDecimal(4)));
                ins.setObject(4, java.time.OffsetDateTime.of(2024, 1, i % 28 + 1, 0, 0, 0, 0, java.time.ZoneOffset.UTC));
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            check(counts.length == 100, "batched inserts");
        }
        check(one(c, "SELECT count(*) FROM drv").equals("100"), "rows inserted");

        // Typed parameters.
        try (PreparedStatement ps = c.prepareStatement(
                "SELECT ?::int4 + 1, ? || '!', ?::numeric * 2, ?::uuid, ?::bytea, ?::bool, ?::int[]")) {
            java.util.UUID u = java.util.UUID.randomUUID();
            ps.setInt(1, 41);
            ps.setString(2, "hi");
            ps.setBigDecimal(3, new java.math.BigDecimal("1.25"));
            ps.setObject(4, u);
            ps.setBytes(5, new byte[] {0, (byte) 255});
            ps.setBoolean(6, false);
            ps.setArray(7, c.createArrayOf("int4", new Integer[] {1, 2, null}));
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                check(rs.getInt(1) == 42 && rs.getString(2).equals("hi!"), "typed parameters");
                check(rs.getBigDecimal(3).compareTo(new java.math.BigDecimal("2.50")) == 0 && rs.getObject(4).equals(u), "numeric and uuid");
                byte[] b = rs.getBytes(5);
                check(b.length == 2 && b[1] == (byte) 255 && !rs.getBoolean(6), "bytea and bool");
                check(java.util.Arrays.equals((Integer[]) rs.getArray(7).getArray(), new Integer[] {1, 2, null}), "arrays");
            }
        }

        // Eight connections from threads at once, statements server-side from the first run
        // (prepareThreshold=1), each with its own settings (in transaction pooling they share
        // a pool much smaller than their number).
        {
            var pool = Executors.newFixedThreadPool(8);
            var futures = new java.util.ArrayList<java.util.concurrent.Future<Boolean>>();
            for (int w = 0; w < 8; w++) {
                final int i = w;
                futures.add(pool.submit(() -> {
                    var props = new java.util.Properties();
                    props.setProperty("prepareThreshold", "1");
                    try (Connection wc = DriverManager.getConnection(URL, props);
                         Statement ws = wc.createStatement();
                         PreparedStatement a = wc.prepareStatement("SELECT ?::int + " + i);
                         PreparedStatement b = wc.prepareStatement("SELECT v FROM drv WHERE id = ?")) {
                        ws.execute("SET application_name = 'worker" + i + "'");
                        boolean good = true;
                        for (int k = 1; k <= 20; k++) {
                            a.setInt(1, k);
                            try (ResultSet rs = a.executeQuery()) { good &= rs.next() && rs.getInt(1) == k + i; }
                            b.setInt(1, k);
                            try (ResultSet rs = b.executeQuery()) { good &= rs.next() && rs.getString(1).equals("v" + k); }
                        }
                        try (ResultSet rs = ws.executeQuery("SHOW application_name")) {
                            return good && rs.next() && rs.getString(1).equals("worker" + i);
                        }
                    }
                }));
            }
            boolean all = true;
            for (var f : futures) all &= f.get(60, TimeUnit.SECONDS);
            pool.shutdown();
            check(all, "eight connections at once keep their statements and settings");
        }

        // A PreparedStatement becomes a named server-side statement after prepareThreshold (5).
        try (PreparedStatement ps = c.prepareStatement("SELECT v FROM drv WHERE id = ?")) {
            boolean ok = true;
            for (int n = 0; n < 60; n++) {
                int id = n % 20 + 1;
                ps.setInt(1, id);
                try (ResultSet rs = ps.executeQuery()) {
                    ok &= rs.next() && rs.getString(1).equals("v" + id);
                }
            }
            check(ok, "a prepared statement executed 60 times (named after 5)");
            if (MODE.equals("cached")) {
                long before = executions("SELECT v FROM drv WHERE id =");
                for (int n = 0; n < 10; n++) {
                    ps.setInt(1, 7);
                    try (ResultSet rs = ps.executeQuery()) { rs.next(); }
                }
                check(executions("SELECT v FROM drv WHERE id =") == before, "repeats answered from the cache");
            }
            s.execute("UPDATE drv SET v = 'changed' WHERE id = 7");
            ps.setInt(1, 7);
            try (ResultSet rs = ps.executeQuery()) {
                check(rs.next() && rs.getString(1).equals("changed"), "a write is seen by the next read");
            }
        }

        // An error in a transaction, then rollback.
        c.setAutoCommit(false);
        expectError(s, "SELECT 1/0", "22012", "division by zero");
        expectError(s, "SELECT 2", "25P02", "statement in a failed transaction");
        c.rollback();
        check(one(c, "SELECT 42").equals("42"), "rollback after an error answers");
        s.execute("UPDATE drv SET v = 'in tx' WHERE id = 8");
        check(one(c, "SELECT v FROM drv WHERE id = 8").equals("in tx"), "a transaction reads its own write");
        c.commit();
        c.setAutoCommit(true);
        check(one(c, "SELECT v FROM drv WHERE id = 8").equals("in tx"), "committed write is visible");

        // SQLSTATE and the other error fields.
        SQLException dup = expectError(s, "INSERT INTO drv VALUES (1, 'dup', 0, now())", "23505", "unique violation");
        ServerErrorMessage m = ((PSQLException) dup).getServerErrorMessage();
        check(m.getConstraint().equals("drv_pkey") && m.getTable().equals("drv") && m.getDetail().contains("already exists"),
            "unique violation fields");

        // COPY both ways.
        s.execute("CREATE TABLE drv_copy (a int, b text)");
        CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
        StringBuilder in = new StringBuilder();
        for (int i = 0; i < 5000; i++) in.append(i).append('\t').append('r').append(i).append('\n');
        check(copy.copyIn("COPY drv_copy FROM STDIN", new StringReader(in.toString())) == 5000, "copy in");
        StringWriter out = new StringWriter();
        check(copy.copyOut("COPY (SELECT a, b FROM drv_copy) TO STDOUT", out) == 5000, "copy out");

        // LISTEN/NOTIFY.
        Connection listener = DriverManager.getConnection(URL);
        listener.createStatement().execute("LISTEN drv_chan");
        s.execute("NOTIFY drv_chan, 'hello'");
        PGNotification[] got = listener.unwrap(PGConnection.class).getNotifications(5000);
        check(got != null && got.length == 1 && got[0].getParameter().equals("hello"), "notification delivered");

        // Cancel from another thread; the connection stays usable.
        Connection victim = DriverManager.getConnection(URL);
        Statement vs = victim.createStatement();
        var timer = Executors.newSingleThreadScheduledExecutor();
        timer.schedule(() -> { try { vs.cancel(); } catch (SQLException e) { throw new RuntimeException(e); } }, 500, TimeUnit.MILLISECONDS);
        long started = System.nanoTime();
        expectError(vs, "SELECT pg_sleep(10)", "57014", "cancelled query");
        check(one(victim, "SELECT 7").equals("7") && System.nanoTime() - started < 5_000_000_000L, "cancelled connection carries on");
        timer.shutdown();

        // SET persists for the session.
        s.execute("SET TimeZone = 'Asia/Tokyo'");
        check(one(c, "SHOW TimeZone").equals("Asia/Tokyo"), "SET persists");
        check(one(c, "SELECT to_char(at, 'HH24') FROM drv WHERE id = 1").equals("09"), "SET TimeZone applies to results");

        // Isolation: a second connection sees nothing of the first's settings or role, while
        // the first is connected and after it has gone (in transaction pooling they share
        // backends).
        String defaultTz;
        try (Connection d = DriverManager.getConnection(DIRECT)) {
            defaultTz = one(d, "SHOW TimeZone");
        }
        Connection first = DriverManager.getConnection(URL);
        try (Statement fs = first.createStatement()) {
            fs.execute("SET TimeZone = 'Asia/Kathmandu'");
            fs.execute("SET ROLE drv_other");
            fs.execute("SET app.tenant = 'first'");
        }
        for (String when : new String[] {"while the first is connected", "after the first left"}) {
            String seen;
            try (Connection second = DriverManager.getConnection(URL)) {
                seen = one(second, "SHOW TimeZone") + "|" + one(second, "SELECT current_user = session_user") + "|"
                    + one(second, "SELECT coalesce(current_setting('app.tenant', true), '')");
            }
            check(seen.equals(defaultTz + "|t|"), "isolation: a second connection sees its own session " + when + " (" + seen + ")");
            if (when.startsWith("while")) {
                check(one(first, "SHOW TimeZone").equals("Asia/Kathmandu"), "isolation: the first keeps its settings");
                first.close();
            }
        }

        // A large result read in chunks (fetch size in a transaction: a portal with a row limit).
        c.setAutoCommit(false);
        long total = 0;
        try (Statement big = c.createStatement()) {
            big.setFetchSize(1000);
            try (ResultSet rs = big.executeQuery("SELECT g, repeat('x', 100) FROM generate_series(1, 100000) g")) {
                while (rs.next()) total += rs.getLong(1);
            }
        }
        c.commit();
        c.setAutoCommit(true);
        check(total == 100000L * 100001L / 2, "large result with a fetch size");

        // Temporary tables.
        s.execute("CREATE TEMP TABLE drv_tmp (x int)");
        s.execute("INSERT INTO drv_tmp VALUES (1), (2)");
        check(one(c, "SELECT sum(x) FROM drv_tmp").equals("3"), "temporary table");
        s.execute("INSERT INTO drv_tmp VALUES (3)");
        check(one(c, "SELECT sum(x) FROM drv_tmp").equals("6"), "temporary table is never served stale");

        for (Connection x : new Connection[] {c, listener, victim}) x.close();
    }
}
