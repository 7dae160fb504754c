//! The classifier: what parsing a statement with libpg_query costs (a miss in the classifier's
//! own cache), and what a cached classification costs (the hot path).

use criterion::{Criterion, criterion_group, criterion_main};
use pgcache::query::Classifier;
use pgcache::query::classify::{classify, fingerprint};

const POINT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 48213";
const JOIN: &str = "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id \
                    WHERE o.created_at > $1 AND c.region = 'eu' ORDER BY o.total DESC LIMIT 20";

fn bench(c: &mut Criterion) {
    c.bench_function("classify point select (uncached)", |b| b.iter(|| classify(std::hint::black_box(POINT))));
    c.bench_function("classify 2-table join (uncached)", |b| b.iter(|| classify(std::hint::black_box(JOIN))));
    c.bench_function("fingerprint point select", |b| b.iter(|| fingerprint(std::hint::black_box(POINT))));
    c.bench_function("normalize point select", |b| b.iter(|| pg_query::normalize(std::hint::black_box(POINT))));
    c.bench_function("scan point select", |b| b.iter(|| pg_query::scan(std::hint::black_box(POINT))));
    let cached = Classifier::default();
    cached.classify(JOIN);
    c.bench_function("classify 2-table join (cached)", |b| b.iter(|| cached.classify(std::hint::black_box(JOIN))));
}

criterion_group!(benches, bench);
criterion_main!(benches);
