//! One completion's state inside the engine: its tokens, how many of them the KV cache holds,
//! its images, and what turns its next logits into output.
//!
//! The fields are private so that the counts stay consistent: the computed tokens never
//! exceed the tokens, blocks from the [`KvCacheManager`] always cover the computed tokens, and
//! a sequence without blocks has none computed.

use crate::detokenizer::Detokenizer;
use crate::grammar::Grammar;
use crate::kv_cache_manager::{KvCacheManager, SeqBlocks};
use crate::output::EventSender;
use crate::request::{ErrorCause, Event, ImageInput, RequestTimings, Usage};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::seq_image::SeqImage;
use crate::stop::{FinishReason, StopChecker, StopParams, StopReason, StopStep};
use std::ops::Range;
use std::time::Instant;

/// Names a sequence for the length of its life in the engine, whatever its place in the
/// queues; each completion of a request has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqId(pub u64);

/// What the siblings of an `n > 1` request are made from, once its prompt is computed.
pub(crate) struct Fork {
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    pub skip_special_tokens: bool,
    /// Before anything was generated, so each sibling starts from the grammar's start.
    pub grammar: Option<Grammar>,
}

/// What turns a sequence's logits into its output: its sampler, stop checker and
/// detokenizer, and the stream its events go to.
pub(crate) struct Output {
    pub sampler: Sampler,
    pub stop: StopChecker,
    pub detokenizer: Detokenizer,
    /// The grammar its tokens must follow, if any.
    pub grammar: Constraint,
    /// Shared by the request's completions.
    pub events: EventSender,
}

/// Whether a sequence's tokens follow a grammar.
pub(crate) enum Constraint {
    Free,
    Grammar(Grammar),
    /// Its grammar is away, computing its next mask; a sequence cannot sample until it is
    /// back (were it lost, the sequence fails rather than sample unconstrained).
    Lent,
}

impl From<Option<Grammar>> for Constraint {
    fn from(grammar: Option<Grammar>) -> Self {
        grammar.map_or(Self::Free, Self::Grammar)
    }
}

pub(crate) struct Sequence<P, E> {
    id: SeqId,
    /// Which completion of its request this is.
    index: usize,
    /// Set on the first completion of an `n > 1` request until its prompt is computed.
    fork: Option<Fork>,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    images: Vec<SeqImage<P, E>>,
    /// Leading tokens whose keys and values are in `blocks`.
    computed: usize,
    blocks: SeqBlocks,
    output: Output,
    cached_tokens: usize,
    arrival: Instant,
    first_scheduled: Option<Instant>,
    last_token: Option<Instant>,
    timings: RequestTimings,
}

impl<P, E> Sequence<P, E> {
    /// A request's first completion, before anything of it is computed.
    pub fn new(
        id: SeqId,
        prompt: Vec<u32>,
        images: Vec<ImageInput<P>>,
        fork: Option<Fork>,
        output: Output,
    ) -> Self {
        Self {
            id,
            index: 0,
            fork,
            prompt_len: prompt.len(),
            tokens: prompt,
            images: images.into_iter().map(SeqImage::new).collect(),
            computed: 0,
            blocks: SeqBlocks::default(),
            output,
            cached_tokens: 0,
            arrival: Instant::now(),
            first_scheduled: None,
            last_token: None,
            timings: Default::default(),
        }
    }

    /// Completion `index` of this sequence's request, sharing the first `shared_blocks` blocks
    /// of its prompt: those tokens are computed, the rest will be.
    pub fn sibling(
        &self,
        id: SeqId,
        index: usize,
        shared_blocks: usize,
        kv: &KvCacheManager,
        output: Output,
    ) -> Self {
        let blocks = kv.share(&self.blocks, shared_blocks);
        Self {
            id,
            index,
            fork: None,
            tokens: self.tokens.clone(),
            prompt_len: self.prompt_len,
            images: self.images.clone(),
            computed: blocks.len() * kv.block_size(),
            blocks,
            output,
            cached_tokens: self.cached_tokens,
            arrival: self.arrival,
            first_scheduled: self.first_scheduled,
            last_token: None,
            timings: self.timings.clone(),
        }
    }

