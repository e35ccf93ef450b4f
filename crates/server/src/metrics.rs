//! The Prometheus metrics behind `GET /metrics`.
//!
//! Dashboards for LLM servers are built on vLLM's metric names, so we export the same names,
//! types, meanings and bucket choices under our own prefix (`internvl:` where vLLM has
//! `vllm:`): a vLLM dashboard works after swapping the prefix. Every metric carries a constant
//! `model_name` label, as vLLM's do, so several servers can share one Prometheus.
//!
//! Beyond vLLM we export where a vision-language request's time goes before the language
//! model sees it (`image_preprocess_seconds`, `vision_encode_seconds`), how many images
//! requests carry (`request_images`), HTTP requests by route and status, and `build_info`.
//!
//! Colons in names are legal in the exposition format and the `prometheus` crate accepts them,
//! but `promtool check metrics` lints them ("metric names should not contain ':'", a convention
//! reserving colons for recording rules); we keep them to match vLLM, as its own exports do.
//!
//! Three kinds of input feed it: [`Metrics::observe_finished`] once per finished completion,
//! [`Metrics::update_engine`] with the engine's cumulative [`EngineStats`] snapshots, and the
//! HTTP layer's [`Metrics::observe_preprocess`] and [`Metrics::observe_http`].

use internvl_scheduler::{EngineStats, FinishReason, RequestTimings, Usage};
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The prefix of every metric name, as vLLM's `vllm:`.
const PREFIX: &str = "internvl:";

/// Context length of InternVL-Chat V1.1's language model. vLLM builds its token-count buckets
/// as 1-2-5 steps up to the context length: longer counts cannot occur.
const MAX_MODEL_LEN: u32 = 4096;

/// vLLM's time-to-first-token buckets: fine below 100 ms, where interactive latency lives, and
/// out to 2560 s so that queueing under overload still lands in a bucket.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's inter-token buckets, from 10 ms (a fast decode step) up.
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// vLLM's buckets for whole-request phases (end to end, queue, prefill, decode).
const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Ours, for per-image work: decoding and resizing an image takes milliseconds to a second
/// (large PNGs), encoding one with the ViT tens of milliseconds on a GPU and seconds on a CPU.
const IMAGE_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// Ours, for images per request: `le="0"` counts text-only requests apart.
const IMAGES_PER_REQUEST_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0];

/// The metrics of one served model, in a registry of their own (not the crate's global one),
/// so that tests and several servers in one process do not collide.
///
/// Shared across handlers behind an `Arc`: every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_request_latency: Histogram,
    request_queue_time: Histogram,
    request_prefill_time: Histogram,
    request_decode_time: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    request_images: Histogram,
    image_preprocess: Histogram,
    vision_encode: Histogram,
    num_requests_running: IntGauge,
    num_requests_waiting: IntGauge,
    kv_cache_usage: Gauge,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    num_preemptions: IntCounter,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    image_cache_queries: IntCounter,
    image_cache_hits: IntCounter,
    request_output_buffer_overflows: IntCounter,
    request_success: IntCounterVec,
    http_requests: IntCounterVec,
    http_connections_refused: IntCounter,
    /// The engine's cumulative counters as far as they have been exported: each snapshot
    /// advances our counters by what it adds beyond these.
    engine_seen: Mutex<EngineStats>,
}

