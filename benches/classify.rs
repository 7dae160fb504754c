//! The classifier: what parsing a statement with libpg_query costs (a miss in the classifier's
//! own cache), what a cached classification costs (the hot path), and what a new text of a
//! known shape costs (the simple protocol with inlined keys: the lexer and the key values).

use criterion::{Criterion, criterion_group, criterion_main};
use pgcache::query::Classifier;
use pgcache::query::classify::classify;
use pgcache::query::digest::digest;
use pgcache::query::literals::literals;

const POINT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213";
const JOIN: &str = "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id \
                    WHERE o.created_at > $1 AND c.region = 'eu' ORDER BY o.total DESC LIMIT 20";

fn bench(c: &mut Criterion) {
    c.bench_function("classify point select (uncached)", |b| b.iter(|| classify(std::hint::black_box(POINT))));
    c.bench_function("classify 2-table join (uncached)", |b| b.iter(|| classify(std::hint::black_box(JOIN))));
    c.bench_function("digest point select", |b| b.iter(|| digest(std::hint::black_box(POINT))));
    c.bench_function("parse point select", |b| b.iter(|| pg_query::parse(std::hint::black_box(POINT), 0)));
    c.bench_function("scan point select", |b| b.iter(|| pg_query::scan(std::hint::black_box(POINT))));
    c.bench_function("literals point select", |b| b.iter(|| literals(std::hint::black_box(POINT))));
    let shaped = Classifier::default();
    shaped.classify(POINT);
    let texts: Vec<String> =
        (0..100_000).map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}")).collect();
    let mut next = texts.iter().cycle();
    c.bench_function("classify point select (new text, known shape)", |b| {
        b.iter(|| shaped.classify(std::hint::black_box(next.next().expect("cycles"))))
    });
    let cached = Classifier::default();
    cached.classify(JOIN);
    c.bench_function("classify 2-table join (cached)", |b| b.iter(|| cached.classify(std::hint::black_box(JOIN))));
}

criterion_group!(benches, bench);
criterion_main!(benches);
