//! Request latency histograms for the metrics: fixed buckets of relaxed atomic
//! counters, so a request adds one increment per bucket hit and the scrape reads
//! them without taking a lock on the data path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (50 µs … 10 s; beyond: +Inf).
pub const BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

/// What a scrape reads: the count per bucket (not cumulative, as the Prometheus
/// client's encoder takes them: it sums them up itself), by upper bound in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound in seconds, requests above the previous bound and at or below
    /// this one); +Inf last.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = (self.buckets.iter().enumerate())
            .map(|(i, b)| {
                let bound = BOUNDS_US
                    .get(i)
                    .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
                (bound, b.load(Ordering::Relaxed))
            })
            .collect();
        HistogramSnapshot {
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            // The buckets' total: a separate count, read apart from them, could
            // disagree by a request in between (Prometheus wants +Inf = count).
            count: buckets.iter().map(|(_, n)| n).sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them_and_add_up() {
        let h = Histogram::default();
        for us in [10, 50, 51, 999, 1_000, 20_000_000] {
            h.observe(Duration::from_micros(us));
        }
        let s = h.snapshot();
        let at = |bound: f64| s.buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!(at(50e-6), 2, "10 µs and 50 µs: a bound is inclusive");
        assert_eq!(at(100e-6), 1, "51 µs");
        assert_eq!(at(1e-3), 2, "999 µs and 1 ms");
        assert_eq!(at(10.0), 0);
        assert_eq!(at(f64::INFINITY), 1, "20 s is beyond the last bound");
        assert_eq!(s.count, 6);
        assert!((s.sum_seconds - 20.00211).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
