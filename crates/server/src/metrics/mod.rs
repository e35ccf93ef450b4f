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
//! Every number is one the engine or the HTTP layer measured; where the engine measures only
//! totals (the vision encoder's time over batches of images), only totals are exported.
//!
//! This file declares the metrics and renders them; two kinds of input feed them: the HTTP
//! layer's observations ([`requests`]: each finished completion with its measured timings,
//! each image's preprocessing, each response) and the engine's cumulative [`EngineStats`]
//! snapshots ([`engine`]). Bucket choices are in [`buckets`].

mod buckets;
mod engine;
mod requests;
#[cfg(test)]
mod tests;
mod totals;

use buckets::{
    one_two_five, IMAGES_PER_REQUEST_BUCKETS, IMAGE_SECONDS_BUCKETS, INTER_TOKEN_BUCKETS,
    MAX_MODEL_LEN, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS,
};
use internvl_scheduler::{EngineStats, FinishReason};
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;
use std::sync::Mutex;
use totals::Totals;

/// The prefix of every metric name, as vLLM's `vllm:`.
const PREFIX: &str = "internvl:";

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
    vision_encode: Totals,
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
                "Histogram of time to decode and preprocess one fetched image in seconds.",
                IMAGE_SECONDS_BUCKETS,
            ),
            vision_encode: register(
                &registry,
                Totals::new(
                    format!("{PREFIX}vision_encode_seconds"),
                    "Vision encoder time in seconds (_sum) and images encoded (_count); the \
                     encoder runs images in batches, so there is no per-image distribution.",
                ),
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
