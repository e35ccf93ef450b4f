//! `internvl generate`: one prompt about one image, answered on stdout, timed on stderr.

use crate::device::{demo_model_dir, parse_device, parse_dtype};
use anyhow::{bail, Context};
use candle_core::Tensor;
use internvl_model::preprocess::preprocess;
use internvl_model::prompt::{ChatMessage, Part, Role};
use internvl_model::{LoadedModel, PagedKvCache, SequenceSlice};
use internvl_scheduler::{Sampler, SamplingParams};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BLOCK_SIZE: usize = 16;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory; the bundled demo checkpoint (random weights) when omitted.
    #[arg(long)]
    model: Option<PathBuf>,
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
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            eprintln!(
                "note: no --model given, using the bundled demo checkpoint {} \
                 (random weights: the answer is meaningless)",
                demo_model_dir().display()
            );
            demo_model_dir()
        }
    };
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    })?;

    let start = Instant::now();
    let loaded = LoadedModel::load(&dir, &device, dtype)
        .with_context(|| format!("loading {}", dir.display()))?;
    let load_time = start.elapsed();

    let start = Instant::now();
    let pixels = args
        .image
        .iter()
        .map(|path| {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            preprocess(&bytes, &loaded.preprocess)
                .with_context(|| format!("decoding {}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let preprocess_time = start.elapsed();

    let mut parts = vec![Part::Image; pixels.len()];
    parts.push(Part::Text(args.prompt.clone()));
    let prompt = loaded.encode_prompt(&[ChatMessage {
        role: Role::User,
        parts,
    }])?;
    let model = &loaded.model;
    let max_len = model.config().llm.max_position_embeddings;
    let total = prompt.ids.len() + args.max_tokens;
    if total > max_len {
        bail!(
            "prompt ({} tokens) + max tokens ({}) exceeds the model's {max_len} positions",
            prompt.ids.len(),
            args.max_tokens
        );
    }

    let start = Instant::now();
    let image_embeds = if pixels.is_empty() {
        None
    } else {
        let embeds = model.encode_images(&loaded.pixel_tensor(&pixels)?)?;
        Some(embeds.flatten_to(1)?)
    };
    let vision_time = start.elapsed();

    let mut cache = model.new_kv_cache(total.div_ceil(BLOCK_SIZE), BLOCK_SIZE)?;
    let block_table: Vec<u32> = (0..cache.num_blocks() as u32).collect();
    let step = |ids: &[u32],
                start: usize,
                images: Option<&Tensor>,
                cache: &mut PagedKvCache|
     -> anyhow::Result<Vec<f32>> {
        let embeddings = model.embed(ids, images)?;
        let slice = SequenceSlice {
            start,
            len: ids.len(),
            block_table: block_table.clone(),
            wants_logits: true,
        };
        let logits = model.forward(&embeddings, &[slice], cache)?;
        Ok(logits.squeeze(0)?.to_vec1()?)
    };

    let start = Instant::now();
    let mut logits = step(&prompt.ids, 0, image_embeds.as_ref(), &mut cache)?;
    let prefill_time = start.elapsed();

    let eos = loaded.tokenizer.eos_id();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    loop {
        let token = sampler.sample(&logits)?;
        if token == eos && !args.ignore_eos {
            break;
        }
        generated.push(token);
        let text = loaded.tokenizer.decode(&generated, true);
        // Hold back an incomplete UTF-8 character until its last byte arrives.
        if !text.ends_with('\u{fffd}') && text.starts_with(&printed) {
            write!(stdout, "{}", &text[printed.len()..])?;
            stdout.flush()?;
            printed = text;
        }
        if generated.len() == args.max_tokens {
            break;
        }
        let position = prompt.ids.len() + generated.len() - 1;
        logits = step(&[token], position, None, &mut cache)?;
    }
    let decode_time = start.elapsed();
    let text = loaded.tokenizer.decode(&generated, true);
    if let Some(rest) = text.strip_prefix(printed.as_str()) {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;

    let decode_steps = generated.len().saturating_sub(1).max(1);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "load {:.0} ms | preprocess {:.1} ms ({} images) | vision {:.1} ms | prefill {:.1} ms \
         ({} tokens) | decode {} tokens in {:.1} ms ({:.1} tok/s)",
        ms(load_time),
        ms(preprocess_time),
        pixels.len(),
        ms(vision_time),
        ms(prefill_time),
        prompt.ids.len(),
        generated.len(),
        ms(decode_time),
        decode_steps as f64 / decode_time.as_secs_f64().max(1e-9),
    );
    Ok(())
}
