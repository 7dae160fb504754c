//! The statement-duration histograms (`pgcache_query_duration_seconds`), recorded for every
//! statement by every worker thread at once.
//!
//! The exporter's own histogram takes a clock reading and writes two atomics on cache lines
//! every thread shares for each sample, and keeps the sample until its upkeep: in profiles of
//! point reads that was 1.25 % of pgcache's CPU, more than any other metric. So samples are
//! first tallied here, in shards threads take in turn (a count and a sum per bucket and
//! outcome, behind a lock that, with at least as many shards as the host has CPUs, is mostly
//! its own thread's), and handed to the exporter at upkeep — about once a second, and at
//! every scrape — each bucket's samples as their mean, that many times. The exporter's bucket
//! counts, count and sum come out as if each sample had been recorded itself (the mean of
//! samples in a bucket lies in it); only the samples' order and arrival times within the
//! second are not kept, which the rendered histogram does not show. The exporter takes the
//! samples one by one even then, so the upkeep's work grows with the statements since the
//! last one: it runs off the runtime's workers (`spawn_blocking`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics::Histogram;
use parking_lot::Mutex;

use super::{BUCKETS, Outcome};

/// Shards at least: more than a runtime has worker threads on most hosts (more on hosts with
/// more CPUs), so that threads seldom share one.
const MIN_SHARDS: usize = 16;

/// Buckets per outcome: one per bound, and one above the last.
const SLOTS: usize = BUCKETS.len() + 1;

/// The samples one shard holds since the last upkeep, per outcome and bucket.
#[derive(Clone, Copy)]
struct Tally {
    counts: [[u64; SLOTS]; 3],
    sums: [[f64; SLOTS]; 3],
}

impl Tally {
    const EMPTY: Tally = Tally { counts: [[0; SLOTS]; 3], sums: [[0.0; SLOTS]; 3] };
}

/// A shard on a cache line of its own.
#[repr(align(128))]
struct Shard(Mutex<Tally>);

/// The tallies of the three outcomes' histograms, and the exporter's histograms they go to.
pub struct Durations {
    shards: Box<[Shard]>,
    targets: [Histogram; 3],
}

impl Durations {
    /// Tallies for `targets` (hit, miss, pass-through).
    pub fn new(targets: [Histogram; 3]) -> Durations {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = cpus.next_power_of_two().max(MIN_SHARDS);
        Durations { shards: (0..shards).map(|_| Shard(Mutex::new(Tally::EMPTY))).collect(), targets }
    }

    /// One statement of `outcome` that took `took`.
    pub fn record(&self, outcome: Outcome, took: Duration) {
        let seconds = took.as_secs_f64();
        // A bucket counts the samples up to its bound (Prometheus's `le`).
        let slot = BUCKETS.partition_point(|&bound| bound < seconds);
        let mut tally = self.shards[shard() % self.shards.len()].0.lock();
        tally.counts[outcome as usize][slot] += 1;
        tally.sums[outcome as usize][slot] += seconds;
    }

    /// Hands every tallied sample to the exporter's histograms.
    pub fn drain(&self) {
        for shard in self.shards.iter() {
            let tally = std::mem::replace(&mut *shard.0.lock(), Tally::EMPTY);
            for (outcome, target) in self.targets.iter().enumerate() {
                for slot in 0..SLOTS {
                    let n = tally.counts[outcome][slot];
                    if n > 0 {
                        target.record_many(mean_in(slot, tally.sums[outcome][slot] / n as f64), n as usize);
                    }
                }
            }
        }
    }
}

/// `mean` kept inside bucket `slot` (rounding could put the mean of samples at a bound just
/// past it).
fn mean_in(slot: usize, mean: f64) -> f64 {
    let above = if slot == 0 { f64::NEG_INFINITY } else { BUCKETS[slot - 1].next_up() };
    let up_to = BUCKETS.get(slot).copied().unwrap_or(f64::INFINITY);
    mean.clamp(above, up_to)
}

/// This thread's turn among the threads that record (its shard, modulo their number).
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SHARD.with(|s| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rise() {
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]), "mean_in clamps between neighbours");
    }

    #[test]
    fn a_bucket_keeps_the_mean_of_its_samples_inside_it() {
        assert_eq!(mean_in(0, 0.00005), 0.00005);
        assert_eq!(mean_in(1, 0.00005), 0.00005f64.next_up(), "a bound belongs to the bucket below");
        assert_eq!(mean_in(2, 0.00011), 0.00011);
        assert_eq!(mean_in(SLOTS - 1, 30.0), 30.0);
        assert_eq!(mean_in(SLOTS - 1, 10.0), 10.0f64.next_up());
    }
}