impl Metrics {
    /// Registers every metric for the model served as `model_name` (the name clients send).
    pub fn new(model_name: &str) -> Metrics {
        let labels = HashMap::from([("model_name".to_owned(), model_name.to_owned())]);
        // Registry-wide labels reach every sample, those of metrics added later included.
        let registry = Registry::new_custom(None, Some(labels))
            .expect("a registry without a prefix is always valid");
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts =
                HistogramOpts::new(format!("{PREFIX}{name}"), help).buckets(buckets.to_vec());
            register(&registry, Histogram::with_opts(opts))
        };
        let token_buckets = one_two_five(MAX_MODEL_LEN);
        let int_gauge =
            |name: &str, help: &str| register(&registry, IntGauge::with_opts(opts(name, help)));
        let counter =
            |name: &str, help: &str| register(&registry, IntCounter::with_opts(opts(name, help)));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(opts(name, help), labels))
        };

        let build_info = opts(
            "build_info",
            "Version and git commit of the running server; always 1.",
        )
        .const_label("version", env!("CARGO_PKG_VERSION"))
        .const_label("git_commit", env!("INTERNVL_GIT_COMMIT"));
        register(&registry, IntGauge::with_opts(build_info)).set(1);

        let metrics = Metrics {
            time_to_first_token: histogram(
                "time_to_first_token_seconds",
                "Histogram of time from arrival to first token in seconds.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                "inter_token_latency_seconds",
                "Histogram of time between consecutive generated tokens in seconds.",
                INTER_TOKEN_BUCKETS,
            ),
            e2e_request_latency: histogram(
                "e2e_request_latency_seconds",
                "Histogram of time from arrival to finish in seconds.",
                REQUEST_LATENCY_BUCKETS,
            ),
            request_queue_time: histogram(
                "request_queue_time_seconds",
                "Histogram of time from arrival to first scheduling in seconds.",
                REQUEST_LATENCY_BUCKETS,
            ),
            request_prefill_time: histogram(
                "request_prefill_time_seconds",
                "Histogram of time from first scheduling to first token in seconds.",
                REQUEST_LATENCY_BUCKETS,
            ),
            request_decode_time: histogram(
                "request_decode_time_seconds",
                "Histogram of time from first token to last token in seconds.",
                REQUEST_LATENCY_BUCKETS,
            ),
            request_prompt_tokens: histogram(
                "request_prompt_tokens",
                "Histogram of prompt tokens per request, image tokens included.",
                &token_buckets,
            ),
            request_generation_tokens: histogram(
                "request_generation_tokens",
                "Histogram of generated tokens per request.",
                &token_buckets,
            ),
            request_images: histogram(
                "request_images",
                "Histogram of images per request.",
                IMAGES_PER_REQUEST_BUCKETS,
            ),
            image_preprocess: histogram(
                "image_preprocess_seconds",
                "Histogram of time to fetch, decode and preprocess one image in seconds.",
                IMAGE_SECONDS_BUCKETS,
            ),
            vision_encode: histogram(
                "vision_encode_seconds",
                "Histogram of vision encoder time per encoded image in seconds \
                 (mean over the batches between two engine snapshots).",
                IMAGE_SECONDS_BUCKETS,
            ),
            num_requests_running: int_gauge(
                "num_requests_running",
                "Number of requests in model execution batches.",
            ),
            num_requests_waiting: int_gauge(
                "num_requests_waiting",
                "Number of requests waiting to be processed.",
            ),
            kv_cache_usage: register(
                &registry,
                Gauge::with_opts(opts(
                    "kv_cache_usage_perc",
                    "KV-cache usage. 1 means 100 percent usage.",
                )),
            ),
            prompt_tokens: counter(
                "prompt_tokens_total",
                "Number of prompt tokens of finished requests.",
            ),
            generation_tokens: counter(
                "generation_tokens_total",
                "Number of generated tokens of finished requests.",
            ),
            num_preemptions: counter(
                "num_preemptions_total",
                "Cumulative number of preemptions by the engine.",
            ),
            prefix_cache_queries: counter(
                "prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            ),
            prefix_cache_hits: counter(
                "prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            ),
            image_cache_queries: counter(
                "image_cache_queries_total",
                "Vision encoder cache queries, in images.",
            ),
            image_cache_hits: counter(
                "image_cache_hits_total",
                "Vision encoder cache hits, in images.",
            ),
            request_output_buffer_overflows: counter(
                "request_output_buffer_overflows_total",
                "Requests cancelled because their client left more than \
                 max_buffered_output_bytes of output unread.",
            ),
            request_success: counter_vec(
                "request_success_total",
                "Count of successfully processed requests.",
                &["finished_reason"],
            ),
            http_requests: counter_vec(
                "http_requests_total",
                "HTTP requests by route and status code.",
                &["route", "status"],
            ),
            http_connections_refused: counter(
                "http_connections_refused_total",
                "Client connections closed on accept because max_connections were open.",
            ),
            engine_seen: Mutex::new(EngineStats::default()),
            registry,
        };
        // Every reason from the start, as vLLM does: a rate over a series that appears only
        // with its first request would miss that request.
        for reason in [
            FinishReason::Stop,
            FinishReason::Length,
            FinishReason::Abort,
        ] {
            metrics
                .request_success
                .with_label_values(&[reason.as_str()]);
        }
        metrics
    }

    /// Records one finished completion (each `Event::Finished`; an `n > 1` request finishes
    /// `n` times, as vLLM counts its child requests) that carried `images` images.
    ///
    /// Token counters advance here, when a request finishes, not per step as vLLM's do (the
    /// engine reports tokens per request): their rate lags by a request's duration. Phases a
    /// request never reached, one with no generated token, are left out of the time-to-first-
    /// token, queue, prefill and decode histograms rather than observed as zeros.
    pub fn observe_finished(
        &self,
        reason: FinishReason,
        usage: &Usage,
        timings: &RequestTimings,
        images: usize,
    ) {
        self.request_success
            .with_label_values(&[reason.as_str()])
            .inc();
        self.prompt_tokens.inc_by(usage.prompt_tokens as u64);
        self.generation_tokens
            .inc_by(usage.completion_tokens as u64);
        self.request_prompt_tokens
            .observe(usage.prompt_tokens as f64);
        self.request_generation_tokens
            .observe(usage.completion_tokens as f64);
        self.request_images.observe(images as f64);
        self.e2e_request_latency
            .observe(timings.end_to_end.as_secs_f64());
        if usage.completion_tokens > 0 {
            self.time_to_first_token
                .observe(timings.time_to_first_token.as_secs_f64());
            self.request_queue_time.observe(timings.queue.as_secs_f64());
            self.request_prefill_time
                .observe(timings.prefill.as_secs_f64());
            self.request_decode_time
                .observe(timings.decode.as_secs_f64());
        }
        for gap in &timings.inter_token {
            self.inter_token_latency.observe(gap.as_secs_f64());
        }
    }

    /// Records the preprocessing time of one image (fetch, decode, resize, normalise).
    pub fn observe_preprocess(&self, elapsed: Duration) {
        self.image_preprocess.observe(elapsed.as_secs_f64());
    }

    /// Counts one HTTP response. `route` must be the matched route template (such as
    /// `/v1/chat/completions`), never the raw path, or every odd URL becomes a new series.
    pub fn observe_http(&self, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// Counts one connection closed on accept for being over the connection cap.
    pub fn observe_connection_refused(&self) {
        self.http_connections_refused.inc();
    }

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

        // The engine encodes images in batches and reports only totals, so each image encoded
        // since the last snapshot is observed at the mean time per image: the histogram's
        // _count is then the images encoded and its _sum the total encode time.
        if stats.images_encoded > seen.images_encoded {
            let images = stats.images_encoded - seen.images_encoded;
            let elapsed = stats.encode_time.saturating_sub(seen.encode_time);
            let per_image = elapsed.as_secs_f64() / images as f64;
            for _ in 0..images {
                self.vision_encode.observe(per_image);
            }
            seen.images_encoded = stats.images_encoded;
            seen.encode_time = seen.encode_time.max(stats.encode_time);
        }
    }

    /// Everything, in the Prometheus text exposition format 0.0.4 (`text/plain;
    /// version=0.0.4`). Call [`Metrics::update_engine`] first for fresh engine numbers.
    pub fn render(&self) -> String {
        let mut text = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut text)
            .expect("our metric families are well-formed");
        text
    }
}

