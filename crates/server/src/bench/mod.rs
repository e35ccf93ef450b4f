//! `internvl bench`: decode rate, throughput and time to first token of concurrent image chats,
//! time to first token of a single chat, and the vision encoder alone.
//!
//! Phases, in this order:
//! 1. warm-up (unless `--no-warmup`): two chats of four tokens, so the device's kernels are
//!    loaded and its libraries initialised before any clock starts;
//! 2. `--vit-batch 1,8`: the vision encoder (InternViT + pixel shuffle + projector) alone on a
//!    batch of B images already on the device: one untimed run, then `--vit-runs` timed ones,
//!    the device synchronised before each clock stops (CUDA runs asynchronously);
//! 3. `--ttft-runs N`: N single chats one after another (one image, `--ttft-prompt-tokens`
//!    text tokens, one generated token): the time to first token of a chat alone;
//! 4. each `--concurrency` level: that many chats submitted at once — one image, a question
//!    sized to `--prompt-tokens`, `--max-tokens` generated tokens with end-of-sequence
//!    ignored — on a fresh engine whose KV cache is sized for that level. With
//!    `--json-schema FILE`, every chat of every phase is held to that schema (structured
//!    outputs): a chat then ends early when its JSON completes, and each level reports the
//!    grammar masks' time per token (p50, p99).
//!
//! A failed phase (out of memory at a level, say) is reported and the next one runs; the
//! command then exits non-zero. `--json PATH` writes everything measured, rewritten after each
//! phase so a run stopped part-way leaves what it had. Definitions are in [`DEFINITIONS`].

mod gpu_memory;
mod phases;
mod prompt;
mod stats;

use crate::model_args::ModelArgs;
use anyhow::{bail, Context};
use gpu_memory::MemorySampler;
use internvl_model::preprocess::preprocess;
use internvl_scheduler::GrammarSpec;
use internvl_server::host_memory::peak_rss;
use internvl_server::service::grammar;
use internvl_server::service::model::Progress;
use internvl_server::service::request::PreparedImage;
use internvl_server::settings::defaults;
use phases::Bench;
use prompt::{chat_prompt, default_images};
use serde_json::json;
use stats::{mib, push, round};
use std::path::PathBuf;
use std::time::Instant;

