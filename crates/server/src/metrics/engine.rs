//! The engine's cumulative snapshots ([`EngineStats`]) turned into gauges and counter
//! increments, each counted once however snapshots and scrapes interleave.

use super::Metrics;
use internvl_scheduler::{EngineStats, FinishReason};
use prometheus::IntCounter;

impl Metrics {
    /// Takes the engine's latest snapshot: overwrites the gauges and advances the counters by
    /// what the snapshot's cumulative values add beyond those already exported.
    ///
    /// Meant to be called periodically and before each scrape, from any thread. A snapshot
    /// older than one already taken (fewer steps) is ignored, and a counter only ever moves
    /// forward, so a periodic update racing a scrape can neither count twice nor move a
    /// gauge back.
    pub fn update_engine(&self, stats: &EngineStats) {
        let mut seen = self
            .engine_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if stats.steps < seen.steps {
            return;
        }
        seen.steps = stats.steps;

        self.num_requests_running.set(saturating_i64(stats.running));
        self.num_requests_waiting.set(saturating_i64(stats.waiting));
        self.kv_cache_usage.set(if stats.blocks_total == 0 {
            0.0
        } else {
            stats.blocks_used as f64 / stats.blocks_total as f64
        });

        advance(
            &self.num_preemptions,
            &mut seen.preemptions,
            stats.preemptions,
        );
        advance(
            &self.prefix_cache_queries,
            &mut seen.prefix_queries,
            stats.prefix_queries,
        );
        advance(
            &self.prefix_cache_hits,
            &mut seen.prefix_hits,
            stats.prefix_hits,
        );
        advance(
            &self.image_cache_queries,
            &mut seen.image_cache_queries,
            stats.image_cache_queries,
        );
        advance(
            &self.image_cache_hits,
            &mut seen.image_cache_hits,
            stats.image_cache_hits,
        );
        advance(
            &self.request_output_buffer_overflows,
            &mut seen.output_overflows,
            stats.output_overflows,
        );
        // Requests whose client went away end inside the engine, without a Finished event.
        advance(
            &self
                .request_success
                .with_label_values(&[FinishReason::Abort.as_str()]),
            &mut seen.aborted,
            stats.aborted,
        );

        // The engine encodes images in batches and reports only totals: the images and the
        // time spent since the last snapshot are added as they are, none made up per image.
        if stats.images_encoded > seen.images_encoded {
            let images = stats.images_encoded - seen.images_encoded;
            let elapsed = stats.encode_time.saturating_sub(seen.encode_time);
            self.vision_encode.add(elapsed.as_secs_f64(), images);
            seen.images_encoded = stats.images_encoded;
            seen.encode_time = seen.encode_time.max(stats.encode_time);
        }
    }
}

/// Moves `counter` forward by how far the engine's cumulative `now` is past `seen`.
fn advance(counter: &IntCounter, seen: &mut u64, now: u64) {
    if now > *seen {
        counter.inc_by(now - *seen);
        *seen = now;
    }
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