/// Options for the metric `name` (without the prefix).
fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("{PREFIX}{name}"), help)
}

/// Registers a freshly built metric and hands it back. Names and labels are constants, so a
/// failure is a bug here, not a condition to handle.
fn register<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("metric options are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
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

/// vLLM's 1, 2, 5, 10, 20, 50, ... buckets, up to `max`.
fn one_two_five(max: u32) -> Vec<f64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const MODEL: &str = "internvl-chat-v1-1";

    /// One sample line of the text format.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// The sample lines of `text`, parsed (label values may hold escaped quotes).
    fn samples(text: &str) -> Vec<Sample> {
        text.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a value");
                let (name, mut rest) = match series.split_once('{') {
                    Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing }")),
                    None => (series, ""),
                };
                let mut labels = BTreeMap::new();
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").expect("label=\"");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().expect("closing quote") {
                            (_, '\\') => value.push(chars.next().expect("escaped").1),
                            (i, '"') => break i,
                            (_, c) => value.push(c),
                        }
                    };
                    labels.insert(key.to_owned(), value);
                    rest = after[end + 1..].trim_start_matches(',');
                }
                Sample {
                    name: name.to_owned(),
                    labels,
                    value: value.parse().expect("a number"),
                }
            })
            .collect()
    }

    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = samples(text)
            .into_iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?} in:\n{text}");
        found[0]
    }

    fn bucket(text: &str, name: &str, le: &str) -> f64 {
        value(text, &format!("{PREFIX}{name}_bucket"), &[("le", le)])
    }

    fn scalar(text: &str, name: &str) -> f64 {
        value(text, &format!("{PREFIX}{name}"), &[])
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timings(ttft: u64, gaps: &[u64], e2e: u64) -> RequestTimings {
        RequestTimings {
            queue: ms(ttft / 4),
            time_to_first_token: ms(ttft),
            inter_token: gaps.iter().map(|&g| ms(g)).collect(),
            prefill: ms(ttft - ttft / 4),
            decode: ms(gaps.iter().sum()),
            end_to_end: ms(e2e),
            preemptions: 0,
        }
    }

    fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            cached_tokens: 0,
        }
    }

    /// A metrics instance fed a few requests, engine snapshots and HTTP requests, rendered.
    fn sample_text() -> String {
        let m = Metrics::new(MODEL);
        m.observe_finished(
            FinishReason::Stop,
            &usage(300, 3),
            &timings(50, &[20, 30], 120),
            1,
        );
        m.update_engine(&EngineStats {
            running: 2,
            steps: 5,
            blocks_used: 1,
            blocks_total: 4,
            images_encoded: 2,
            encode_time: ms(100),
            ..Default::default()
        });
        m.observe_preprocess(ms(7));
        m.observe_http("/v1/chat/completions", 200);
        m.render()
    }

    #[test]
    fn finished_requests_fill_counters_and_histograms() {
        let m = Metrics::new(MODEL);
        // Two stopped requests (one with two images), one cut by length, one aborted before
        // its first token.
        m.observe_finished(
            FinishReason::Stop,
            &usage(300, 3),
            &timings(50, &[20, 30], 120),
            2,
        );
        m.observe_finished(
            FinishReason::Stop,
            &usage(40, 2),
            &timings(300, &[60], 400),
            0,
        );
        m.observe_finished(
            FinishReason::Length,
            &usage(10, 1),
            &timings(3000, &[], 3000),
            0,
        );
        let aborted = RequestTimings {
            end_to_end: ms(900),
            ..Default::default()
        };
        m.observe_finished(FinishReason::Abort, &usage(5, 0), &aborted, 1);
        let text = m.render();

        let success = |reason| {
            value(
                &text,
                "internvl:request_success_total",
                &[("finished_reason", reason), ("model_name", MODEL)],
            )
        };
        assert_eq!(success("stop"), 2.0);
        assert_eq!(success("length"), 1.0);
        assert_eq!(success("abort"), 1.0);
        assert_eq!(scalar(&text, "prompt_tokens_total"), 355.0);
        assert_eq!(scalar(&text, "generation_tokens_total"), 6.0);

        // The aborted request had no first token: three observations, not four.
        assert_eq!(scalar(&text, "time_to_first_token_seconds_count"), 3.0);
        assert_eq!(bucket(&text, "time_to_first_token_seconds", "0.06"), 1.0);
        assert_eq!(bucket(&text, "time_to_first_token_seconds", "0.5"), 2.0);
        assert_eq!(bucket(&text, "time_to_first_token_seconds", "2.5"), 2.0);
        assert_eq!(bucket(&text, "time_to_first_token_seconds", "5"), 3.0);
        assert_eq!(bucket(&text, "time_to_first_token_seconds", "+Inf"), 3.0);
        assert!((scalar(&text, "time_to_first_token_seconds_sum") - 3.35).abs() < 1e-9);
        assert_eq!(scalar(&text, "request_queue_time_seconds_count"), 3.0);
        assert_eq!(scalar(&text, "request_prefill_time_seconds_count"), 3.0);
        assert_eq!(scalar(&text, "request_decode_time_seconds_count"), 3.0);

        // One observation per gap: 20, 30 and 60 ms.
        assert_eq!(scalar(&text, "inter_token_latency_seconds_count"), 3.0);
        assert_eq!(bucket(&text, "inter_token_latency_seconds", "0.025"), 1.0);
        assert_eq!(bucket(&text, "inter_token_latency_seconds", "0.05"), 2.0);
        assert_eq!(bucket(&text, "inter_token_latency_seconds", "0.075"), 3.0);

        // Every request ends, aborted or not.
        assert_eq!(scalar(&text, "e2e_request_latency_seconds_count"), 4.0);
        assert_eq!(bucket(&text, "e2e_request_latency_seconds", "0.3"), 1.0);
        assert_eq!(bucket(&text, "e2e_request_latency_seconds", "1"), 3.0);
        assert_eq!(bucket(&text, "request_prompt_tokens", "5"), 1.0);
        assert_eq!(bucket(&text, "request_prompt_tokens", "50"), 3.0);
        assert_eq!(bucket(&text, "request_prompt_tokens", "500"), 4.0);
        assert_eq!(bucket(&text, "request_generation_tokens", "1"), 2.0);
        assert_eq!(bucket(&text, "request_generation_tokens", "2"), 3.0);
        assert_eq!(bucket(&text, "request_images", "0"), 2.0);
        assert_eq!(bucket(&text, "request_images", "1"), 3.0);
        assert_eq!(bucket(&text, "request_images", "2"), 4.0);
        assert_eq!(scalar(&text, "request_images_sum"), 3.0);
    }

    #[test]
    fn engine_snapshots_set_gauges_and_apply_deltas_once() {
        let m = Metrics::new(MODEL);
        let first = EngineStats {
            running: 3,
            waiting: 5,
            blocks_used: 30,
            blocks_total: 120,
            preemptions: 1,
            prefix_queries: 512,
            prefix_hits: 256,
            image_cache_queries: 4,
            image_cache_hits: 1,
            images_encoded: 3,
            encode_time: ms(300),
            output_overflows: 2,
            steps: 10,
            ..Default::default()
        };
        m.update_engine(&first);
        // The same snapshot again (a scrape right after the periodic update) adds nothing.
        m.update_engine(&first);
        let text = m.render();
        assert_eq!(scalar(&text, "num_requests_running"), 3.0);
        assert_eq!(scalar(&text, "num_requests_waiting"), 5.0);
        assert_eq!(scalar(&text, "kv_cache_usage_perc"), 0.25);
        assert_eq!(scalar(&text, "num_preemptions_total"), 1.0);
        assert_eq!(scalar(&text, "prefix_cache_queries_total"), 512.0);
        assert_eq!(scalar(&text, "prefix_cache_hits_total"), 256.0);
        assert_eq!(scalar(&text, "image_cache_queries_total"), 4.0);
        assert_eq!(scalar(&text, "image_cache_hits_total"), 1.0);
        assert_eq!(scalar(&text, "request_output_buffer_overflows_total"), 2.0);
        // Three images at 100 ms each.
        assert_eq!(scalar(&text, "vision_encode_seconds_count"), 3.0);
        assert_eq!(bucket(&text, "vision_encode_seconds", "0.075"), 0.0);
        assert_eq!(bucket(&text, "vision_encode_seconds", "0.1"), 3.0);

        let second = EngineStats {
            running: 1,
            waiting: 0,
            blocks_used: 0,
            preemptions: 4,
            prefix_queries: 1024,
            prefix_hits: 256,
            image_cache_queries: 6,
            image_cache_hits: 3,
            images_encoded: 4,
            encode_time: ms(800),
            output_overflows: 3,
            steps: 20,
            ..first.clone()
        };
        m.update_engine(&second);
        // A snapshot taken before `second` but handed over after it changes nothing.
        m.update_engine(&EngineStats {
            running: 7,
            steps: 15,
            ..first.clone()
        });
        let text = m.render();
        assert_eq!(scalar(&text, "num_requests_running"), 1.0);
        assert_eq!(scalar(&text, "num_requests_waiting"), 0.0);
        assert_eq!(scalar(&text, "kv_cache_usage_perc"), 0.0);
        assert_eq!(scalar(&text, "num_preemptions_total"), 4.0);
        assert_eq!(scalar(&text, "prefix_cache_queries_total"), 1024.0);
        assert_eq!(scalar(&text, "prefix_cache_hits_total"), 256.0);
        assert_eq!(scalar(&text, "image_cache_queries_total"), 6.0);
        assert_eq!(scalar(&text, "image_cache_hits_total"), 3.0);
        assert_eq!(scalar(&text, "request_output_buffer_overflows_total"), 3.0);
        // One more image, at 500 ms.
        assert_eq!(scalar(&text, "vision_encode_seconds_count"), 4.0);
        assert_eq!(bucket(&text, "vision_encode_seconds", "0.25"), 3.0);
        assert_eq!(bucket(&text, "vision_encode_seconds", "0.5"), 4.0);
        assert!((scalar(&text, "vision_encode_seconds_sum") - 0.8).abs() < 1e-9);

        // An engine with no blocks yet is not at NaN usage.
        m.update_engine(&EngineStats {
            blocks_total: 0,
            ..second
        });
        assert_eq!(scalar(&m.render(), "kv_cache_usage_perc"), 0.0);
    }

    #[test]
    fn preprocess_http_and_build_info() {
        let m = Metrics::new(MODEL);
        m.observe_preprocess(ms(3));
        m.observe_preprocess(ms(40));
        m.observe_http("/v1/chat/completions", 200);
        m.observe_http("/v1/chat/completions", 200);
        m.observe_http("/v1/chat/completions", 400);
        m.observe_http("/health", 200);
        let text = m.render();
        assert_eq!(scalar(&text, "image_preprocess_seconds_count"), 2.0);
        assert_eq!(bucket(&text, "image_preprocess_seconds", "0.0025"), 0.0);
        assert_eq!(bucket(&text, "image_preprocess_seconds", "0.005"), 1.0);
        assert_eq!(bucket(&text, "image_preprocess_seconds", "0.05"), 2.0);
        let http = |route, status| {
            value(
                &text,
                "internvl:http_requests_total",
                &[("route", route), ("status", status)],
            )
        };
        assert_eq!(http("/v1/chat/completions", "200"), 2.0);
        assert_eq!(http("/v1/chat/completions", "400"), 1.0);
        assert_eq!(http("/health", "200"), 1.0);

        let info = value(
            &text,
            "internvl:build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("model_name", MODEL),
            ],
        );
        assert_eq!(info, 1.0);
        let commit = samples(&text)
            .into_iter()
            .find(|s| s.name == "internvl:build_info")
            .and_then(|s| s.labels.get("git_commit").cloned())
            .expect("a git_commit label");
        assert!(!commit.is_empty());
    }

    #[test]
    fn every_metric_is_described_prefixed_and_labelled() {
        let text = sample_text();
        let declared = |kind: &str| -> BTreeMap<String, String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(kind))
                .map(|rest| {
                    let (name, what) = rest.split_once(' ').expect("name and text");
                    (name.to_owned(), what.to_owned())
                })
                .collect()
        };
        let helps = declared("# HELP ");
        let types = declared("# TYPE ");
        let expected: BTreeMap<&str, &str> = [
            ("time_to_first_token_seconds", "histogram"),
            ("inter_token_latency_seconds", "histogram"),
            ("e2e_request_latency_seconds", "histogram"),
            ("request_queue_time_seconds", "histogram"),
            ("request_prefill_time_seconds", "histogram"),
            ("request_decode_time_seconds", "histogram"),
            ("request_prompt_tokens", "histogram"),
            ("request_generation_tokens", "histogram"),
            ("image_preprocess_seconds", "histogram"),
            ("vision_encode_seconds", "histogram"),
            ("request_images", "histogram"),
            ("num_requests_running", "gauge"),
            ("num_requests_waiting", "gauge"),
            ("kv_cache_usage_perc", "gauge"),
            ("build_info", "gauge"),
            ("prompt_tokens_total", "counter"),
            ("generation_tokens_total", "counter"),
            ("num_preemptions_total", "counter"),
            ("prefix_cache_queries_total", "counter"),
            ("prefix_cache_hits_total", "counter"),
            ("image_cache_queries_total", "counter"),
            ("image_cache_hits_total", "counter"),
            ("request_output_buffer_overflows_total", "counter"),
            ("request_success_total", "counter"),
            ("http_requests_total", "counter"),
            ("http_connections_refused_total", "counter"),
        ]
        .into_iter()
        .collect();
        let expected_types: BTreeMap<String, String> = expected
            .iter()
            .map(|(name, kind)| (format!("{PREFIX}{name}"), kind.to_string()))
            .collect();
        assert_eq!(types, expected_types);
        let described: BTreeSet<&String> = helps.keys().collect();
        assert_eq!(described, types.keys().collect());
        assert!(helps.values().all(|help| !help.trim().is_empty()));

        // Every sample belongs to a declared family and carries the model's name.
        for sample in samples(&text) {
            if !types.contains_key(&sample.name) {
                // Only a histogram's series have names other than their family's.
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| sample.name.strip_suffix(suffix));
                let kind = family.and_then(|f| types.get(f)).map(String::as_str);
                assert_eq!(kind, Some("histogram"), "undeclared {}", sample.name);
            }
            assert_eq!(
                sample.labels.get("model_name").map(String::as_str),
                Some(MODEL)
            );
        }
    }

    #[test]
    fn model_names_are_escaped() {
        let m = Metrics::new(r#"odd "name"\ here"#);
        let text = m.render();
        let info = samples(&text)
            .into_iter()
            .find(|s| s.name == "internvl:build_info")
            .expect("build_info");
        assert_eq!(info.labels["model_name"], r#"odd "name"\ here"#);
    }

    #[test]
    fn token_buckets_follow_vllm() {
        assert_eq!(
            one_two_five(4096),
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]
        );
        assert_eq!(one_two_five(100), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]);
    }

    #[test]
    fn metrics_are_shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Metrics>();
    }

    /// `promtool check metrics` must parse the output; its only lint may be the colons our
    /// vLLM-compatible names carry on purpose. promtool must be on PATH: the test fails without
    /// it (`scripts/install-deps.sh` installs it, as CI does before the tests).
    #[test]
    fn promtool_accepts_the_output() {
        use std::io::Write;
        use std::process::{Command, Stdio};

        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "promtool is needed on PATH ({e}): run `bash scripts/install-deps.sh` \
                     (installs Debian's prometheus package) or `apt-get install prometheus`"
                )
            });
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(sample_text().as_bytes())
            .expect("write to promtool");
        let out = child.wait_with_output().expect("promtool runs");
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // Exit status 0: clean; 3: lint problems only; anything else: the text did not parse.
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "promtool failed: {report}"
        );
        for problem in report.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                problem.ends_with("metric names should not contain ':'"),
                "promtool: {problem}"
            );
        }
    }
}
