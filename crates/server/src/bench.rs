//! `internvl bench`: aggregate throughput and time to first token of concurrent image chats.
//!
//! Each level submits `concurrency` chats at once — one image, a ~30-token question, a fixed
//! number of generated tokens (end-of-sequence ignored) — and waits for all of them.

use anyhow::{bail, Context};
use internvl_model::preprocess::preprocess;
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_scheduler::{
    Engine, EngineConfig, Event, ImageInput, Request, SamplingParams, StopParams,
};
use internvl_server::device::{demo_model_dir, parse_device, parse_dtype};
use internvl_server::loading::load_model;
use internvl_server::runner::{CandleRunner, TokenizerDecoder};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const QUESTION: &str = "Please describe this picture in detail: the objects, their colours, \
                        where they are, and what might happen next.";

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
    /// Concurrency levels to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Tokens generated per chat.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
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
    let dir = args.model.clone().unwrap_or_else(demo_model_dir);
    let loaded = load_model(
        &dir,
        args.random_weights.as_deref(),
        &device,
        parse_dtype(&args.dtype)?,
        None,
    )?;
    let image_files = if args.image.is_empty() {
        default_images()?
    } else {
        args.image.clone()
    };
    let images = image_files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let pixels = preprocess(&bytes, &loaded.preprocess)?;
            let mut h = DefaultHasher::new();
            bytes.hash(&mut h);
            Ok((h.finish(), Arc::new(pixels)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let prompt = loaded.encode_prompt(&[ChatMessage {
        role: Role::User,
        parts: vec![Part::Image, Part::Text(QUESTION.into())],
    }])?;
    let tokens_per_image = loaded.model.config().num_image_tokens();
    let offset = prompt.image_offsets[0];
    let max_conc = *args
        .concurrency
        .iter()
        .max()
        .context("no concurrency level")?;
    let per_seq = prompt.ids.len() + args.max_tokens;
    let max_len = loaded.model.config().llm.max_position_embeddings;
    if per_seq > max_len {
        bail!("prompt + max tokens = {per_seq} exceeds the model's {max_len} positions");
    }
    let num_blocks = max_conc * per_seq.div_ceil(args.block_size) + 1;
    let mut config = EngineConfig::new(num_blocks, args.block_size, max_len);
    config.max_num_batched_tokens = args.max_num_batched_tokens;
    config.enable_prefix_caching = args.caching;
    if !args.caching {
        config.encoder_cache_bytes = 0;
    }
    let runner = CandleRunner::new(loaded.model.clone(), num_blocks, args.block_size)?;
    let decoder = Arc::new(TokenizerDecoder(loaded.tokenizer.clone()));
    let engine = Engine::start(runner, config, decoder).map_err(anyhow::Error::msg)?;
    eprintln!(
        "model {} | {} prompt tokens ({} image tokens) | {} generated tokens | caching {}",
        dir.display(),
        prompt.ids.len(),
        tokens_per_image,
        args.max_tokens,
        args.caching
    );

    println!("| concurrency | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | wall (s) |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    let mut next_hash = 0u64;
    for &concurrency in &args.concurrency {
        let started = Instant::now();
        let streams = (0..concurrency)
            .map(|i| {
                let (hash, pixels) = &images[i % images.len()];
                next_hash += 1;
                let content_hash = if args.caching { *hash } else { next_hash };
                engine.submit(Request {
                    prompt: prompt.ids.clone(),
                    images: vec![ImageInput {
                        offset,
                        num_tokens: tokens_per_image,
                        content_hash,
                        pixels: pixels.clone(),
                    }],
                    sampling: SamplingParams::default(),
                    stop: StopParams {
                        max_tokens: args.max_tokens,
                        eos_token_id: Some(loaded.tokenizer.eos_id()),
                        ignore_eos: true,
                        ..StopParams::default()
                    },
                    skip_special_tokens: true,
                    n: 1,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let waiters: Vec<_> = streams
            .into_iter()
            .map(|mut stream| {
                std::thread::spawn(move || -> anyhow::Result<(usize, Duration)> {
                    let mut tokens = 0;
                    while let Some(event) = stream.next_blocking() {
                        match event {
                            Event::Token { .. } => tokens += 1,
                            Event::Finished { timings, .. } => {
                                return Ok((tokens, timings.time_to_first_token))
                            }
                            Event::Error { message } => bail!(message),
                        }
                    }
                    bail!("the engine stopped")
                })
            })
            .collect();
        let mut total = 0;
        let mut ttfts = Vec::new();
        for waiter in waiters {
            let (tokens, ttft) = waiter
                .join()
                .map_err(|_| anyhow::anyhow!("waiter panicked"))??;
            total += tokens;
            ttfts.push(ttft);
        }
        let wall = started.elapsed();
        ttfts.sort();
        let pct =
            |p: f64| ttfts[((ttfts.len() as f64 * p).ceil() as usize).clamp(1, ttfts.len()) - 1];
        println!(
            "| {concurrency} | {:.1} | {:.0} | {:.0} | {:.1} |",
            total as f64 / wall.as_secs_f64(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            wall.as_secs_f64()
        );
    }
    let stats = engine.stats();
    eprintln!(
        "engine: {} steps, {} preemptions | time: vision {:.1} s ({} images), LLM forward {:.1} s, \
         sampling + detokenizing {:.1} s",
        stats.steps,
        stats.preemptions,
        stats.encode_time.as_secs_f64(),
        stats.images_encoded,
        stats.forward_time.as_secs_f64(),
        stats.sample_time.as_secs_f64(),
    );
    Ok(())
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