/// What each reported number means; also written to the JSON.
const DEFINITIONS: [(&str, &str); 8] = [
    (
        "decode_tok_s",
        "steady-state decode rate of a level: tokens emitted while every chat of the level was \
         decoding — after the moment the last chat got its first token, up to the moment the \
         first chat got its last token — divided by that time",
    ),
    (
        "aggregate_tok_s",
        "all generated tokens of a level divided by the wall time from the first submission to \
         the last token (vision encoder and prefill included)",
    ),
    (
        "aggregate_vs_single_stream",
        "a level's aggregate tok/s divided by that of the single-chat level of the same run \
         (levels measured before it have none)",
    ),
    (
        "ttft",
        "time to first token: submission to the first generated token's arrival at the client \
         (vision encoder, prefill and the first sampling step, plus any queueing behind the \
         other chats of the level); image decoding and resizing are done beforehand and not \
         included",
    ),
    (
        "vit_ms_per_image",
        "vision encoder (ViT + pixel shuffle + projector) on a batch of B preprocessed images \
         already on the device, median over the timed runs of the batch time, divided by B",
    ),
    (
        "grammar_mask_us",
        "with --json-schema: the time llguidance took to compute one constrained token's mask \
         of allowed tokens, p50 and p99 over the level's tokens (upper bounds of histogram \
         buckets about 19 % wide); a step's masks are computed on other threads while its \
         forward runs",
    ),
    (
        "host_memory",
        "the process's peak resident set (Linux VmHWM) at the end of loading and over the whole \
         run",
    ),
    (
        "gpu_memory",
        "device memory in use (total minus free, cuMemGetInfo: this process and any other, CUDA \
         context included), sampled every 20 ms; peak = the highest sample",
    ),
];

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images, used in turn by the chats; the repository's fixture images when omitted.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Concurrency levels to measure (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Tokens generated per chat.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Text tokens of each chat's prompt: every prompt token but the image's visual ones (BOS,
    /// template, image delimiters and the question, whose length is chosen to match as
    /// closely as the tokenizer allows). Default: a fixed 20-word question (55 text tokens with
    /// the demo tokenizer).
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Single chats timed one after another for the time to first token (0: none).
    #[arg(long, default_value_t = 0)]
    ttft_runs: usize,
    /// Text tokens of the prompt of those single chats (default: --prompt-tokens).
    #[arg(long)]
    ttft_prompt_tokens: Option<usize>,
    /// Time the vision encoder alone at these batch sizes (e.g. 1,8).
    #[arg(long, value_delimiter = ',')]
    vit_batch: Vec<usize>,
    /// Timed runs per vision-encoder batch size.
    #[arg(long, default_value_t = 5)]
    vit_runs: usize,
    /// Skip the warm-up chats.
    #[arg(long)]
    no_warmup: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Let repeated images and prompts hit the encoder and prefix caches (off: every chat's
    /// image counts as new, so the vision encoder runs for each).
    #[arg(long)]
    caching: bool,
    /// Hold every chat to this JSON schema, as `response_format` json_schema does: the cost of
    /// structured outputs. A chat then ends when its JSON is complete, possibly before
    /// --max-tokens; throughput counts the tokens generated.
    #[arg(long)]
    json_schema: Option<PathBuf>,
    #[arg(long, default_value_t = defaults::BLOCK_SIZE)]
    block_size: usize,
    #[arg(long, default_value_t = defaults::MAX_NUM_BATCHED_TOKENS)]
    max_num_batched_tokens: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let source = args.model.source()?;
    let memory = MemorySampler::start(&source.device);
    let dir = args.model.dir();
    let load_started = Instant::now();
    let loaded = source.load(Progress::Quiet)?;
    let load_s = load_started.elapsed().as_secs_f64();
    let load_peak_rss = peak_rss();
    let image_files = if args.image.is_empty() {
        default_images()?
    } else {
        args.image.clone()
    };
    let images = image_files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let pixels = preprocess(&bytes, &loaded.preprocess)
                .with_context(|| format!("decoding {}", f.display()))?;
            Ok(PreparedImage::new(&bytes, pixels))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if images.is_empty() {
        bail!("no images");
    }
    let grammar = match &args.json_schema {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let schema = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            let compiler =
                grammar::compiler(&loaded.tokenizer, loaded.model.config().llm.vocab_size)?;
            let compiled = compiler
                .compile(&GrammarSpec::JsonSchema(schema))
                .with_context(|| format!("compiling {}", path.display()))?;
            Some(compiled)
        }
    };
    let prompt = chat_prompt(&loaded, args.prompt_tokens)?;
    let tokens_per_image = loaded.model.config().num_image_tokens();
    eprintln!(
        "model {} | {} {:?} | loaded in {load_s:.1} s | {} prompt tokens ({} image tokens) | \
         {} generated tokens | caching {} | json schema {}",
        match &args.model.random_weights {
            Some(config) => format!("{} (random weights)", config.display()),
            None => dir.display().to_string(),
        },
        args.model.device,
        loaded.model.dtype(),
        prompt.ids.len(),
        tokens_per_image,
        args.max_tokens,
        args.caching,
        args.json_schema
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
    );

    let mut bench = Bench {
        args: &args,
        loaded: &loaded,
        images,
        grammar,
        next_hash: 0,
        memory,
        single_stream: None,
        report: json!({
            "engine": "internvl",
            "version": concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("INTERNVL_GIT_COMMIT"), ")"),
            "model": dir.display().to_string(),
            "random_weights": args.model.random_weights.as_ref().map(|p| p.display().to_string()),
            "device": args.model.device,
            "dtype": format!("{:?}", loaded.model.dtype()).to_lowercase(),
            "image_tokens": tokens_per_image,
            "load_s": round(load_s, 3),
            "caching": args.caching,
            "json_schema": args.json_schema.as_ref().map(|p| p.display().to_string()),
            "block_size": args.block_size,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "definitions": DEFINITIONS.iter().map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            "host_memory": {
                "after_load_peak_rss_mib": load_peak_rss.map(|b| mib(b as usize)),
                "peak_rss_mib": null,
            },
            "gpu_memory": null,
            "vit": [],
            "ttft": null,
            "levels": [],
        }),
    };
    if let Some(m) = &bench.memory {
        bench.report["gpu_memory"] = json!({
            "total_mib": mib(m.total),
            "before_load_used_mib": mib(m.baseline),
            "after_load_used_mib": mib(m.used_now()),
            "peak_used_mib": null,
        });
    }
    bench.write_json()?;

    let mut failures = Vec::new();
    if !args.no_warmup {
        let started = Instant::now();
        bench.warm_up(&prompt).context("warm-up")?;
        eprintln!("warm-up: {:.1} s", started.elapsed().as_secs_f64());
    }

    if !args.vit_batch.is_empty() {
        println!("| ViT batch | ms per batch (p50) | ms per image | runs |");
        println!("| ---: | ---: | ---: | ---: |");
    }
    for &batch in &args.vit_batch {
        let result = bench.vit(batch).unwrap_or_else(|e| {
            failures.push(format!("ViT batch {batch}: {e:#}"));
            json!({"batch": batch, "error": format!("{e:#}")})
        });
        push(&mut bench.report["vit"], result);
        bench.write_json()?;
    }

    if args.ttft_runs > 0 {
        let result = bench.ttft().unwrap_or_else(|e| {
            failures.push(format!("TTFT: {e:#}"));
            json!({"error": format!("{e:#}")})
        });
        bench.report["ttft"] = result;
        bench.write_json()?;
    }

    let levels: Vec<usize> = args
        .concurrency
        .iter()
        .copied()
        .filter(|&c| c > 0)
        .collect();
    if !levels.is_empty() {
        println!(
            "| concurrency | decode tok/s (all decoding) | aggregate tok/s | × single stream | \
             TTFT p50 (ms) | TTFT p99 (ms) | wall (s) | peak GPU MiB | mask p50 / p99 (µs) |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    }
    for concurrency in levels {
        let result = bench.level(&prompt, concurrency).unwrap_or_else(|e| {
            failures.push(format!("concurrency {concurrency}: {e:#}"));
            json!({"concurrency": concurrency, "error": format!("{e:#}")})
        });
        push(&mut bench.report["levels"], result);
        bench.write_json()?;
    }

    if let Some(m) = &bench.memory {
        eprintln!(
            "GPU memory: peak {} MiB used of {} MiB (before loading {} MiB)",
            mib(m.overall_peak()),
            mib(m.total),
            mib(m.baseline)
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("{} of the measurements failed", failures.len())
    }
}
