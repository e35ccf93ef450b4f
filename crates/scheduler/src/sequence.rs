//! One request's state inside the engine.

use crate::block_pool::{Block, BlockHash};
use crate::detokenizer::Detokenizer;
use crate::output::EventSender;
use crate::prefix_hash::{block_hash, ImagePart};
use crate::request::{ImageInput, RequestTimings};
use crate::sampling::Sampler;
use crate::sampling::SamplingParams;
use crate::stop::StopChecker;
use crate::stop::StopParams;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// An image of the sequence and, once encoded, its embeddings.
pub(crate) struct SeqImage<P, E> {
    pub input: ImageInput<P>,
    pub embeds: Option<Arc<E>>,
}

impl<P, E> Clone for SeqImage<P, E> {
    fn clone(&self) -> Self {
        SeqImage {
            input: self.input.clone(),
            embeds: self.embeds.clone(),
        }
    }
}

impl<P, E> SeqImage<P, E> {
    pub fn range(&self) -> Range<usize> {
        // `validate` checked that offset + num_tokens fits in the prompt.
        self.input.offset..self.input.offset + self.input.num_tokens
    }
}

/// What the siblings of an `n > 1` request are made from, once its prompt is computed.
pub(crate) struct Fork {
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    pub skip_special_tokens: bool,
}

pub(crate) struct Sequence<P, E> {
    /// Which completion of its request this is.
    pub index: usize,
    /// Set on the first completion of an `n > 1` request until its prompt is computed.
    pub fork: Option<Fork>,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub images: Vec<SeqImage<P, E>>,
    /// Leading tokens whose keys and values are in `blocks`.
    pub computed: usize,
    pub blocks: Vec<Block>,
    /// Chained hashes of the full blocks of `tokens`, computed as needed.
    pub hashes: Vec<BlockHash>,
    /// Full blocks already registered in the prefix cache.
    pub registered: usize,
    pub sampler: Sampler,
    pub stop: StopChecker,
    pub detokenizer: Detokenizer,
    /// Shared by the request's completions.
    pub events: EventSender,
    pub cached_tokens: usize,
    pub arrival: Instant,
    pub first_scheduled: Option<Instant>,
    pub last_token: Option<Instant>,
    pub timings: RequestTimings,
}

impl<P, E> Sequence<P, E> {
    /// No overflow: tokens only grow from the prompt.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to run through the model before the next token can be sampled. No
    /// overflow: `computed` never passes `tokens.len()` (it grows by planned spans of the
    /// remaining tokens, and a reset or a cache hit sets it lower).
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Blocks needed to hold `tokens` tokens (a rounding-up division: cannot overflow).
    pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
        tokens.div_ceil(block_size)
    }

    /// Whether the caller dropped its stream, or an error already ended the request.
    pub fn is_abandoned(&self) -> bool {
        self.events.is_abandoned()
    }

    /// Extends `hashes` to cover the first `full_blocks` blocks.
    pub fn hash_blocks(&mut self, full_blocks: usize, block_size: usize) {
        while self.hashes.len() < full_blocks {
            let b = self.hashes.len();
            let span = b * block_size..(b + 1) * block_size;
            let parts: Vec<ImagePart> = self
                .images
                .iter()
                .filter(|img| img.range().start < span.end && span.start < img.range().end)
                .map(|img| {
                    let first_row = span.start.max(img.input.offset) - img.input.offset;
                    (img.input.content_hash, first_row)
                })
                .collect();
            let parent = self.hashes.last().copied();
            self.hashes
                .push(block_hash(parent, &self.tokens[span], &parts));
        }
    }

    /// Drops every block (preemption): the sequence will be recomputed from scratch.
    pub fn reset(&mut self) {
        self.blocks.clear();
        self.computed = 0;
        self.registered = 0;
        self.timings.preemptions += 1;
    }
}
