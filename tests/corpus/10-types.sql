-- Every common type, in text and binary, under different output settings.
CREATE TABLE typed (
  id int PRIMARY KEY, i2 int2, i8 int8, num numeric(12, 4), f4 float4, f8 float8, t text, vc varchar(10),
  ch char(3), b bool, by bytea, d date, ts timestamp, tstz timestamptz, iv interval, tm time, tmtz timetz,
  u uuid, j json, jb jsonb, arr int[], tarr text[], inet_ inet, cidr_ cidr, mac macaddr, m money,
  r int4range, pt point, bits bit(4), vb varbit, x xml
);
INSERT INTO typed VALUES
  (1, 1, 9007199254740993, 1234.5678, 0.1, 0.1, 'plain', 'short', 'abc', true, '\x00ff10', '2024-02-29',
   '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.123456+00', '1 year 2 mons 3 days 04:05:06.7', '04:05:06',
   '04:05:06+02', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2, null]}', '{"b": {"c": true}}',
   '{1,2,NULL}', '{"x","y z",NULL}', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 12.34,
   '[1,10)', '(1.5,2.5)', B'1010', B'110', '<a>x</a>'),
  (2, -32768, -1, -0.0001, 'NaN', 'Infinity', 'üñí©ødé ✓', '', '  ', false, '', '0001-01-01', '1999-12-31 23:59:59',
   '1999-12-31 23:59:59-08', '-1 day', '00:00:00', '23:59:59-11', '00000000-0000-0000-0000-000000000000',
   'null', '[]', '{}', '{}', '::1', '::/0', 'ff:ff:ff:ff:ff:ff', -0.01, 'empty', '(0,0)', B'0000', B'', '<b/>'),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
SELECT * FROM typed ORDER BY id;
SELECT id, num * 2, f8 + 1, i8 + 1, d + 1, ts + iv, tstz - iv, u::text, jb -> 'b', arr[1], tarr[2] FROM typed ORDER BY id;
SELECT count(*), sum(num), avg(i2), max(t), min(d), bool_and(b), string_agg(vc, ',' ORDER BY id) FROM typed;
SELECT 1::int2, 2::int4, 3::int8, 1.50::numeric, 0.1::float4, 0.1::float8, 'NaN'::float8, '-Infinity'::float4;
SELECT '2024-01-02 03:04:05.678+00'::timestamptz, '1 day 02:03:04'::interval, '2024-02-29'::date, 'epoch'::timestamp;
SELECT ARRAY[1,2,NULL]::int4[], '{"x","y z"}'::text[], ARRAY[[1,2],[3,4]], '{}'::int[];
SELECT '{"a": 1}'::json, '{"b": 2}'::jsonb, '[1, "two", null, {"x": [3]}]'::jsonb -> 3;
SELECT 12.5::money, '$1,234.56'::money * 2;
SELECT E'\\x00ff'::bytea, 'abc'::bytea, decode('deadbeef', 'hex');
SELECT row(1, 'a', NULL), (1, 2) = (1, 2), ARRAY[row(1, 'x')];
SELECT int4range(1, 10) * int4range(5, 15), '[2024-01-01, 2024-02-01)'::daterange @> '2024-01-15'::date;
SELECT x::text, xmlserialize(content x AS text) FROM typed WHERE x IS NOT NULL ORDER BY id;
-- Output settings change the bytes of the same rows.
SET extra_float_digits = 3;
SELECT f4, f8 FROM typed ORDER BY id;
SET extra_float_digits = -2;
SELECT f4, f8 FROM typed ORDER BY id;
RESET extra_float_digits;
SET bytea_output = 'escape';
SELECT by FROM typed ORDER BY id;
RESET bytea_output;
SELECT by FROM typed ORDER BY id;
SET DateStyle = 'German, DMY';
SELECT d, ts, tstz FROM typed ORDER BY id;
SET DateStyle = 'SQL, MDY';
SELECT d, ts, tstz FROM typed ORDER BY id;
SET IntervalStyle = 'iso_8601';
SELECT iv FROM typed ORDER BY id;
SET IntervalStyle = 'sql_standard';
SELECT iv FROM typed ORDER BY id;
RESET ALL;
SET TimeZone = 'America/New_York';
SELECT tstz, tmtz, tstz::date, tstz::time FROM typed ORDER BY id;
SET TimeZone = 'Asia/Kolkata';
SELECT tstz, tmtz, tstz::date, tstz::time FROM typed ORDER BY id;
RESET TimeZone;
SET lc_monetary = 'C';
SELECT m FROM typed ORDER BY id;
RESET lc_monetary;
SET xmloption = content;
SELECT '<a/><b/>'::xml;
RESET xmloption;
SELECT '<a/><b/>'::xml;
SET standard_conforming_strings = off;
SELECT 'a\\b', E'c\\d';
RESET standard_conforming_strings;
SELECT 'a\\b', E'c\\d';
SELECT NULL, NULL::int, '' IS NULL, coalesce(NULL, 'x');
SELECT generate_series(1, 3) AS g, 'row' || generate_series(1, 3);
