-- Writes of every kind, each followed by the reads it must change.
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric, cat int);
INSERT INTO items SELECT g, 'item ' || g, g * 1.5, g % 3 FROM generate_series(1, 30) g;
SELECT * FROM items WHERE id = 5;
SELECT cat, count(*), sum(price) FROM items GROUP BY cat ORDER BY cat;
UPDATE items SET price = price + 1 WHERE id = 5;
SELECT * FROM items WHERE id = 5;
SELECT cat, count(*), sum(price) FROM items GROUP BY cat ORDER BY cat;
DELETE FROM items WHERE id > 25;
SELECT count(*), max(id) FROM items;
INSERT INTO items VALUES (5, 'dup', 0, 0);
INSERT INTO items VALUES (5, 'dup', 0, 0) ON CONFLICT (id) DO UPDATE SET name = 'upserted';
SELECT * FROM items WHERE id = 5;
INSERT INTO items VALUES (100, 'new', 1, 1) RETURNING *;
SELECT count(*) FROM items;
WITH moved AS (DELETE FROM items WHERE id = 100 RETURNING *) SELECT count(*) FROM moved;
SELECT count(*) FROM items;
MERGE INTO items t USING (VALUES (1, 'merged'), (200, 'inserted')) s(id, name) ON t.id = s.id
  WHEN MATCHED THEN UPDATE SET name = s.name WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.name, 0, 2);
SELECT id, name FROM items WHERE id IN (1, 200) ORDER BY id;
SELECT * INTO items_copy FROM items WHERE cat = 1;
SELECT count(*) FROM items_copy;
TRUNCATE items_copy;
SELECT count(*) FROM items_copy;
INSERT INTO items_copy SELECT * FROM items WHERE cat = 2;
SELECT count(*) FROM items_copy;
-- Transactions: a rollback keeps the old rows, a commit shows the new ones.
BEGIN;
UPDATE items SET name = 'in tx' WHERE id = 2;
SELECT name FROM items WHERE id = 2;
ROLLBACK;
SELECT name FROM items WHERE id = 2;
BEGIN;
SELECT name FROM items WHERE id = 3;
UPDATE items SET name = 'committed' WHERE id = 3;
SELECT name FROM items WHERE id = 3;
COMMIT;
SELECT name FROM items WHERE id = 3;
BEGIN;
SAVEPOINT a;
UPDATE items SET name = 'to be undone' WHERE id = 4;
ROLLBACK TO SAVEPOINT a;
SELECT name FROM items WHERE id = 4;
RELEASE SAVEPOINT a;
COMMIT;
SELECT name FROM items WHERE id = 4;
BEGIN;
SELECT 1/0;
SELECT name FROM items WHERE id = 4;
ROLLBACK;
SELECT name FROM items WHERE id = 4;
-- Another session writes; this one must see it.
-- @session writer
UPDATE items SET price = 999 WHERE id = 6;
-- @session main
SELECT price FROM items WHERE id = 6;
-- @session writer
BEGIN;
UPDATE items SET price = 1000 WHERE id = 6;
-- @session main
SELECT price FROM items WHERE id = 6;
-- @session writer
COMMIT;
-- @session main
SELECT price FROM items WHERE id = 6;
-- Views, materialized views, partitions, inheritance, cascades, triggers.
CREATE VIEW cheap AS SELECT id, name FROM items WHERE price < 10;
SELECT * FROM cheap ORDER BY id;
UPDATE items SET price = 5 WHERE id = 20;
SELECT * FROM cheap ORDER BY id;
UPDATE cheap SET name = 'through the view' WHERE id = 1;
SELECT name FROM items WHERE id = 1;
CREATE MATERIALIZED VIEW totals AS SELECT cat, sum(price) AS s FROM items GROUP BY cat;
SELECT * FROM totals ORDER BY cat;
UPDATE items SET price = price * 2 WHERE cat = 0;
SELECT * FROM totals ORDER BY cat;
REFRESH MATERIALIZED VIEW totals;
SELECT * FROM totals ORDER BY cat;
CREATE TABLE events (id int, region text, v int) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
INSERT INTO events VALUES (1, 'eu', 10), (2, 'us', 20);
SELECT region, sum(v) FROM events GROUP BY region ORDER BY region;
INSERT INTO events_eu VALUES (3, 'eu', 30);
SELECT region, sum(v) FROM events GROUP BY region ORDER BY region;
UPDATE events SET region = 'us' WHERE id = 1;
SELECT * FROM events_us ORDER BY id;
CREATE TABLE parent (id int PRIMARY KEY, v text);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE, v text);
INSERT INTO parent VALUES (1, 'p1'), (2, 'p2');
INSERT INTO child VALUES (1, 1, 'c1'), (2, 1, 'c2'), (3, 2, 'c3');
SELECT count(*) FROM child;
DELETE FROM parent WHERE id = 1;
SELECT count(*) FROM child;
CREATE TABLE audit (n int);
INSERT INTO audit VALUES (0);
CREATE FUNCTION bump_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN UPDATE audit SET n = n + 1; RETURN NEW; END $$;
CREATE TRIGGER t_audit AFTER INSERT ON parent FOR EACH ROW EXECUTE FUNCTION bump_audit();
SELECT n FROM audit;
INSERT INTO parent VALUES (3, 'p3');
SELECT n FROM audit;
-- DDL changes what a read returns.
ALTER TABLE items ADD COLUMN note text DEFAULT 'n/a';
SELECT id, note FROM items WHERE id = 7;
ALTER TABLE items RENAME COLUMN note TO remark;
SELECT id, remark FROM items WHERE id = 7;
ALTER TABLE items DROP COLUMN remark;
SELECT * FROM items WHERE id = 7;
DROP VIEW cheap;
SELECT * FROM cheap;
CREATE VIEW cheap AS SELECT id FROM items WHERE price < 3;
SELECT * FROM cheap ORDER BY id;
CREATE SEQUENCE seq;
SELECT nextval('seq');
SELECT nextval('seq');
SELECT currval('seq');
