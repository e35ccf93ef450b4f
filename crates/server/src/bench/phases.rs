//! The phases of a benchmark run: warm-up, vision encoder alone, single-chat time to first
//! token, and concurrency levels, each measured into the report.

use super::gpu_memory::MemorySampler;
use super::prompt::chat_prompt;
use super::stats::{decode_window, mib, percentile, round};
use super::BenchArgs;
use anyhow::{bail, Context};
use candle_core::Device;
use internvl_model::loader::pixel_batch;
use internvl_model::preprocess::PixelValues;
use internvl_model::{EncodedPrompt, LoadedModel};
use internvl_scheduler::{
    ContentHash, Engine, EngineConfig, Event, Grammar, SamplingParams, StopParams,
};
use internvl_server::host_memory::peak_rss;
use internvl_server::service::kv_cache::KvCacheSize;
use internvl_server::service::request::{request, Generation, PreparedImage};
use internvl_server::service::{start_engine, EngineShape};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// One chat's events as the client saw them.
struct ChatTrace {
    submitted: Instant,
    /// Arrival time of each generated token.
    tokens: Vec<Instant>,
    /// The engine's gaps between consecutive tokens.
    inter_token: Vec<Duration>,
    preemptions: usize,
}

pub(super) struct Bench<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) loaded: &'a LoadedModel,
    /// The images, used in turn by the chats.
    pub(super) images: Vec<PreparedImage>,
    /// `--json-schema`, compiled: each chat follows a copy.
    pub(super) grammar: Option<Grammar>,
    /// Distinct content hashes for chats while caching is off.
    pub(super) next_hash: u64,
    pub(super) memory: Option<MemorySampler>,
    pub(super) report: Value,
    /// Aggregate tok/s of the single-chat level, once measured: what later levels compare to.
    pub(super) single_stream: Option<f64>,
}

impl Bench<'_> {
    pub(super) fn write_json(&mut self) -> anyhow::Result<()> {
        self.report["host_memory"]["peak_rss_mib"] = json!(peak_rss().map(|b| mib(b as usize)));
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
        let shape = EngineShape {
            block_size: self.args.block_size,
            max_model_len: None,
            kv_cache: KvCacheSize::Sequences {
                count: seqs,
                tokens: per_seq,
                spare_blocks: 1,
            },
        };
        let tune = |config: &mut EngineConfig| {
            config.max_num_batched_tokens = self.args.max_num_batched_tokens;
            config.enable_prefix_caching = self.args.caching;
            if !self.args.caching {
                config.encoder_cache_bytes = 0;
            }
        };
        let (engine, _, _) = start_engine(self.loaded, &shape, tune, |_, runner| runner)?;
        Ok(engine)
    }

    /// Submits `count` chats at once and waits for all of them.
    fn chats(
        &mut self,
        engine: &Engine<PixelValues>,
        prompt: &EncodedPrompt,
        count: usize,
        max_tokens: usize,
    ) -> anyhow::Result<Vec<ChatTrace>> {
        let mut streams = Vec::with_capacity(count);
        for i in 0..count {
            let mut image = self.images[i % self.images.len()].clone();
            self.next_hash += 1;
            if !self.args.caching {
                image.content_hash = ContentHash::of(&self.next_hash.to_le_bytes());
            }
            let generation = Generation {
                sampling: SamplingParams::default(),
                stop: StopParams {
                    max_tokens,
                    eos_token_id: Some(self.loaded.tokenizer.eos_id()),
                    ignore_eos: true,
                    ..StopParams::default()
                },
                n: 1,
                grammar: self.grammar.clone(),
            };
            let submitted = Instant::now();
            let stream = engine.submit(request(self.loaded, prompt, vec![image], generation))?;
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
                            Event::Error { message, .. } => bail!(message),
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
            // Under a schema a chat ends when its JSON does.
            let complete = t.tokens.len() == max_tokens
                || self.grammar.is_some() && (1..max_tokens).contains(&t.tokens.len());
            if !complete {
                bail!("a chat got {} tokens, not {max_tokens}", t.tokens.len());
            }
        }
        Ok(traces)
    }

    pub(super) fn warm_up(&mut self, prompt: &EncodedPrompt) -> anyhow::Result<()> {
        let (chats, tokens) = (2, 4);
        let engine = self.engine(chats, prompt.ids.len() + tokens)?;
        self.chats(&engine, prompt, chats, tokens)?;
        self.device().synchronize()?;
        Ok(())
    }

    pub(super) fn vit(&mut self, batch: usize) -> anyhow::Result<Value> {
        if batch == 0 || self.args.vit_runs == 0 {
            bail!("batch size and runs must be positive");
        }
        if let Some(m) = &self.memory {
            m.reset_peak();
        }
        let model = self.loaded.model.clone();
        let pixels: Vec<&PixelValues> = (0..batch)
            .map(|i| self.images[i % self.images.len()].pixels.as_ref())
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

    pub(super) fn ttft(&mut self) -> anyhow::Result<Value> {
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

    pub(super) fn level(
        &mut self,
        prompt: &EncodedPrompt,
        concurrency: usize,
    ) -> anyhow::Result<Value> {
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
        let total: usize = traces.iter().map(|t| t.tokens.len()).sum();
        let aggregate = total as f64 / wall;
        if concurrency == 1 {
            self.single_stream = Some(aggregate);
        }
        let vs_single = self.single_stream.map(|single| aggregate / single);
        let decode = window.as_ref().map(|w| w.tokens as f64 / (w.end - w.start));
        let peak = self.memory.as_ref().map(|m| m.peak());
        let show = |v: Option<f64>, digits: usize| match v {
            Some(v) => format!("{v:.digits$}"),
            None => "-".into(),
        };
        let masks = &stats.grammar_masks;
        let mask_us = |q: f64| masks.quantile(q).map(|d| d.as_secs_f64() * 1e6);
        println!(
            "| {concurrency} | {} | {aggregate:.1} | {} | {:.0} | {:.0} | {wall:.1} | {} | {} |",
            show(decode, 1),
            show(vs_single, 2),
            percentile(&ttfts, 0.5) * 1e3,
            percentile(&ttfts, 0.99) * 1e3,
            peak.map_or("-".into(), |p| mib(p).to_string()),
            match (mask_us(0.5), mask_us(0.99)) {
                (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}"),
                _ => "-".into(),
            },
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
            "aggregate_vs_single_stream": vs_single.map(|r| round(r, 3)),
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
            "grammar_masks": masks.count(),
            "grammar_mask_mean_us": (masks.count() > 0)
                .then(|| round(masks.total().as_secs_f64() * 1e6 / masks.count() as f64, 1)),
            "grammar_mask_p50_us": mask_us(0.5).map(|v| round(v, 1)),
            "grammar_mask_p99_us": mask_us(0.99).map(|v| round(v, 1)),
        }))
    }
}
