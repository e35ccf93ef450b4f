//! Histogram buckets: vLLM's where vLLM has the metric (so its dashboards read ours), ours
//! for the per-image and per-request image metrics.

/// Context length of InternVL-Chat V1.1's language model. vLLM builds its token-count buckets
/// as 1-2-5 steps up to the context length: longer counts cannot occur.
pub(super) const MAX_MODEL_LEN: u32 = 4096;

/// vLLM's time-to-first-token buckets: fine below 100 ms, where interactive latency lives, and
/// out to 2560 s so that queueing under overload still lands in a bucket.
pub(super) const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's inter-token buckets, from 10 ms (a fast decode step) up.
pub(super) const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// vLLM's buckets for whole-request phases (end to end, queue, prefill, decode).
pub(super) const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Ours, for preprocessing one image: decoding and resizing takes milliseconds to a second
/// (large PNGs).
pub(super) const IMAGE_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// Ours, for images per request: `le="0"` counts text-only requests apart.
pub(super) const IMAGES_PER_REQUEST_BUCKETS: &[f64] =
    &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];

/// vLLM's 1, 2, 5, 10, 20, 50, ... buckets, up to `max`.
pub(super) fn one_two_five(max: u32) -> Vec<f64> {
    let mut buckets = Vec::new();
    let mut scale = 1u64;
    loop {
        for mantissa in [1, 2, 5] {
            let bound = mantissa * scale;
            if bound > u64::from(max) {
                return buckets;
            }
            buckets.push(bound as f64);
        }
        scale *= 10;
    }
}
