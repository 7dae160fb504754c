//! The statement-duration histograms (`pgcache_query_duration_seconds`), recorded for every
//! statement by every worker thread at once.
//!
//! The exporter's histogram takes a clock reading and writes two atomics on cache lines every
//! thread shares for each sample, and keeps every sample until its upkeep folds them into
//! buckets: in profiles of point reads that was 1.25 % of pgcache's CPU, more than any other
//! metric, and an upkeep's work (and memory: 16 bytes a sample) grew with the traffic since the
//! last one. So these histograms are kept here instead, as Prometheus defines them — a count
//! per bucket, a sum and a count per outcome — and rendered beside the exporter's output.
//! Each thread adds its samples in a shard it mostly has to itself (threads take shards in
//! turn; there are at least as many as the host has CPUs), behind a lock; at upkeep (about
//! once a second) and at every scrape the shards are folded into the totals: fixed work, fixed
//! memory, whatever the traffic. Buckets and counts come out as if each sample had been
//! recorded one by one, and sums up to the last bits (the additions run in another order).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::{BUCKETS, Outcome, QUERY_DURATION};

/// Shards at least: more than a runtime has worker threads on most hosts (more on hosts with
/// more CPUs), so that threads seldom share one.
const MIN_SHARDS: usize = 16;

/// Buckets per outcome: one per bound, and one above the last.
const SLOTS: usize = BUCKETS.len() + 1;

/// The outcomes, in the order their histograms are rendered (each at its index).
const OUTCOMES: [Outcome; 3] = [Outcome::Hit, Outcome::Miss, Outcome::Passthrough];
const _: () = assert!(
    Outcome::Hit as usize == 0 && Outcome::Miss as usize == 1 && Outcome::Passthrough as usize == 2,
    "every outcome has its index in OUTCOMES"
);

/// How many outcomes there are.
const N: usize = OUTCOMES.len();

/// Samples per outcome and bucket (not cumulative), and their sum per outcome.
#[derive(Clone, Copy)]
struct Tally {
    counts: [[u64; SLOTS]; N],
    sums: [f64; N],
}

impl Tally {
    const EMPTY: Tally = Tally { counts: [[0; SLOTS]; N], sums: [0.0; N] };

    fn add(&mut self, other: &Tally) {
        for o in 0..N {
            for slot in 0..SLOTS {
                self.counts[o][slot] += other.counts[o][slot];
            }
            self.sums[o] += other.sums[o];
        }
    }
}

/// A shard on cache lines of its own.
#[repr(align(128))]
struct Shard(Mutex<Tally>);

/// The three outcomes' histograms: what the shards hold since the last fold, and the totals.
pub struct Durations {
    shards: Box<[Shard]>,
    totals: Mutex<Tally>,
}

impl Default for Durations {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = cpus.next_power_of_two().max(MIN_SHARDS);
        Durations {
            shards: (0..shards).map(|_| Shard(Mutex::new(Tally::EMPTY))).collect(),
            totals: Mutex::new(Tally::EMPTY),
        }
    }
}

impl Durations {
    /// One statement of `outcome` that took `took`.
    pub fn record(&self, outcome: Outcome, took: Duration) {
        let seconds = took.as_secs_f64();
        // A bucket counts the samples up to its bound (Prometheus's `le`).
        let slot = BUCKETS.partition_point(|&bound| bound < seconds);
        let mut tally = self.shards[shard() % self.shards.len()].0.lock();
        tally.counts[outcome as usize][slot] += 1;
        tally.sums[outcome as usize] += seconds;
    }

    /// Folds what the shards hold into the totals.
    pub fn fold(&self) {
        let mut totals = self.totals.lock();
        for shard in self.shards.iter() {
            let tally = std::mem::replace(&mut *shard.0.lock(), Tally::EMPTY);
            totals.add(&tally);
        }
    }

    /// The histograms in Prometheus's text format, with `help` (folded first).
    pub fn render(&self, help: &str, out: &mut String) {
        self.fold();
        let totals = *self.totals.lock();
        let name = QUERY_DURATION;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for outcome in OUTCOMES {
            let (o, label) = (outcome as usize, outcome.as_str());
            let mut cumulative = 0;
            for (slot, n) in totals.counts[o].iter().enumerate() {
                cumulative += n;
                let le = BUCKETS.get(slot).map_or_else(|| "+Inf".to_owned(), f64::to_string);
                let _ = writeln!(out, "{name}_bucket{{outcome=\"{label}\",le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_sum{{outcome=\"{label}\"}} {}", totals.sums[o]);
            let _ = writeln!(out, "{name}_count{{outcome=\"{label}\"}} {cumulative}");
        }
        out.push('\n');
    }
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

    /// Samples recorded from several threads render as Prometheus defines a histogram:
    /// cumulative buckets (a sample on a bound counted in it), sum, count; and a second render
    /// counts nothing twice.
    #[test]
    fn samples_render_as_a_prometheus_histogram() {
        let d = Durations::default();
        let samples = [0.00002, 0.00005, 0.00007, 0.0003, 0.0003, 0.004, 0.7, 12.0];
        std::thread::scope(|s| {
            for half in samples.chunks(4) {
                s.spawn(|| half.iter().for_each(|&v| d.record(Outcome::Hit, Duration::from_secs_f64(v))));
            }
        });
        d.record(Outcome::Miss, Duration::from_millis(3));
        let mut text = String::new();
        d.render("help", &mut text);
        let value = |series: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series}: {text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let bucket = |le: &str| value(&format!("{QUERY_DURATION}_bucket{{outcome=\"hit\",le=\"{le}\"}} "));
        assert_eq!(bucket("0.00005"), 2.0, "a sample on the bound is in its bucket");
        assert_eq!(bucket("0.0001"), 3.0);
        assert_eq!(bucket("0.0005"), 5.0);
        assert_eq!(bucket("0.005"), 6.0);
        assert_eq!(bucket("1"), 7.0);
        assert_eq!(bucket("10"), 7.0);
        assert_eq!(bucket("+Inf"), 8.0);
        assert_eq!(value(&format!("{QUERY_DURATION}_count{{outcome=\"hit\"}} ")), 8.0);
        let sum: f64 = samples.iter().sum();
        assert!((value(&format!("{QUERY_DURATION}_sum{{outcome=\"hit\"}} ")) - sum).abs() < 1e-9, "{text}");
        assert_eq!(value(&format!("{QUERY_DURATION}_count{{outcome=\"miss\"}} ")), 1.0);
        assert_eq!(value(&format!("{QUERY_DURATION}_count{{outcome=\"passthrough\"}} ")), 0.0);
        assert!(text.starts_with(&format!("# HELP {QUERY_DURATION} help\n# TYPE {QUERY_DURATION} histogram\n")));
        let mut again = String::new();
        d.render("help", &mut again);
        assert_eq!(again, text, "folded once");
    }

    #[test]
    fn buckets_rise() {
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
