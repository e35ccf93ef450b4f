//! Engine-wide counters and gauges the server exports.

use std::time::Duration;

/// A snapshot of the engine, updated after every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache at admission, and those found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Encoder-cache lookups and hits.
    pub image_cache_queries: u64,
    pub image_cache_hits: u64,
    pub images_encoded: u64,
    /// Time spent in the vision encoder.
    pub encode_time: Duration,
    /// Time spent in LLM forwards.
    pub forward_time: Duration,
    /// Time spent sampling, detokenizing and checking stops.
    pub sample_time: Duration,
    pub steps: u64,
    pub tokens_last_step: usize,
    pub finished: u64,
    /// Completions cancelled: the reader went away or left too much output unread.
    pub aborted: u64,
    /// Completions ended by an error of their own (the model or the sampler failed on them).
    pub failed: u64,
    /// Requests cancelled because their reader left more than `max_buffered_output_bytes`
    /// of output unread (their completions also count in `aborted`).
    pub output_overflows: u64,
    /// How long each constrained token's grammar mask took to compute.
    pub grammar_masks: MaskTimes,
}

/// Quarter-octave buckets: bucket `k` holds times up to 2^(k/4) µs; the last, anything longer
/// (from about 0.8 s). Fixed size, so the snapshot taken after every step stays cheap.
const MASK_BUCKETS: usize = 80;

/// A histogram of grammar mask times, in buckets about 19% wide: enough to read p50 and p99
/// of a benchmark from, and to export.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskTimes {
    counts: [u64; MASK_BUCKETS],
    total: Duration,
}

impl Default for MaskTimes {
    fn default() -> Self {
        Self {
            counts: [0; MASK_BUCKETS],
            total: Duration::ZERO,
        }
    }
}

impl MaskTimes {
    pub fn record(&mut self, took: Duration) {
        let micros = took.as_secs_f64() * 1e6;
        let bucket = (0..MASK_BUCKETS - 1)
            .find(|&k| micros <= bucket_bound(k))
            .unwrap_or(MASK_BUCKETS - 1);
        self.counts[bucket] += 1;
        self.total += took;
    }

    /// Masks recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Their total time.
    pub fn total(&self) -> Duration {
        self.total
    }

    /// The upper bound of the bucket holding quantile `q` (in [0, 1]); `None` with no masks.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (k, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_secs_f64(bucket_bound(k) / 1e6));
            }
        }
        None
    }

    /// The masks recorded since `earlier`, a snapshot of the same engine.
    pub fn since(&self, earlier: &MaskTimes) -> MaskTimes {
        let mut counts = [0; MASK_BUCKETS];
        for (k, c) in counts.iter_mut().enumerate() {
            *c = self.counts[k].saturating_sub(earlier.counts[k]);
        }
        MaskTimes {
            counts,
            total: self.total.saturating_sub(earlier.total),
        }
    }
}

/// Upper bound of bucket `k`, in microseconds.
fn bucket_bound(k: usize) -> f64 {
    2f64.powf(k as f64 / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut t = MaskTimes::default();
        assert_eq!(t.quantile(0.5), None);
        for _ in 0..99 {
            t.record(Duration::from_micros(100));
        }
        t.record(Duration::from_millis(20));
        // 100 µs lies in the bucket up to 2^(27/4) ≈ 107.6 µs; 20 ms in the one up to 2^(58/4).
        let p50 = t.quantile(0.5).unwrap().as_secs_f64() * 1e6;
        assert!((100.0..=108.0).contains(&p50), "{p50}");
        let p100 = t.quantile(1.0).unwrap().as_secs_f64() * 1e6;
        assert!((20_000.0..=23_200.0).contains(&p100), "{p100}");
        assert_eq!(t.count(), 100);
        let later = {
            let mut l = t.clone();
            l.record(Duration::from_micros(3));
            l
        };
        assert_eq!(later.since(&t).count(), 1);
    }
}