    pub fn id(&self) -> SeqId {
        self.id
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn images(&self) -> &[SeqImage<P, E>] {
        &self.images
    }

    pub fn images_mut(&mut self) -> &mut [SeqImage<P, E>] {
        &mut self.images
    }

    pub fn computed(&self) -> usize {
        self.computed
    }

    /// KV-cache blocks the sequence holds.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The ids of its blocks, in order, for the forward.
    pub fn block_table(&self) -> Vec<u32> {
        self.blocks.ids()
    }

    pub fn output(&self) -> &Output {
        &self.output
    }

    /// No overflow: tokens only grow from the prompt.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to run through the model before the next token can be sampled. No
    /// overflow: `computed` never passes `tokens.len()`.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// The token range `n` more tokens would run: from the computed ones on.
    pub fn span(&self, n: usize) -> Range<usize> {
        self.computed..self.computed + n
    }

    /// Whether the caller dropped its stream, or an error already ended the request.
    pub fn is_abandoned(&self) -> bool {
        self.output.events.is_abandoned()
    }

    /// Takes the settings its siblings are made from, the first time its prompt is computed.
    pub fn take_fork(&mut self) -> Option<Fork> {
        self.fork.take()
    }

    /// At admission, before it holds any block: takes the blocks of its leading full blocks
    /// that the prefix cache has. Returns the tokens looked up (0 when it already holds
    /// blocks).
    pub fn take_cached_prefix(&mut self, kv: &KvCacheManager) -> usize {
        if !self.blocks.is_empty() {
            return 0;
        }
        let looked_up = kv.take_cached_prefix(&mut self.blocks, &self.tokens, &self.images);
        self.computed = self.blocks.len() * kv.block_size();
        looked_up
    }

    /// Makes its blocks cover `n` more tokens than the computed ones; false, holding what it
    /// held, when the pool is short.
    pub fn allocate(&mut self, n: usize, kv: &KvCacheManager) -> bool {
        kv.allocate(&mut self.blocks, self.computed + n)
    }

    /// Records that the forward computed `n` more tokens (a planned, checked span, so within
    /// the tokens and the blocks), and offers its newly full blocks to the prefix cache.
    pub fn advance(&mut self, n: usize, kv: &KvCacheManager) {
        self.computed = (self.computed + n).min(self.tokens.len());
        kv.register_full(&mut self.blocks, self.computed, &self.tokens, &self.images);
    }

    /// Gives back every block: the sequence will be recomputed from its first token.
    pub fn release_blocks(&mut self) {
        self.blocks.clear();
        self.computed = 0;
    }

    /// Drops every block for another's sake (preemption), counted in its timings.
    pub fn preempt(&mut self) {
        self.release_blocks();
        self.timings.preemptions += 1;
    }

    /// Notes its first scheduling: the end of its queueing and how much the cache gave it.
    pub fn mark_scheduled(&mut self) {
        if self.first_scheduled.is_none() {
            let now = Instant::now();
            self.first_scheduled = Some(now);
            self.timings.queue = now - self.arrival;
            self.cached_tokens = self.computed.min(self.prompt_len);
        }
    }

    /// Takes its grammar out, to compute its next mask elsewhere (see `scheduler.rs`); put
    /// it back with [`Sequence::put_grammar`] before sampling.
    pub fn take_grammar(&mut self) -> Option<Grammar> {
        match std::mem::replace(&mut self.output.grammar, Constraint::Lent) {
            Constraint::Grammar(grammar) => Some(grammar),
            other => {
                self.output.grammar = other;
                None
            }
        }
    }

    pub fn put_grammar(&mut self, grammar: Grammar) {
        self.output.grammar = Constraint::Grammar(grammar);
    }

    /// Chooses its next token from the `logits` of its last position; under a grammar, one
    /// that the grammar allows, which the grammar then consumes. The error says what failed,
    /// and whose failure it is: a grammar that will not go on is the client's.
    pub fn sample(&mut self, logits: &[f32]) -> Result<Sampled, (String, ErrorCause)> {
        let (prompt, generated) = self.tokens.split_at(self.prompt_len);
        let banned = self.output.stop.banned_tokens();
        let grammar = match &mut self.output.grammar {
            Constraint::Free => {
                return self
                    .output
                    .sampler
                    .sample(logits, prompt, generated, banned, None)
                    .map_err(|e| (e.to_string(), ErrorCause::Engine))
            }
            // Its mask thread failed: ours.
            Constraint::Lent => return Err(("the grammar was lost".into(), ErrorCause::Engine)),
            Constraint::Grammar(grammar) => grammar,
        };
        let refused = |e: String| (e, ErrorCause::Grammar);
        // Computed in parallel before the forward, unless it was not among that step's.
        grammar.compute_mask().map_err(refused)?;
        let sampled = self
            .output
            .sampler
            .sample(logits, prompt, generated, banned, grammar.mask())
            .map_err(|e| (e.to_string(), ErrorCause::Engine))?;
        grammar.consume(sampled.token).map_err(refused)?;
        Ok(sampled)
    }

    /// Appends a sampled token: its timing, its text, and whether it ends the sequence.
    pub fn append(&mut self, token: u32) -> StopStep {
        let now = Instant::now();
        match self.last_token {
            None => {
                self.timings.time_to_first_token = now - self.arrival;
                self.timings.prefill = now - self.first_scheduled.unwrap_or(self.arrival);
            }
            Some(last) => self.timings.inter_token.push(now - last),
        }
        self.last_token = Some(now);
        self.tokens.push(token);
        let delta = self.output.detokenizer.push(token);
        // `validate` keeps prompt + max_tokens within max_model_len.
        let step = self.output.stop.push(token, &delta);
        match &self.output.grammar {
            Constraint::Grammar(grammar) if step.finish.is_none() && grammar.is_finished() => {
                self.output.stop.complete(step)
            }
            _ => step,
        }
    }

    /// The last characters of the full decode, even if incomplete (a length finish).
    pub fn flush_text(&mut self) -> String {
        self.output.detokenizer.flush()
    }

    /// A token event of this completion.
    pub fn token_event(&self, sampled: Sampled, text: String) -> Event {
        Event::Token {
            index: self.index,
            id: sampled.token,
            text,
            logprob: sampled.logprob,
            top_logprobs: sampled.top_logprobs,
        }
    }

    /// The event that ends this completion, with its usage and timings.
    pub fn finished_event(
        &mut self,
        reason: FinishReason,
        stop_reason: Option<StopReason>,
        text: String,
    ) -> Event {
        let now = Instant::now();
        self.timings.end_to_end = now - self.arrival;
        if let Some(first) = self.first_scheduled {
            let first_token = first + self.timings.prefill;
            self.timings.decode = self
                .last_token
                .map_or(Default::default(), |l| l - first_token);
        }
        Event::Finished {
            index: self.index,
            text,
            reason,
            stop_reason,
            usage: Usage {
                prompt_tokens: self.prompt_len,
                completion_tokens: self.generated(),
                cached_tokens: self.cached_tokens,
            },
            timings: self.timings.clone(),
        }
    }

    /// Adds tokens past every limit, as only a bug could: for the checks that must catch it.
    #[cfg(test)]
    pub fn corrupt_with_tokens(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }
}
