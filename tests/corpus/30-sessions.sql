-- Settings, schemas, roles and tenants: sessions that could see different rows never share.
CREATE SCHEMA s1;
CREATE SCHEMA s2;
CREATE TABLE s1.t (v text);
CREATE TABLE s2.t (v text);
INSERT INTO s1.t VALUES ('in s1');
INSERT INTO s2.t VALUES ('in s2');
SET search_path = s1;
SELECT v FROM t;
SELECT set_config('search_path', 's2', false);
SELECT v FROM t;
SET search_path = s1, s2;
SELECT v FROM t;
BEGIN;
SET LOCAL search_path = s2;
SELECT v FROM t;
COMMIT;
SELECT v FROM t;
BEGIN;
SELECT set_config('search_path', 's2', true);
SELECT v FROM t;
ROLLBACK;
SELECT v FROM t;
RESET search_path;
SELECT v FROM t;
SELECT v FROM s1.t;
-- @session other options=-c search_path=s2
SELECT v FROM t;
SET search_path = s1;
SELECT v FROM t;
RESET search_path;
SELECT v FROM t;
-- @session main
-- Planner settings change the order of unordered rows.
CREATE TABLE grp AS SELECT (g * 7919) % 100 AS k FROM generate_series(1, 1000) g;
ANALYZE grp;
SELECT k, count(*) FROM grp GROUP BY k;
SET enable_hashagg = off;
SELECT k, count(*) FROM grp GROUP BY k;
RESET enable_hashagg;
SELECT k, count(*) FROM grp GROUP BY k;
-- Row-level security on a custom setting, PostgREST style.
CREATE TABLE docs (tenant int, body text);
INSERT INTO docs VALUES (1, 'tenant 1 a'), (1, 'tenant 1 b'), (2, 'tenant 2 a');
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY by_tenant ON docs USING (tenant = current_setting('app.tenant')::int);
GRANT SELECT ON docs TO diff_app, diff_other;
GRANT USAGE ON SCHEMA public TO diff_app, diff_other;
-- @session t1 user=diff_app options=-c app.tenant=1
SELECT body FROM docs ORDER BY body;
SELECT count(*) FROM docs;
-- @session t2 user=diff_app options=-c app.tenant=2
SELECT body FROM docs ORDER BY body;
SELECT count(*) FROM docs;
-- @session tset user=diff_app
SELECT body FROM docs ORDER BY body;
SET app.tenant = '2';
SELECT body FROM docs ORDER BY body;
SET app.tenant = '1';
SELECT body FROM docs ORDER BY body;
BEGIN;
SELECT set_config('app.tenant', '2', true);
SELECT body FROM docs ORDER BY body;
COMMIT;
SELECT body FROM docs ORDER BY body;
RESET app.tenant;
SELECT body FROM docs ORDER BY body;
-- @session main
INSERT INTO docs VALUES (2, 'tenant 2 b');
-- @session t2
SELECT body FROM docs ORDER BY body;
-- @session t1
SELECT body FROM docs ORDER BY body;
-- @session main
-- Roles: one policy on the role, SET ROLE and a second login.
CREATE TABLE owned (owner text, v text);
INSERT INTO owned VALUES ('diff_app', 'for app'), ('diff_other', 'for other');
ALTER TABLE owned ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON owned USING (owner = current_user);
GRANT SELECT ON owned TO diff_app, diff_other;
-- @session app user=diff_app
SELECT v FROM owned;
-- @session otheruser user=diff_other
SELECT v FROM owned;
-- @session main
SET ROLE diff_app;
SELECT v FROM owned;
SET ROLE diff_other;
SELECT v FROM owned;
RESET ROLE;
SELECT v FROM owned ORDER BY v;
SELECT current_user, session_user;
-- Catalog reads through types: the OID must be the new table's after DDL.
CREATE TABLE reg (a int);
SELECT 'reg'::regclass::oid = (SELECT oid FROM pg_class WHERE relname = 'reg');
SELECT 'reg'::regclass::text;
DROP TABLE reg;
CREATE TABLE reg (a int);
SELECT 'reg'::regclass::oid = (SELECT oid FROM pg_class WHERE relname = 'reg');
SELECT 'int4'::regtype, 'pg_catalog.lower(text)'::regprocedure;
CREATE TABLE regcols (r regclass);
INSERT INTO regcols VALUES ('reg');
SELECT r::text FROM regcols;
ALTER TABLE reg RENAME TO reg_renamed;
SELECT r::text FROM regcols;
-- Temporary tables shadow permanent ones for their session.
CREATE TABLE shadow (v text);
INSERT INTO shadow VALUES ('permanent');
SELECT v FROM shadow;
CREATE TEMP TABLE shadow (v text);
INSERT INTO shadow VALUES ('temporary');
SELECT v FROM shadow;
-- @session fresh
SELECT v FROM shadow;
