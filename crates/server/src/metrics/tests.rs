//! The metrics as Prometheus reads them: each input's effect on the rendered text, the
//! names, types and labels, and promtool's verdict.

use super::*;
use internvl_scheduler::{RequestTimings, Usage};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

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
    // Three images in 300 ms, and no per-image distribution made up from them.
    assert_eq!(scalar(&text, "vision_encode_seconds_count"), 3.0);
    assert!((scalar(&text, "vision_encode_seconds_sum") - 0.3).abs() < 1e-9);
    assert!(!text.contains("vision_encode_seconds_bucket"));

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
    // One more image, in 500 ms.
    assert_eq!(scalar(&text, "vision_encode_seconds_count"), 4.0);
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
        ("vision_encode_seconds", "summary"),
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
            // Only a histogram's or a summary's series have names other than their family's.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| sample.name.strip_suffix(suffix));
            let kind = family.and_then(|f| types.get(f)).map(String::as_str);
            let suffixed = if sample.name.ends_with("_bucket") {
                &["histogram"][..]
            } else {
                &["histogram", "summary"][..]
            };
            assert!(
                kind.is_some_and(|kind| suffixed.contains(&kind)),
                "undeclared {}",
                sample.name
            );
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
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
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
