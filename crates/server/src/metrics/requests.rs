//! What the HTTP layer observes: each finished completion with the timings the engine
//! measured for it, each image's preprocessing, each response and each refused connection.

use super::Metrics;
use internvl_scheduler::{FinishReason, RequestTimings, Usage};
use std::time::Duration;

impl Metrics {
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

    /// Records the preprocessing time of one fetched image (decode, resize, normalise).
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
}
