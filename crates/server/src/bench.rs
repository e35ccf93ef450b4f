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
//!    ignored — on a fresh engine whose KV cache is sized for that level.
//!
//! A failed phase (out of memory at a level, say) is reported and the next one runs; the
//! command then exits non-zero. `--json PATH` writes everything measured, rewritten after each
//! phase so a run stopped part-way leaves what it had. Definitions are in [`DEFINITIONS`].

use anyhow::{bail, Context};
use candle_core::Device;
use internvl_model::loader::pixel_batch;
use internvl_model::preprocess::{preprocess, PixelValues};
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_model::{EncodedPrompt, LoadedModel};
use internvl_scheduler::{
    Engine, EngineConfig, Event, ImageInput, Request, SamplingParams, StopParams,
};
use internvl_server::device::{demo_model_dir, parse_device, parse_dtype};
use internvl_server::loading::load_model;
use internvl_server::runner::{CandleRunner, TokenizerDecoder};
use serde_json::{json, Value};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The question when no `--prompt-tokens` is given (311 prompt tokens with the demo tokenizer).
const QUESTION: &str = "Please describe this picture in detail: the objects, their colours, \
                        where they are, and what might happen next.";

/// Words a question of a requested size is cut from (repeated as needed).
const FILLER: &str = "Please describe this picture in detail: the objects, their colours and \
                      shapes, where they are, what they are doing, and what might happen next. \
                      Mention any text you can read, the lighting, the background, the mood of \
                      the scene and anything that looks unusual or out of place.";

