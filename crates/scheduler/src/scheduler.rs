//! The step: choose what runs (continuous batching with chunked prefill and preemption),
//! encode the images it needs, run one forward, sample, and report.
//!
//! Policy, as vLLM v1's: running sequences first, oldest first, each taking the tokens it
//! still needs (one for a decode, a chunk for a prefill) from the step's token budget; when a
//! sequence needs a block and none is free, the newest running sequence is preempted (blocks
//! dropped, recomputed later, first in line). Waiting sequences are admitted in arrival
//! order while budget and blocks last, and not at all in a step that preempted.

use crate::block_pool::BlockPool;
use crate::config::EngineConfig;
use crate::detokenizer::{Detokenizer, TokenDecoder};
use crate::encoder_cache::EncoderCache;
use crate::request::{Event, Request, RequestId, Usage};
use crate::runner::{ForwardSeq, ModelRunner, RunnerError};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::sequence::{Fork, SeqImage, Sequence};
use crate::stats::EngineStats;
use crate::stop::{FinishReason, StopChecker, StopError, StopReason};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

type Seq<R> = Sequence<<R as ModelRunner>::Pixels, <R as ModelRunner>::ImageEmbeds>;

/// Why a request was refused before it started.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    NoTokens,
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the maximum model length {max_model_len}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("the request needs {needed} KV-cache blocks but the cache has {total}")]
    CacheTooSmall { needed: usize, total: usize },
    #[error("image {0} does not lie within the prompt, in order and without overlap")]
    BadImage(usize),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Stop(#[from] StopError),
    #[error("n must be between 1 and {MAX_N}, got {0}")]
    BadN(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// Most completions one request may ask for.
pub const MAX_N: usize = 128;

/// Checks that a request could ever complete, for a model whose logits have `vocab_size`
/// entries: every rule a request must pass, in one place. [`crate::Engine::submit`] runs it
/// before queueing, so every invalid request is refused at once, never after it started.
pub fn validate<P>(
    config: &EngineConfig,
    vocab_size: usize,
    request: &Request<P>,
) -> Result<(), SubmitError> {
    let prompt = request.prompt.len();
    if prompt == 0 {
        return Err(SubmitError::EmptyPrompt);
    }
    if request.n == 0 || request.n > MAX_N {
        return Err(SubmitError::BadN(request.n));
    }
    let max_tokens = request.stop.max_tokens;
    if max_tokens == 0 {
        return Err(SubmitError::NoTokens);
    }
    request.sampling.validate(vocab_size)?;
    request.stop.validate(vocab_size)?;
    // Checked: `max_tokens` comes from the client and may be anything up to usize::MAX.
    let total = prompt
        .checked_add(max_tokens)
        .filter(|&total| total <= config.max_model_len)
        .ok_or(SubmitError::TooLong {
            prompt,
            max_tokens,
            max_model_len: config.max_model_len,
        })?;
    let needed = total.div_ceil(config.block_size);
    if needed > config.num_blocks {
        return Err(SubmitError::CacheTooSmall {
            needed,
            total: config.num_blocks,
        });
    }
    let mut end = 0;
    for (i, image) in request.images.iter().enumerate() {
        if image.offset < end || image.num_tokens == 0 || image.offset + image.num_tokens > prompt {
            return Err(SubmitError::BadImage(i));
        }
        end = image.offset + image.num_tokens;
    }
    Ok(())
}

/// The engine's state and its step, driven by one thread.
pub struct Scheduler<R: ModelRunner> {
    runner: R,
    config: EngineConfig,
    pool: BlockPool,
    waiting: VecDeque<Seq<R>>,
    running: Vec<Seq<R>>,
    encoder_cache: EncoderCache<R::ImageEmbeds>,
    decoder: Arc<dyn TokenDecoder>,
    stats: EngineStats,
    next_id: RequestId,
}

impl<R: ModelRunner> Scheduler<R> {
    /// `decoder` turns tokens into text for every request.
    pub fn new(runner: R, config: EngineConfig, decoder: Arc<dyn TokenDecoder>) -> Self {
        Self {
            runner,
            decoder,
            pool: BlockPool::new(config.num_blocks, config.block_size),
            encoder_cache: EncoderCache::new(config.encoder_cache_bytes),
            stats: EngineStats {
                blocks_total: config.num_blocks,
                ..EngineStats::default()
            },
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request; its events go to `events`.
    pub fn add(
        &mut self,
        request: Request<R::Pixels>,
        events: UnboundedSender<Event>,
    ) -> Result<RequestId, SubmitError> {
        let vocab = self.runner.vocab_size();
        validate(&self.config, vocab, &request)?;
        let fork = (request.n > 1).then(|| Fork {
            n: request.n,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            skip_special_tokens: request.skip_special_tokens,
        });
        let sampler = Sampler::new(request.sampling, vocab)?;
        let stop = StopChecker::new(request.stop, vocab)?;
        let detokenizer = Detokenizer::new(self.decoder.clone(), request.skip_special_tokens);
        let id = self.next_id;
        self.next_id += 1;
        let prompt_len = request.prompt.len();
        self.waiting.push_back(Sequence {
            index: 0,
            fork,
            tokens: request.prompt,
            prompt_len,
            images: request
                .images
                .into_iter()
                .map(|input| SeqImage {
                    input,
                    embeds: None,
                })
                .collect(),
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            registered: 0,
            sampler,
            stop,
            detokenizer,
            events,
            cached_tokens: 0,
            arrival: Instant::now(),
            first_scheduled: None,
            last_token: None,
            timings: Default::default(),
        });
        self.update_stats();
        Ok(id)
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Free blocks of the pool (cached prefixes included).
    pub fn free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Runs one step: at most one forward.
    pub fn step(&mut self) {
        self.drop_abandoned();
        let plan = self.schedule();
        if !plan.is_empty() {
            let result = self.encode_images(&plan).and_then(|()| {
                let started = Instant::now();
                let rows = self.forward(&plan);
                self.stats.forward_time += started.elapsed();
                rows
            });
            match result {
                Ok(rows) => {
                    let started = Instant::now();
                    self.advance(&plan, rows);
                    self.stats.sample_time += started.elapsed();
                }
                Err(e) => self.fail(&plan, &e),
            }
            self.stats.steps += 1;
            self.stats.tokens_last_step = plan.iter().map(|p| p.1).sum();
        }
        self.update_stats();
    }

    fn drop_abandoned(&mut self) {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| !s.is_abandoned());
        self.running.retain(|s| !s.is_abandoned());
        self.stats.aborted += (before - self.waiting.len() - self.running.len()) as u64;
    }

    /// Decides this step's batch: (index into `running`, tokens to run).
    fn schedule(&mut self) -> Vec<(usize, usize)> {
        let block_size = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut encodes = 0;
        let mut plan = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let want = self.running[i].remaining().min(budget);
            let n = self.image_limit(Where::Running(i), want, &mut encodes);
            if n == 0 {
                i += 1;
                continue;
            }
            let mut fits = true;
            loop {
                let seq = &self.running[i];
                let need = Seq::<R>::blocks_for(seq.computed + n, block_size)
                    .saturating_sub(seq.blocks.len());
                if let Some(blocks) = self.pool.allocate(need) {
                    self.running[i].blocks.extend(blocks);
                    break;
                }
                let victim = self.running.len() - 1;
                let mut seq = self.running.pop().expect("index i is in range");
                seq.reset();
                self.stats.preemptions += 1;
                self.waiting.push_front(seq);
                preempted = true;
                if victim == i {
                    fits = false;
                    break;
                }
            }
            if !fits {
                break;
            }
            plan.push((i, n));
            budget -= n;
            i += 1;
        }
        while !preempted && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let mut looked_up = 0;
            if seq.blocks.is_empty() && self.config.enable_prefix_caching {
                // Keep at least one token to run: its logits give the next token.
                let reusable = (seq.tokens.len() - 1) / block_size;
                looked_up = reusable;
                seq.hash_blocks(reusable, block_size);
                for hash in &seq.hashes[..reusable] {
                    match self.pool.lookup(*hash) {
                        Some(block) => seq.blocks.push(block),
                        None => break,
                    }
                }
                seq.computed = seq.blocks.len() * block_size;
                seq.registered = seq.blocks.len();
            }
            let want = seq.remaining().min(budget);
            let n = self.image_limit(Where::Waiting, want, &mut encodes);
            let seq = self.waiting.front_mut().expect("checked above");
            let need =
                Seq::<R>::blocks_for(seq.computed + n, block_size).saturating_sub(seq.blocks.len());
            let blocks = if n == 0 {
                None
            } else {
                self.pool.allocate(need)
            };
            let Some(blocks) = blocks else {
                // Give cached blocks back rather than pin them while waiting.
                seq.blocks.clear();
                seq.computed = 0;
                seq.registered = 0;
                break;
            };
            let mut seq = self.waiting.pop_front().expect("checked above");
            // Counted in tokens, as vLLM does, and once per admission.
            self.stats.prefix_queries += (looked_up * block_size) as u64;
            self.stats.prefix_hits += seq.computed as u64;
            seq.blocks.extend(blocks);
            if seq.first_scheduled.is_none() {
                let now = Instant::now();
                seq.first_scheduled = Some(now);
                seq.timings.queue = now - seq.arrival;
                seq.cached_tokens = seq.computed.min(seq.prompt_len);
            }
            self.running.push(seq);
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        plan
    }

    /// How many of `want` tokens the sequence can run given its images: images in the span
    /// must be encoded, or fit in this step's encoder budget.
    fn image_limit(&mut self, at: Where, want: usize, encodes: &mut usize) -> usize {
        let seq = match at {
            Where::Running(i) => &mut self.running[i],
            Where::Waiting => self.waiting.front_mut().expect("caller checked"),
        };
        let (start, end) = (seq.computed, seq.computed + want);
        for image in &mut seq.images {
            let range = image.range();
            if range.end <= start
                || range.start >= end
                || image.embeds.is_some()
                || self.encoder_cache.contains(image.input.content_hash)
            {
                continue;
            }
            if *encodes < self.config.max_images_per_step {
                *encodes += 1;
                continue;
            }
            return range.start.max(start) - start;
        }
        want
    }

    /// Gives every image the plan needs its embeddings: from the encoder cache, or encoded
    /// now, all in one batch.
    fn encode_images(&mut self, plan: &[(usize, usize)]) -> Result<(), RunnerError> {
        let mut order: Vec<u64> = Vec::new();
        let mut pixels = Vec::new();
        for &(i, n) in plan {
            let seq = &mut self.running[i];
            let (start, end) = (seq.computed, seq.computed + n);
            for image in &mut seq.images {
                let r = image.range();
                let hash = image.input.content_hash;
                if image.embeds.is_some()
                    || r.end <= start
                    || end <= r.start
                    || order.contains(&hash)
                {
                    continue;
                }
                match self.encoder_cache.get(hash) {
                    Some(embeds) => image.embeds = Some(embeds),
                    None => {
                        order.push(hash);
                        pixels.push(image.input.pixels.clone());
                    }
                }
            }
        }
        if pixels.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let refs: Vec<&R::Pixels> = pixels.iter().map(|p| p.as_ref()).collect();
        let outputs = self.runner.encode_images(&refs)?;
        if outputs.len() != order.len() {
            return Err(RunnerError(format!(
                "encoder returned {} outputs for {} images",
                outputs.len(),
                order.len()
            )));
        }
        self.stats.images_encoded += order.len() as u64;
        self.stats.encode_time += started.elapsed();
        let mut encoded: HashMap<u64, Arc<R::ImageEmbeds>> = HashMap::new();
        for (hash, out) in order.into_iter().zip(outputs) {
            let bytes = self.runner.embeds_bytes(&out);
            let out = Arc::new(out);
            self.encoder_cache.insert(hash, out.clone(), bytes);
            encoded.insert(hash, out);
        }
        for &(i, _) in plan {
            for image in &mut self.running[i].images {
                if image.embeds.is_none() {
                    image.embeds = encoded.get(&image.input.content_hash).cloned();
                }
            }
        }
        Ok(())
    }

    fn forward(&mut self, plan: &[(usize, usize)]) -> Result<Vec<Vec<f32>>, RunnerError> {
        let batch: Vec<ForwardSeq<'_, R::ImageEmbeds>> = plan
            .iter()
            .map(|&(i, n)| {
                let seq = &self.running[i];
                let (start, end) = (seq.computed, seq.computed + n);
                let images = seq
                    .images
                    .iter()
                    .filter(|img| img.range().start < end && start < img.range().end)
                    .filter_map(|img| {
                        let offset = img.input.offset;
                        let rows = start.max(offset) - offset..end.min(img.range().end) - offset;
                        img.embeds.as_deref().map(|e| (e, rows))
                    })
                    .collect();
                ForwardSeq {
                    tokens: &seq.tokens[start..end],
                    start,
                    block_table: seq.blocks.iter().map(|b| b.id()).collect(),
                    wants_logits: end == seq.tokens.len(),
                    images,
                }
            })
            .collect();
        let wanted = batch.iter().filter(|s| s.wants_logits).count();
        let rows = self.runner.forward(&batch)?;
        if rows.len() != wanted {
            return Err(RunnerError(format!(
                "model returned {} logits rows for {wanted} sequences",
                rows.len()
            )));
        }
        Ok(rows)
    }

    /// Records the forward's progress, samples, reports, and retires finished sequences.
    fn advance(&mut self, plan: &[(usize, usize)], rows: Vec<Vec<f32>>) {
        let block_size = self.config.block_size;
        let mut rows = rows.into_iter();
        let mut finished: Vec<(usize, Option<Ending>)> = Vec::new();
        let mut siblings = Vec::new();
        for &(i, n) in plan {
            let seq = &mut self.running[i];
            let wants_logits = seq.computed + n == seq.tokens.len();
            seq.computed += n;
            if self.config.enable_prefix_caching {
                let full = seq.computed / block_size;
                seq.hash_blocks(full, block_size);
                for k in seq.registered..full {
                    self.pool.register(&seq.blocks[k], seq.hashes[k]);
                }
                seq.registered = full;
            }
            if !wants_logits {
                continue;
            }
            if let Some(fork) = seq.fork.take() {
                siblings.extend(self.siblings(i, fork));
            }
            let seq = &mut self.running[i];
            let logits = rows.next().expect("counted in forward");
            let (prompt, generated) = seq.tokens.split_at(seq.prompt_len);
            let sampled =
                match seq
                    .sampler
                    .sample(&logits, prompt, generated, seq.stop.banned_tokens())
                {
                    Ok(sampled) => sampled,
                    Err(e) => {
                        let _ = seq.events.send(Event::Error {
                            message: e.to_string(),
                        });
                        finished.push((i, None));
                        continue;
                    }
                };
            let now = Instant::now();
            match seq.last_token {
                None => {
                    seq.timings.time_to_first_token = now - seq.arrival;
                    seq.timings.prefill = now - seq.first_scheduled.unwrap_or(seq.arrival);
                }
                Some(last) => seq.timings.inter_token.push(now - last),
            }
            seq.last_token = Some(now);
            seq.tokens.push(sampled.token);
            let delta = seq.detokenizer.push(sampled.token);
            // `validate` keeps prompt + max_tokens within max_model_len.
            let step = seq.stop.push(sampled.token, &delta);
            let stopped_by_token = matches!(
                step.stop_reason,
                Some(StopReason::Eos) | Some(StopReason::Token(_))
            );
            let Some(reason) = step.finish else {
                let _ = seq.events.send(Event::Token {
                    index: seq.index,
                    id: sampled.token,
                    text: step.text,
                    logprob: sampled.logprob,
                    top_logprobs: sampled.top_logprobs,
                });
                continue;
            };
            let mut text = step.text;
            if !stopped_by_token {
                if step.stop_reason.is_none() {
                    // Length: the full decode's last characters, even if incomplete.
                    text.push_str(&seq.detokenizer.flush());
                }
                let _ = seq.events.send(Event::Token {
                    index: seq.index,
                    id: sampled.token,
                    text: std::mem::take(&mut text),
                    logprob: sampled.logprob,
                    top_logprobs: sampled.top_logprobs,
                });
            }
            finished.push((i, Some((reason, step.stop_reason, text))));
        }
        // Siblings go first in line, in order: they hold the prompt's blocks already.
        for sibling in siblings.into_iter().rev() {
            self.waiting.push_front(sibling);
        }
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, end) in finished {
            let seq = self.running.remove(i);
            if let Some((reason, stop_reason, text)) = end {
                self.finish(seq, reason, stop_reason, text);
            }
        }
    }

    fn finish(
        &mut self,
        mut seq: Seq<R>,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
        text: String,
    ) {
        let now = Instant::now();
        seq.timings.end_to_end = now - seq.arrival;
        if let Some(first) = seq.first_scheduled {
            let first_token = first + seq.timings.prefill;
            seq.timings.decode = seq
                .last_token
                .map_or(Default::default(), |l| l - first_token);
        }
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated(),
            cached_tokens: seq.cached_tokens,
        };
        self.stats.finished += 1;
        let _ = seq.events.send(Event::Finished {
            index: seq.index,
            text,
            reason,
            stop_reason,
            usage,
            timings: seq.timings.clone(),
        });
    }

    /// The other completions of an `n > 1` request whose prompt `running[i]` just computed.
    ///
    /// They share the prompt's full blocks; each recomputes the tokens of the last, partial
    /// block (fewer than a block) into a block of its own, so no block is written by two
    /// sequences. Each gets its own random stream: seed + index when seeded.
    fn siblings(&self, i: usize, fork: Fork) -> Vec<Seq<R>> {
        let parent = &self.running[i];
        let block_size = self.config.block_size;
        let vocab = self.runner.vocab_size();
        let shared = (parent.tokens.len() - 1) / block_size;
        (1..fork.n)
            .filter_map(|index| {
                let sampling = SamplingParams {
                    seed: fork.sampling.seed.map(|s| s.wrapping_add(index as u64)),
                    ..fork.sampling.clone()
                };
                // Both were validated with the parent's identical settings.
                let sampler = Sampler::new(sampling, vocab).ok()?;
                let stop = StopChecker::new(fork.stop.clone(), vocab).ok()?;
                let mut hashes = parent.hashes.clone();
                hashes.truncate(shared);
                Some(Sequence {
                    index,
                    fork: None,
                    tokens: parent.tokens.clone(),
                    prompt_len: parent.prompt_len,
                    images: parent.images.clone(),
                    computed: shared * block_size,
                    blocks: parent.blocks[..shared].to_vec(),
                    registered: shared.min(parent.registered),
                    hashes,
                    sampler,
                    stop,
                    detokenizer: Detokenizer::new(self.decoder.clone(), fork.skip_special_tokens),
                    events: parent.events.clone(),
                    cached_tokens: parent.cached_tokens,
                    arrival: parent.arrival,
                    first_scheduled: parent.first_scheduled,
                    last_token: None,
                    timings: parent.timings.clone(),
                })
            })
            .collect()
    }

    /// Fails every sequence of a step whose encode or forward failed.
    fn fail(&mut self, plan: &[(usize, usize)], error: &RunnerError) {
        let mut indices: Vec<usize> = plan.iter().map(|p| p.0).collect();
        indices.sort_by_key(|&i| std::cmp::Reverse(i));
        for i in indices {
            let seq = self.running.remove(i);
            let _ = seq.events.send(Event::Error {
                message: error.to_string(),
            });
            self.stats.failed += 1;
        }
    }

    fn update_stats(&mut self) {
        let s = &mut self.stats;
        s.running = self.running.len();
        s.waiting = self.waiting.len();
        s.blocks_used = self.config.num_blocks - self.pool.num_free();
        s.image_cache_queries = self.encoder_cache.queries;
        s.image_cache_hits = self.encoder_cache.hits;
    }
}

/// How a sequence ended: reason, what stopped it, last text.
type Ending = (FinishReason, Option<StopReason>, String);

/// Which sequence `image_limit` looks at.
#[derive(Clone, Copy)]
enum Where {
    Running(usize),
    Waiting,
}
