//! Memory that must not grow with traffic when nobody scrapes `/metrics`. Alone in its test
//! binary, so the process's RSS reflects only what this test does.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{PgCluster, Proxy};
use pgcache::metrics::Outcome;
use pgcache::stats::Observation;

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timings_are_drained_without_a_scraper() {
    let proxy = Proxy::with_defaults(PgCluster::shared()).await;
    let stats = proxy.shared.stats.clone();
    let statement = Arc::new(pgcache::query::classify::classify("SELECT 1"));
    // What every statement records: its outcome and duration (a histogram sample).
    let record = move |n: usize| {
        for _ in 0..n {
            stats.record(&Observation::new("db".into(), statement.clone(), Outcome::Passthrough), 0, false);
        }
    };
    const PHASE: usize = 400_000;
    // One thread records every phase: each thread allocates from its own malloc arena, so
    // phases on different threads (the blocking pool's, which the server's own upkeep also
    // uses) would grow RSS by what an arena keeps, whatever pgcache holds.
    let (start, phases) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
    std::thread::spawn(move || {
        for done in phases {
            record(PHASE);
            let _ = done.send(());
        }
    });
    let phase = || {
        let (done, finished) = tokio::sync::oneshot::channel();
        start.send(done).unwrap();
        finished
    };
    // Statement durations are tallied in fixed shards (crate::metrics::durations), so nothing
    // here should allocate per statement. (When the exporter kept every sample until its
    // upkeep, drained samples were freed late and up to two phases' worth stayed allocated:
    // 1.5–8 MB, not growing; the baseline is still taken after three phases, as then.)
    for _ in 0..3 {
        phase().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let baseline = rss();
    for _ in 0..3 {
        phase().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let grown = rss().saturating_sub(baseline);
    // Held samples cost at least 8 bytes each: 1.2 million would be over 9 MB.
    assert!(grown < 3 << 20, "RSS grew by {} KiB over {} statements with no scraper", grown >> 10, 3 * PHASE);
}