/// What each reported number means; also written to the JSON.
const DEFINITIONS: [(&str, &str); 5] = [
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
        "gpu_memory",
        "device memory in use (total minus free, cuMemGetInfo: this process and any other, CUDA \
         context included), sampled every 20 ms; peak = the highest sample",
    ),
];

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Checkpoint directory; the bundled demo checkpoint when omitted. With --random-weights,
    /// only its tokenizer is used.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Random weights for the model this config.json (InternVLChatConfig format) describes,
    /// e.g. config/models/internvl-chat-chinese-v1.1.json, instead of a checkpoint's.
    #[arg(long, value_name = "CONFIG_JSON")]
    random_weights: Option<PathBuf>,
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
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let memory = MemorySampler::start(&device);
    let dir = args.model.clone().unwrap_or_else(demo_model_dir);
    let load_started = Instant::now();
    let loaded = load_model(
        &dir,
        args.random_weights.as_deref(),
        &device,
        parse_dtype(&args.dtype)?,
        None,
    )?;
    let load_s = load_started.elapsed().as_secs_f64();
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
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            Ok((h.finish(), Arc::new(pixels)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if images.is_empty() {
        bail!("no images");
    }
    let prompt = chat_prompt(&loaded, args.prompt_tokens)?;
    let tokens_per_image = loaded.model.config().num_image_tokens();
    eprintln!(
        "model {} | {} {:?} | loaded in {load_s:.1} s | {} prompt tokens ({} image tokens) | \
         {} generated tokens | caching {}",
        match &args.random_weights {
            Some(config) => format!("{} (random weights)", config.display()),
            None => dir.display().to_string(),
        },
        args.device,
        loaded.model.dtype(),
        prompt.ids.len(),
        tokens_per_image,
        args.max_tokens,
        args.caching
    );

    let mut bench = Bench {
        args: &args,
        loaded: &loaded,
        images,
        next_hash: 0,
        memory,
        report: json!({
            "engine": "internvl",
            "version": concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("INTERNVL_GIT_COMMIT"), ")"),
            "model": dir.display().to_string(),
            "random_weights": args.random_weights.as_ref().map(|p| p.display().to_string()),
            "device": args.device,
            "dtype": format!("{:?}", loaded.model.dtype()).to_lowercase(),
            "image_tokens": tokens_per_image,
            "load_s": round(load_s, 3),
            "caching": args.caching,
            "block_size": args.block_size,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "definitions": DEFINITIONS.iter().map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
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
            "| concurrency | decode tok/s (all decoding) | aggregate tok/s | TTFT p50 (ms) | \
             TTFT p99 (ms) | wall (s) | peak GPU MiB |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
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

/// One chat's events as the client saw them.
struct ChatTrace {
    submitted: Instant,
    /// Arrival time of each generated token.
    tokens: Vec<Instant>,
    /// The engine's gaps between consecutive tokens.
    inter_token: Vec<Duration>,
    preemptions: usize,
}

struct Bench<'a> {
    args: &'a BenchArgs,
    loaded: &'a LoadedModel,
    /// Content hash and pixels of each image.
    images: Vec<(u64, Arc<PixelValues>)>,
    /// Distinct content hashes for chats while caching is off.
    next_hash: u64,
    memory: Option<MemorySampler>,
    report: Value,
}

impl Bench<'_> {
    fn write_json(&mut self) -> anyhow::Result<()> {
        if let Some(m) = &self.memory {
            self.report["gpu_memory"]["peak_used_mib"] = json!(mib(m.overall_peak()));
        }
        if let Some(path) = &self.args.json {
            let text = serde_json::to_string_pretty(&self.report)?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    fn device(&self) -> &Device {
        self.loaded.model.device()
    }

    /// An engine whose KV cache holds `seqs` chats of `per_seq` tokens.
    fn engine(&self, seqs: usize, per_seq: usize) -> anyhow::Result<Engine<PixelValues>> {
        let max_len = self.loaded.model.config().llm.max_position_embeddings;
        if per_seq > max_len {
            bail!("prompt + max tokens = {per_seq} exceeds the model's {max_len} positions");
        }
        let block_size = self.args.block_size;
        let num_blocks = seqs * per_seq.div_ceil(block_size) + 1;
        let mut config = EngineConfig::new(num_blocks, block_size, max_len);
        config.max_num_batched_tokens = self.args.max_num_batched_tokens;
        config.enable_prefix_caching = self.args.caching;
        if !self.args.caching {
            config.encoder_cache_bytes = 0;
        }
        let runner = CandleRunner::new(self.loaded.model.clone(), num_blocks, block_size)
            .context("allocating the KV cache")?;
        let decoder = Arc::new(TokenizerDecoder(self.loaded.tokenizer.clone()));
        Engine::start(runner, config, decoder).map_err(anyhow::Error::msg)
    }

    /// Submits `count` chats at once and waits for all of them.
    fn chats(
        &mut self,
        engine: &Engine<PixelValues>,
        prompt: &EncodedPrompt,
        count: usize,
        max_tokens: usize,
    ) -> anyhow::Result<Vec<ChatTrace>> {
        let tokens_per_image = self.loaded.model.config().num_image_tokens();
        let mut streams = Vec::with_capacity(count);
        for i in 0..count {
            let (hash, pixels) = &self.images[i % self.images.len()];
            self.next_hash += 1;
            let content_hash = if self.args.caching {
                *hash
            } else {
                self.next_hash
            };
            let submitted = Instant::now();
            let stream = engine.submit(Request {
                prompt: prompt.ids.clone(),
                images: vec![ImageInput {
                    offset: prompt.image_offsets[0],
                    num_tokens: tokens_per_image,
                    content_hash,
                    pixels: pixels.clone(),
                }],
                sampling: SamplingParams::default(),
                stop: StopParams {
                    max_tokens,
                    eos_token_id: Some(self.loaded.tokenizer.eos_id()),
                    ignore_eos: true,
                    ..StopParams::default()
                },
                skip_special_tokens: true,
                n: 1,
            })?;
            streams.push((submitted, stream));
        }
        let waiters: Vec<_> = streams
            .into_iter()
            .map(|(submitted, mut stream)| {
                std::thread::spawn(move || -> anyhow::Result<ChatTrace> {
                    let mut tokens = Vec::with_capacity(max_tokens);
                    while let Some(event) = stream.next_blocking() {
                        match event {
                            Event::Token { .. } => tokens.push(Instant::now()),
                            Event::Finished { timings, .. } => {
                                return Ok(ChatTrace {
                                    submitted,
                                    tokens,
                                    inter_token: timings.inter_token,
                                    preemptions: timings.preemptions,
                                })
                            }
                            Event::Error { message } => bail!(message),
                        }
                    }
                    bail!("the engine stopped")
                })
            })
            .collect();
        let mut traces = Vec::with_capacity(count);
        for waiter in waiters {
            traces.push(
                waiter
                    .join()
                    .map_err(|_| anyhow::anyhow!("waiter panicked"))??,
            );
        }
        for t in &traces {
            if t.tokens.len() != max_tokens {
                bail!("a chat got {} tokens, not {max_tokens}", t.tokens.len());
            }
        }
        Ok(traces)
    }

    fn warm_up(&mut self, prompt: &EncodedPrompt) -> anyhow::Result<()> {
        let (chats, tokens) = (2, 4);
        let engine = self.engine(chats, prompt.ids.len() + tokens)?;
        self.chats(&engine, prompt, chats, tokens)?;
        self.device().synchronize()?;
        Ok(())
    }

    fn vit(&mut self, batch: usize) -> anyhow::Result<Value> {
        if batch == 0 || self.args.vit_runs == 0 {
            bail!("batch size and runs must be positive");
        }
        if let Some(m) = &self.memory {
            m.reset_peak();
        }
        let model = self.loaded.model.clone();
        let pixels: Vec<&PixelValues> = (0..batch)
            .map(|i| self.images[i % self.images.len()].1.as_ref())
            .collect();
        let input = pixel_batch(&pixels, model.device())?;
        let device = model.device();
        model.encode_images(&input)?; // untimed: first use of this batch shape
        device.synchronize()?;
        let mut times = Vec::with_capacity(self.args.vit_runs);
        for _ in 0..self.args.vit_runs {
            let started = Instant::now();
            let out = model.encode_images(&input)?;
            device.synchronize()?;
            times.push(started.elapsed().as_secs_f64());
            drop(out);
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        times.sort_by(f64::total_cmp);
        let p50 = percentile(&times, 0.5);
        println!(
            "| {batch} | {:.1} | {:.1} | {} |",
            p50 * 1e3,
            p50 * 1e3 / batch as f64,
            times.len()
        );
        Ok(json!({
            "batch": batch,
            "runs": times.len(),
            "ms_per_batch_p50": round(p50 * 1e3, 3),
            "ms_per_batch_mean": round(mean * 1e3, 3),
            "ms_per_batch_min": round(times[0] * 1e3, 3),
            "ms_per_image": round(p50 * 1e3 / batch as f64, 3),
            "peak_gpu_used_mib": self.memory.as_ref().map(|m| mib(m.peak())),
        }))
    }

    fn ttft(&mut self) -> anyhow::Result<Value> {
        let prompt = chat_prompt(
            self.loaded,
            self.args.ttft_prompt_tokens.or(self.args.prompt_tokens),
        )?;
        if let Some(m) = &self.memory {
            m.reset_peak();
        }
        let engine = self.engine(1, prompt.ids.len() + 1)?;
        let mut ttfts = Vec::with_capacity(self.args.ttft_runs);
        for _ in 0..self.args.ttft_runs {
            let trace = self.chats(&engine, &prompt, 1, 1)?.remove(0);
            ttfts.push((trace.tokens[0] - trace.submitted).as_secs_f64());
        }
        let stats = engine.stats();
        drop(engine);
        let mean = ttfts.iter().sum::<f64>() / ttfts.len() as f64;
        ttfts.sort_by(f64::total_cmp);
        let text_tokens = prompt.ids.len() - self.loaded.model.config().num_image_tokens();
        println!(
            "TTFT, one chat alone (1 image + {text_tokens} text tokens = {} prompt tokens): \
             p50 {:.1} ms, min {:.1} ms, max {:.1} ms over {} runs (vision encoder {:.1} ms per image)",
            prompt.ids.len(),
            percentile(&ttfts, 0.5) * 1e3,
            ttfts[0] * 1e3,
            ttfts[ttfts.len() - 1] * 1e3,
            ttfts.len(),
            stats.encode_time.as_secs_f64() * 1e3 / stats.images_encoded.max(1) as f64,
        );
        Ok(json!({
            "runs": ttfts.len(),
            "prompt_tokens": prompt.ids.len(),
            "text_tokens": text_tokens,
            "p50_ms": round(percentile(&ttfts, 0.5) * 1e3, 3),
            "mean_ms": round(mean * 1e3, 3),
            "min_ms": round(ttfts[0] * 1e3, 3),
            "max_ms": round(ttfts[ttfts.len() - 1] * 1e3, 3),
            "vision_ms_per_image": round(
                stats.encode_time.as_secs_f64() * 1e3 / stats.images_encoded.max(1) as f64, 3),
            "peak_gpu_used_mib": self.memory.as_ref().map(|m| mib(m.peak())),
        }))
    }

    fn level(&mut self, prompt: &EncodedPrompt, concurrency: usize) -> anyhow::Result<Value> {
        let max_tokens = self.args.max_tokens;
        if let Some(m) = &self.memory {
            m.reset_peak();
        }
        let engine = self.engine(concurrency, prompt.ids.len() + max_tokens)?;
        let started = Instant::now();
        let traces = self.chats(&engine, prompt, concurrency, max_tokens)?;
        let stats = engine.stats();
        drop(engine);
        let end = traces
            .iter()
            .filter_map(|t| t.tokens.last())
            .max()
            .copied()
            .unwrap_or(started);
        let wall = (end - started).as_secs_f64();
        let since = |t: Instant| (t - started).as_secs_f64();
        let token_times: Vec<Vec<f64>> = traces
            .iter()
            .map(|t| t.tokens.iter().map(|&x| since(x)).collect())
            .collect();
        let window = decode_window(&token_times);
        let mut ttfts: Vec<f64> = traces
            .iter()
            .map(|t| (t.tokens[0] - t.submitted).as_secs_f64())
            .collect();
        ttfts.sort_by(f64::total_cmp);
        let mut itl: Vec<f64> = traces
            .iter()
            .flat_map(|t| t.inter_token.iter().map(Duration::as_secs_f64))
            .collect();
        itl.sort_by(f64::total_cmp);
        let total = concurrency * max_tokens;
        let aggregate = total as f64 / wall;
        let decode = window.as_ref().map(|w| w.tokens as f64 / (w.end - w.start));
        let peak = self.memory.as_ref().map(|m| m.peak());
        let show = |v: Option<f64>, digits: usize| match v {
            Some(v) => format!("{v:.digits$}"),
            None => "-".into(),
        };
        println!(
            "| {concurrency} | {} | {aggregate:.1} | {:.0} | {:.0} | {wall:.1} | {} |",
            show(decode, 1),
            percentile(&ttfts, 0.5) * 1e3,
            percentile(&ttfts, 0.99) * 1e3,
            peak.map_or("-".into(), |p| mib(p).to_string()),
        );
        eprintln!(
            "  concurrency {concurrency}: {} steps, {} preemptions | vision {:.2} s ({} images), \
             LLM forward {:.2} s, sampling {:.2} s",
            stats.steps,
            stats.preemptions,
            stats.encode_time.as_secs_f64(),
            stats.images_encoded,
            stats.forward_time.as_secs_f64(),
            stats.sample_time.as_secs_f64()
        );
        Ok(json!({
            "concurrency": concurrency,
            "prompt_tokens": prompt.ids.len(),
            "text_tokens": prompt.ids.len() - self.loaded.model.config().num_image_tokens(),
            "max_tokens": max_tokens,
            "output_tokens": total,
            "wall_s": round(wall, 3),
            "aggregate_tok_s": round(aggregate, 2),
            "decode_tok_s": decode.map(|d| round(d, 2)),
            "decode_window_s": window.as_ref().map(|w| round(w.end - w.start, 3)),
            "decode_window_tokens": window.as_ref().map(|w| w.tokens),
            "decode_window_mean_context": window
                .as_ref()
                .map(|w| round(prompt.ids.len() as f64 + w.mean_generated, 1)),
            "ttft_p50_ms": round(percentile(&ttfts, 0.5) * 1e3, 3),
            "ttft_p99_ms": round(percentile(&ttfts, 0.99) * 1e3, 3),
            "itl_p50_ms": (!itl.is_empty()).then(|| round(percentile(&itl, 0.5) * 1e3, 3)),
            "itl_p99_ms": (!itl.is_empty()).then(|| round(percentile(&itl, 0.99) * 1e3, 3)),
            "preemptions": traces.iter().map(|t| t.preemptions).sum::<usize>(),
            "engine_steps": stats.steps,
            "vision_s": round(stats.encode_time.as_secs_f64(), 3),
            "images_encoded": stats.images_encoded,
            "llm_forward_s": round(stats.forward_time.as_secs_f64(), 3),
            "peak_gpu_used_mib": peak.map(mib),
        }))
    }
}

/// The prompt of one chat: one image and a question, sized to `text_tokens` text tokens (all
/// but the visual ones) when given.
fn chat_prompt(loaded: &LoadedModel, text_tokens: Option<usize>) -> anyhow::Result<EncodedPrompt> {
    let encode = |question: &str| {
        loaded.encode_prompt(&[ChatMessage {
            role: Role::User,
            parts: vec![Part::Image, Part::Text(question.into())],
        }])
    };
    let Some(target) = text_tokens else {
        return Ok(encode(QUESTION)?);
    };
    let visual = loaded.model.config().num_image_tokens();
    let text_len = |q: &str| -> anyhow::Result<usize> { Ok(encode(q)?.ids.len() - visual) };
    // Every word adds at least one token: no more than `target` words are ever needed.
    let words: Vec<&str> = FILLER
        .split_whitespace()
        .cycle()
        .take(target.max(1))
        .collect();
    let question = |k: usize| words[..k].join(" ");
    if text_len(&question(1))? > target {
        bail!(
            "--prompt-tokens {target} is below the template's minimum ({} with a one-word question)",
            text_len(&question(1))?
        );
    }
    // The most words that fit (the count grows with the words).
    let (mut lo, mut hi) = (1, words.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if text_len(&question(mid))? <= target {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    // Then single-token additions while they fit.
    let mut q = question(lo);
    let mut len = text_len(&q)?;
    'grow: while len < target {
        for piece in [" a", ".", " I"] {
            let candidate = format!("{q}{piece}");
            let n = text_len(&candidate)?;
            if n > len && n <= target {
                q = candidate;
                len = n;
                continue 'grow;
            }
        }
        break;
    }
    Ok(encode(&q)?)
}

/// The window of a level in which every chat was decoding, from each chat's token arrival
/// times (seconds, any common origin).
#[derive(Debug, PartialEq)]
struct DecodeWindow {
    /// The last chat's first token.
    start: f64,
    /// The first finished chat's last token.
    end: f64,
    /// Tokens that arrived in (start, end].
    tokens: usize,
    /// Mean number of tokens a chat had generated before each counted token.
    mean_generated: f64,
}

fn decode_window(token_times: &[Vec<f64>]) -> Option<DecodeWindow> {
    let start = token_times
        .iter()
        .map(|t| t.first().copied())
        .try_fold(f64::NEG_INFINITY, |acc, t| t.map(|t| acc.max(t)))?;
    let end = token_times
        .iter()
        .map(|t| t.last().copied())
        .try_fold(f64::INFINITY, |acc, t| t.map(|t| acc.min(t)))?;
    if end <= start {
        return None;
    }
    let (mut tokens, mut generated) = (0, 0);
    for times in token_times {
        for (k, &t) in times.iter().enumerate() {
            if t > start && t <= end {
                tokens += 1;
                generated += k;
            }
        }
    }
    (tokens > 0).then(|| DecodeWindow {
        start,
        end,
        tokens,
        mean_generated: generated as f64 / tokens as f64,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

fn mib(bytes: usize) -> usize {
    bytes >> 20
}

fn push(array: &mut Value, item: Value) {
    if let Value::Array(items) = array {
        items.push(item);
    }
}

/// Device memory in use, sampled on a thread every 20 ms (CUDA only).
struct MemorySampler {
    total: usize,
    /// In use when sampling started.
    baseline: usize,
    /// Highest sample since the last `reset_peak`, and overall.
    peak: Arc<AtomicUsize>,
    overall: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    device: Device,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// (free, total) bytes of the device's memory; `None` on the CPU.
fn memory_info(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return cuda.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

impl MemorySampler {
    fn start(device: &Device) -> Option<Self> {
        let (free, total) = memory_info(device)?;
        let used = total - free;
        let peak = Arc::new(AtomicUsize::new(used));
        let overall = Arc::new(AtomicUsize::new(used));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, overall, stop, device) =
                (peak.clone(), overall.clone(), stop.clone(), device.clone());
            std::thread::Builder::new()
                .name("memory-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Some((free, total)) = memory_info(&device) {
                            peak.fetch_max(total - free, Ordering::Relaxed);
                            overall.fetch_max(total - free, Ordering::Relaxed);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .ok()
        };
        Some(Self {
            total,
            baseline: used,
            peak,
            overall,
            stop,
            device: device.clone(),
            thread,
        })
    }

    fn used_now(&self) -> usize {
        memory_info(&self.device).map_or(0, |(free, total)| total - free)
    }

    fn reset_peak(&self) {
        self.peak.store(self.used_now(), Ordering::Relaxed);
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed).max(self.used_now())
    }

    fn overall_peak(&self) -> usize {
        self.overall.load(Ordering::Relaxed).max(self.used_now())
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn default_images() -> anyhow::Result<Vec<PathBuf>> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images"
    ));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "png" || e == "jpg"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_window_counts_tokens_while_all_chats_decode() {
        // Chat 0 starts at 1 s, one token per second, 6 tokens (last at 6 s); chat 1 starts
        // at 3 s and ends at 8 s. Both decode in (3, 6]: chat 0's tokens at 4, 5, 6 and
        // chat 1's at 4, 5, 6.
        let times = vec![
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        ];
        let w = decode_window(&times).unwrap();
        assert_eq!((w.start, w.end, w.tokens), (3.0, 6.0, 6));
        // chat 0's tokens 3..=5 (3, 4, 5 generated before), chat 1's 1..=3
        assert_eq!(w.mean_generated, (3 + 4 + 5 + 1 + 2 + 3) as f64 / 6.0);
    }

    #[test]
    fn decode_window_of_one_chat_is_its_decode_rate() {
        let w = decode_window(&[vec![0.5, 0.6, 0.7, 0.8]]).unwrap();
        assert_eq!(w.tokens, 3);
        assert!((w.tokens as f64 / (w.end - w.start) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn no_window_when_a_chat_ends_before_another_starts() {
        assert_eq!(decode_window(&[vec![1.0, 2.0], vec![3.0, 4.0]]), None);
        assert_eq!(decode_window(&[vec![1.0]]), None);
        assert_eq!(decode_window(&[vec![1.0, 2.0], vec![]]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
