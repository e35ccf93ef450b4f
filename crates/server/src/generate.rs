//! `internvl generate`: one prompt about images, answered on stdout, timed on stderr.
//!
//! It runs the same engine the server does, with one request.

use crate::model_args::ModelArgs;
use anyhow::{bail, Context};
use internvl_model::preprocess::preprocess;
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_scheduler::{Event, SamplingParams, StopParams, MAX_TOP_LOGPROBS};
use internvl_server::host_memory::peak_rss;
use internvl_server::service::kv_cache::KvCacheSize;
use internvl_server::service::model::Progress;
use internvl_server::service::request::{request, Generation, PreparedImage};
use internvl_server::service::{EngineShape, Service};
use internvl_server::settings::defaults;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bytes in a GiB, for the peak RSS printed with the timings.
const GIB: f64 = (1u64 << 30) as f64;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Image file (PNG, JPEG, WebP, GIF, BMP); may be repeated, or omitted for text only.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// The question.
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; greedy when omitted or 0.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed for sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the end-of-sequence token (fixed-length benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Write each generated token's logprob and the 20 most likely tokens' (JSON, one line
    /// per token: `{"token", "logprob", "top": [[id, logprob], ...]}`) to this file, e.g. to
    /// compare a device's logits with a reference's.
    #[arg(long, value_name = "PATH")]
    logprobs_out: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let source = args.model.source()?;
    if args.model.model.is_none() && args.model.random_weights.is_none() {
        eprintln!(
            "note: no --model given, using the bundled demo checkpoint {} \
             (random weights: the answer is meaningless)",
            args.model.dir().display()
        );
    }

    let start = Instant::now();
    let loaded = source.load(Progress::Quiet)?;
    let load_time = start.elapsed();

    let start = Instant::now();
    let images = args
        .image
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            preprocess(&bytes, &loaded.preprocess)
                .with_context(|| format!("decoding {}", path.display()))
                .map(|p| PreparedImage::new(&bytes, p))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let preprocess_time = start.elapsed();

    let mut parts = vec![Part::Image; images.len()];
    parts.push(Part::Text(args.prompt.clone()));
    let prompt = loaded.encode_prompt(&[ChatMessage {
        role: Role::User,
        parts,
    }])?;
    let max_len = loaded.model.config().llm.max_position_embeddings;
    let total = prompt.ids.len() + args.max_tokens;
    if total > max_len {
        bail!(
            "prompt ({} tokens) + max tokens ({}) exceeds the model's {max_len} positions",
            prompt.ids.len(),
            args.max_tokens
        );
    }
    let shape = EngineShape {
        block_size: defaults::BLOCK_SIZE,
        max_model_len: None,
        kv_cache: KvCacheSize::Sequences {
            count: 1,
            tokens: total,
            spare_blocks: 0,
        },
    };
    let generation = Generation {
        sampling: SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            logprobs: args.logprobs_out.is_some().then_some(MAX_TOP_LOGPROBS),
            ..SamplingParams::default()
        },
        stop: StopParams {
            max_tokens: args.max_tokens,
            eos_token_id: Some(loaded.tokenizer.eos_id()),
            ignore_eos: args.ignore_eos,
            ..StopParams::default()
        },
        n: 1,
        grammar: None,
    };
    let request = request(&loaded, &prompt, images, generation);
    let service = Service::start(loaded, &shape, |config| {
        config.enable_prefix_caching = false;
    })?;
    let engine = &service.engine;
    let mut stream = engine.submit(request)?;

    let mut stdout = std::io::stdout().lock();
    let mut logprobs = String::new();
    let mut generated = 0;
    let timings = loop {
        match stream.next_blocking() {
            Some(Event::Token {
                text,
                id,
                logprob,
                top_logprobs,
                ..
            }) => {
                if args.logprobs_out.is_some() {
                    let line =
                        serde_json::json!({"token": id, "logprob": logprob, "top": top_logprobs});
                    logprobs.push_str(&format!("{line}\n"));
                }
                generated += 1;
                write!(stdout, "{text}")?;
                stdout.flush()?;
            }
            Some(Event::Finished { text, timings, .. }) => {
                writeln!(stdout, "{text}")?;
                break timings;
            }
            Some(Event::Error { message, .. }) => bail!(message),
            None => bail!("the engine stopped"),
        }
    };
    if let Some(path) = &args.logprobs_out {
        std::fs::write(path, logprobs).with_context(|| format!("writing {}", path.display()))?;
    }
    let vision = engine.stats().encode_time;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let decode_steps = generated.max(2) - 1;
    eprintln!(
        "load {:.0} ms | preprocess {:.1} ms ({} images) | vision {:.1} ms | prefill {:.1} ms \
         ({} tokens) | decode {} tokens in {:.1} ms ({:.1} tok/s) | peak RSS {}",
        ms(load_time),
        ms(preprocess_time),
        args.image.len(),
        ms(vision),
        ms(timings.prefill.saturating_sub(vision)),
        prompt.ids.len(),
        generated,
        ms(timings.decode),
        decode_steps as f64 / timings.decode.as_secs_f64().max(1e-9),
        peak_rss().map_or("unknown".into(), |b| format!("{:.2} GiB", b as f64 / GIB)),
    );
    Ok(())
}
