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
use crate::content_hash::ContentHash;
use crate::detokenizer::{Detokenizer, TokenDecoder};
use crate::encoder_cache::EncoderCache;
use crate::output::EventSender;
use crate::request::{Event, Request, RequestId, Usage};
use crate::runner::{contain, ForwardSeq, ModelRunner, RunnerError};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::sequence::{Fork, SeqImage, Sequence};
use crate::stats::EngineStats;
use crate::stop::{FinishReason, StopChecker, StopError, StopReason};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

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
        let image_end = image
            .offset
            .checked_add(image.num_tokens)
            .filter(|&e| image.offset >= end && image.num_tokens > 0 && e <= prompt)
            .ok_or(SubmitError::BadImage(i))?;
        end = image_end;
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
        events: EventSender,
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
        // One per request: 2^64 requests outlast any server.
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

    /// Runs one step: one forward, or more when a failure must be traced to its sequences.
    ///
    /// One sequence's failure is never another's: a sequence whose planned positions, blocks
    /// or images are unsound is failed alone before the forward; when the batched encode or
    /// forward fails, the work is retried in parts until the failure is pinned on the
    /// sequences that fail alone (see [`Self::forward_isolating`]), and only those fail.
    pub fn step(&mut self) {
        self.drop_abandoned();
        let plan = self.schedule();
        if !plan.is_empty() {
            let mut ended: Vec<(usize, Option<Ending>)> = Vec::new();
            let mut failed = self.encode_images(&plan);
            let plan: Plan = plan
                .into_iter()
                .filter(|&(i, n)| {
                    if failed.iter().any(|f| f.0 == i) {
                        return false;
                    }
                    match self.unsound(i, n) {
                        Some(reason) => {
                            failed.push((i, RunnerError(reason)));
                            false
                        }
                        None => true,
                    }
                })
                .collect();
            let started = Instant::now();
            let (ran, rows) = self.forward_isolating(&plan, &mut failed);
            self.stats.forward_time += started.elapsed();
            for (i, error) in failed {
                self.fail(i, &error);
                ended.push((i, None));
            }
            let started = Instant::now();
            self.advance(&ran, rows, &mut ended);
            self.stats.sample_time += started.elapsed();
            self.retire(ended);
            self.stats.steps += 1;
            self.stats.tokens_last_step = ran.iter().map(|p| p.1).sum();
        }
        self.update_stats();
    }

    /// Why `running[i]` cannot run `n` tokens from its computed ones, if it cannot: positions
    /// past the model's length or its own tokens, a block table too short for them, or an
    /// image among them without embeddings. The scheduler never plans such a span; checking
    /// keeps a bug or an unforeseen input from reaching the batched forward, where it would
    /// fail every sequence of the step.
    fn unsound(&self, i: usize, n: usize) -> Option<String> {
        let seq = &self.running[i];
        let start = seq.computed;
        let Some(end) = start
            .checked_add(n)
            .filter(|&end| n > 0 && end <= seq.tokens.len())
        else {
            return Some(format!(
                "planned {n} tokens from position {start} of a {}-token sequence",
                seq.tokens.len()
            ));
        };
        if end > self.config.max_model_len {
            return Some(format!(
                "position {end} is past the maximum model length {}",
                self.config.max_model_len
            ));
        }
        let capacity = seq.blocks.len().checked_mul(self.config.block_size);
        if capacity.is_none_or(|c| c < end) {
            return Some(format!(
                "{} KV blocks cannot hold {end} positions",
                seq.blocks.len()
            ));
        }
        let unencoded = seq.images.iter().position(|img| {
            let r = img.range();
            r.start < end && start < r.end && img.embeds.is_none()
        });
        unencoded.map(|k| format!("image {k} has no embeddings"))
    }

    fn drop_abandoned(&mut self) {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| !s.is_abandoned());
        self.running.retain(|s| !s.is_abandoned());
        self.stats.aborted += (before - self.waiting.len() - self.running.len()) as u64;
    }

    /// Decides this step's batch: (index into `running`, tokens to run).
    ///
    /// Every `computed + n` below is at most the sequence's token count (`n` is capped by
    /// `remaining()`), itself at most `max_model_len` (`validate` checked prompt + max_tokens
    /// and generation stops at max_tokens), so none can overflow.
    fn schedule(&mut self) -> Plan {
        let block_size = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut encodes = 0;
        let mut plan = Vec::new();
        let mut preempted = false;
        // Whether the blocks of waiting sequences were given back this step (at most once).
        let mut released = false;
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
                // Blocks held by waiting sequences go before any running one's work.
                if !released {
                    released = true;
                    if self.release_waiting_blocks() {
                        continue;
                    }
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
                // With nothing running, nothing will free a block: what keeps the first in
                // line from starting is the blocks that those behind it hold.
                if self.running.is_empty() && !released {
                    released = true;
                    if self.release_waiting_blocks() {
                        continue;
                    }
                }
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

    /// Makes every waiting sequence give back the blocks it holds, as preemption does; true
    /// if any held one. Completions of an `n` > 1 request wait holding their prompt's shared
    /// blocks, and a sequence first in line may need more than the rest of the pool: without
    /// this it would wait for them forever, and they for it. They find their blocks again in
    /// the prefix cache when they start, or recompute them.
    fn release_waiting_blocks(&mut self) -> bool {
        let mut released = false;
        for seq in self.waiting.iter_mut().filter(|s| !s.blocks.is_empty()) {
            seq.blocks.clear();
            seq.computed = 0;
            seq.registered = 0;
            released = true;
        }
        released
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
    /// now, all in one batch. If the batch fails, each image is encoded alone, so that only
    /// the sequences whose own image fails are returned, with the error, to be failed.
    /// Only successful outputs enter the encoder cache.
    fn encode_images(&mut self, plan: &[(usize, usize)]) -> Vec<(usize, RunnerError)> {
        let mut order: Vec<ContentHash> = Vec::new();
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
            return Vec::new();
        }
        let refs: Vec<&R::Pixels> = pixels.iter().map(|p| p.as_ref()).collect();
        let mut encoded: HashMap<ContentHash, Arc<R::ImageEmbeds>> = HashMap::new();
        let mut broken: HashMap<ContentHash, RunnerError> = HashMap::new();
        match self.encode_batch(&refs) {
            Ok(outputs) => self.keep_encoded(&order, outputs, &mut encoded),
            Err(e) if refs.len() == 1 => {
                broken.insert(order[0], e);
            }
            Err(_) => {
                for (hash, image) in order.iter().zip(&refs) {
                    match self.encode_batch(&[image]) {
                        Ok(outputs) => self.keep_encoded(&[*hash], outputs, &mut encoded),
                        Err(e) => {
                            broken.insert(*hash, e);
                        }
                    }
                }
            }
        }
        let mut failed = Vec::new();
        for &(i, _) in plan {
            for image in &mut self.running[i].images {
                let hash = image.input.content_hash;
                if let Some(e) = broken.get(&hash) {
                    failed.push((i, e.clone()));
                    break;
                }
                if image.embeds.is_none() {
                    image.embeds = encoded.get(&hash).cloned();
                }
            }
        }
        failed
    }

    /// One call of the encoder, checked to give one output per image.
    fn encode_batch(&mut self, images: &[&R::Pixels]) -> Result<Vec<R::ImageEmbeds>, RunnerError> {
        let started = Instant::now();
        let outputs = contain(|| self.runner.encode_images(images));
        self.stats.encode_time += started.elapsed();
        let outputs = outputs?;
        if outputs.len() != images.len() {
            return Err(RunnerError(format!(
                "encoder returned {} outputs for {} images",
                outputs.len(),
                images.len()
            )));
        }
        self.stats.images_encoded += images.len() as u64;
        Ok(outputs)
    }

    /// Caches the encoder's `outputs` for the images `order` names, and notes them for this step.
    fn keep_encoded(
        &mut self,
        order: &[ContentHash],
        outputs: Vec<R::ImageEmbeds>,
        encoded: &mut HashMap<ContentHash, Arc<R::ImageEmbeds>>,
    ) {
        for (hash, out) in order.iter().zip(outputs) {
            let bytes = self.runner.embeds_bytes(&out);
            let out = Arc::new(out);
            self.encoder_cache.insert(*hash, out.clone(), bytes);
            encoded.insert(*hash, out);
        }
    }

    /// Runs the plan's forward; if it fails, runs each half of the plan, and so on down to
    /// single sequences, whose failure is then theirs alone and goes to `failed`. Returns the
    /// entries that ran, in plan order, and their logits rows.
    ///
    /// Rerunning a sequence is safe: a forward writes keys and values only at the positions it
    /// runs, past those computed, into blocks no other sequence reads yet (shared blocks are
    /// full and computed; blocks are registered in the prefix cache only after a successful
    /// forward, in `advance`), so a rerun writes the same slots again with the same values and
    /// the sequence's tokens are those it would have had anyway. A model that fails every
    /// time fails every sequence after at most 2·len − 1 forwards.
    fn forward_isolating(
        &mut self,
        plan: &[(usize, usize)],
        failed: &mut Vec<(usize, RunnerError)>,
    ) -> (Plan, Vec<Vec<f32>>) {
        let mut ran = Vec::new();
        let mut rows = Vec::new();
        let mut pending = vec![plan];
        // Depth first, first half first: what ran stays in plan order.
        while let Some(part) = pending.pop() {
            if part.is_empty() {
                continue;
            }
            match self.forward(part) {
                Ok(r) => {
                    ran.extend_from_slice(part);
                    rows.extend(r);
                }
                Err(e) if part.len() == 1 => failed.push((part[0].0, e)),
                Err(_) => {
                    let (first, second) = part.split_at(part.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
            }
        }
        (ran, rows)
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
        let rows = contain(|| self.runner.forward(&batch))?;
        if rows.len() != wanted {
            return Err(RunnerError(format!(
                "model returned {} logits rows for {wanted} sequences",
                rows.len()
            )));
        }
        Ok(rows)
    }

    /// Records the forward's progress, samples and reports; sequences that are over go to
    /// `finished` (with their ending, or `None` when failed or cancelled).
    fn advance(
        &mut self,
        plan: &[(usize, usize)],
        rows: Vec<Vec<f32>>,
        finished: &mut Vec<(usize, Option<Ending>)>,
    ) {
        let block_size = self.config.block_size;
        let limit = self.config.max_buffered_output_bytes;
        let mut rows = rows.into_iter();
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
                        seq.events.fail(e.to_string());
                        self.stats.failed += 1;
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
                let token = Event::Token {
                    index: seq.index,
                    id: sampled.token,
                    text: step.text,
                    logprob: sampled.logprob,
                    top_logprobs: sampled.top_logprobs,
                };
                if !report(&mut self.stats, limit, seq, token) {
                    finished.push((i, None));
                }
                continue;
            };
            let mut text = step.text;
            if !stopped_by_token {
                if step.stop_reason.is_none() {
                    // Length: the full decode's last characters, even if incomplete.
                    text.push_str(&seq.detokenizer.flush());
                }
                let token = Event::Token {
                    index: seq.index,
                    id: sampled.token,
                    text: std::mem::take(&mut text),
                    logprob: sampled.logprob,
                    top_logprobs: sampled.top_logprobs,
                };
                if !report(&mut self.stats, limit, seq, token) {
                    finished.push((i, None));
                    continue;
                }
            }
            finished.push((i, Some((reason, step.stop_reason, text))));
        }
        // Siblings go first in line, in order: they hold the prompt's blocks already.
        for sibling in siblings.into_iter().rev() {
            self.waiting.push_front(sibling);
        }
    }

    /// Takes the step's ended sequences out of `running` (their blocks go back to the pool),
    /// reporting the finish of those that have one.
    fn retire(&mut self, mut ended: Vec<(usize, Option<Ending>)>) {
        ended.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, end) in ended {
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
        let finished = Event::Finished {
            index: seq.index,
            text,
            reason,
            stop_reason,
            usage,
            timings: seq.timings.clone(),
        };
        let limit = self.config.max_buffered_output_bytes;
        if report(&mut self.stats, limit, &seq, finished) {
            self.stats.finished += 1;
        }
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
                    // Modular on purpose: any u64 is a seed, and seed + k names completion k
                    // of every seed, u64::MAX included.
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

    /// Ends the request of `running[i]`, whose encode, forward or checks failed, with
    /// `error`; the caller retires the sequence, the request's other completions stop at the
    /// next step.
    fn fail(&mut self, i: usize, error: &RunnerError) {
        self.running[i].events.fail(error.to_string());
        self.stats.failed += 1;
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

/// A step's batch: (index into `running`, tokens to run).
type Plan = Vec<(usize, usize)>;

/// Sends `event` to the sequence's reader unless the reader has `limit` bytes unread; past
/// that the request is cancelled with an error event (counted once per request). False when
/// the sequence must stop: cancelled now, or its request already over.
fn report<P, E>(stats: &mut EngineStats, limit: usize, seq: &Sequence<P, E>, event: Event) -> bool {
    if let Err(overflow) = seq.events.send(event, limit) {
        let ended = seq.events.fail(format!(
            "the request was cancelled: its client left {} bytes of output unread, more than \
             the server's limit of {limit} (max_buffered_output_bytes)",
            overflow.buffered
        ));
        if ended {
            stats.output_overflows += 1;
        }
    }
    if seq.is_abandoned() {
        stats.aborted += 1;
        return false;
    }
    true
}

/// Which sequence `image_limit` looks at.
#[derive(Clone, Copy)]
enum Where {
    Running(usize),
    Waiting,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{channel, RequestStream};
    use crate::stop::StopParams;

    /// A model that trusts its input as a real one does: a block table too short for the
    /// positions is out-of-bounds indexing (a panic here).
    struct Trusting;

    impl ModelRunner for Trusting {
        type Pixels = ();
        type ImageEmbeds = ();

        fn encode_images(&mut self, images: &[&()]) -> Result<Vec<()>, RunnerError> {
            Ok(vec![(); images.len()])
        }

        fn vocab_size(&self) -> usize {
            8
        }

        fn embeds_bytes(&self, _: &()) -> usize {
            0
        }

        fn forward(&mut self, batch: &[ForwardSeq<'_, ()>]) -> Result<Vec<Vec<f32>>, RunnerError> {
            for seq in batch {
                let end = seq.start + seq.tokens.len();
                assert!(seq.block_table.len() * 4 >= end, "out of bounds");
            }
            let rows = batch.iter().filter(|s| s.wants_logits).count();
            Ok(vec![vec![0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]; rows])
        }
    }

    fn submit(s: &mut Scheduler<Trusting>) -> RequestStream {
        let (tx, rx) = channel();
        let request = Request {
            prompt: vec![5; 10],
            images: Vec::new(),
            sampling: SamplingParams::default(),
            stop: StopParams {
                max_tokens: 6,
                ..StopParams::default()
            },
            skip_special_tokens: true,
            n: 1,
        };
        s.add(request, tx).unwrap();
        rx
    }

    fn events(rx: &mut RequestStream) -> Vec<Event> {
        std::iter::from_fn(|| rx.try_next()).collect()
    }

    /// A sequence whose state went wrong (here: tokens past the model's length) is failed
    /// alone before the forward, which never sees it; the others go on.
    #[test]
    fn an_unsound_sequence_is_failed_before_the_forward() {
        let mut config = EngineConfig::new(32, 4, 64);
        config.enable_prefix_caching = false;
        let decoder: Arc<dyn TokenDecoder> = Arc::new(|ids: &[u32], _: bool| format!("{ids:?}"));
        let mut s = Scheduler::new(Trusting, config, decoder);
        let mut streams: Vec<RequestStream> = (0..2).map(|_| submit(&mut s)).collect();
        s.step();
        assert_eq!(s.running.len(), 2);
        // A block table too short for the span is caught too (the scheduler itself always
        // allocates enough before this check runs, so it is looked at directly).
        let all = s.running[0].blocks.clone();
        s.running[0].blocks.truncate(1);
        let message = s.unsound(0, 1).expect("unsound");
        assert!(message.contains("KV blocks cannot hold"), "{message}");
        s.running[0].blocks = all;
        assert_eq!(s.unsound(0, 1), None);

        s.running[1].tokens.extend([5; 60]);
        while s.has_work() {
            s.step();
        }
        let first = events(&mut streams[0]);
        assert!(
            matches!(first.last(), Some(Event::Finished { .. })),
            "{first:?}"
        );
        match events(&mut streams[1]).last() {
            Some(Event::Error { message }) => {
                assert!(
                    message.contains("past the maximum model length 64"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.stats().failed, 1);
        assert_eq!(s.free_blocks(), 32);
    }
}
