//! Which sequences run in a step, and how many tokens each: the scheduling policy.
//!
//! As vLLM v1's: running sequences first, oldest first, each taking the tokens it still needs
//! (one for a decode, a chunk for a prefill) from the step's token budget; when a sequence
//! needs a block and none is free, the blocks that waiting sequences hold are given back
//! first, then the newest running sequence is preempted (blocks dropped, recomputed later,
//! first in line). Waiting sequences are admitted in arrival order while budget and blocks
//! last, and not at all in a step that preempted. Images in a span must be encoded already
//! or fit in the step's encoder budget.
//!
//! The result is a [`StepPlan`]: sequences by id with the token range each runs, valid
//! whatever happens to the queues' order afterwards.

use crate::config::EngineConfig;
use crate::encoder_cache::EncoderCache;
use crate::kv_cache_manager::KvCacheManager;
use crate::sequence::{SeqId, Sequence};
use crate::stats::EngineStats;
use std::collections::VecDeque;
use std::ops::Range;

/// One sequence's part of a step: the tokens at `span` (from its computed ones on) run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scheduled {
    pub seq: SeqId,
    pub span: Range<usize>,
}

/// A step's work, in the order the sequences run (the running queue's).
pub(crate) type StepPlan = Vec<Scheduled>;

/// The engine's sequences: those waiting to start (or restart), in order, and those
/// running, oldest first.
pub(crate) struct Queues<P, E> {
    pub waiting: VecDeque<Sequence<P, E>>,
    pub running: Vec<Sequence<P, E>>,
}

impl<P, E> Queues<P, E> {
    pub fn new() -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Where the running sequence `id` is, if it runs.
    pub fn position(&self, id: SeqId) -> Option<usize> {
        self.running.iter().position(|s| s.id() == id)
    }

    /// The running sequence `id`: every id of a step's plan names one.
    pub fn running_mut(&mut self, id: SeqId) -> &mut Sequence<P, E> {
        let at = self.position(id).expect("planned sequences are running");
        &mut self.running[at]
    }

    pub fn running(&self, id: SeqId) -> &Sequence<P, E> {
        let at = self.position(id).expect("planned sequences are running");
        &self.running[at]
    }

    /// Drops the sequences whose reader went away; returns how many.
    pub fn drop_abandoned(&mut self) -> usize {
        let before = self.waiting.len() + self.running.len();
        self.waiting.retain(|s| !s.is_abandoned());
        self.running.retain(|s| !s.is_abandoned());
        before - self.waiting.len() - self.running.len()
    }

    /// Decides this step's plan, allocating the blocks it needs.
    ///
    /// Every `computed + n` below is at most the sequence's token count (`n` is capped by
    /// `remaining()`), itself at most `max_model_len` (`validate` checked prompt + max_tokens
    /// and generation stops at max_tokens), so none can overflow.
    pub fn schedule(
        &mut self,
        config: &EngineConfig,
        kv: &KvCacheManager,
        encoder_cache: &EncoderCache<E>,
        stats: &mut EngineStats,
    ) -> StepPlan {
        let mut budget = config.max_num_batched_tokens;
        let mut encodes = Encodes {
            cache: encoder_cache,
            left: config.max_images_per_step,
        };
        let mut plan = Vec::new();
        let mut preempted = false;
        // Whether the blocks of waiting sequences were given back this step (at most once).
        let mut released = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let seq = &self.running[i];
            let n = encodes.limit(seq, seq.remaining().min(budget));
            if n == 0 {
                i += 1;
                continue;
            }
            let mut fits = true;
            while !self.running[i].allocate(n, kv) {
                // Blocks held by waiting sequences go before any running one's work.
                if !released {
                    released = true;
                    if self.release_waiting_blocks() {
                        continue;
                    }
                }
                let victim = self.running.len() - 1;
                let mut seq = self.running.pop().expect("index i is in range");
                seq.preempt();
                stats.preemptions += 1;
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
            let seq = &self.running[i];
            plan.push(Scheduled {
                seq: seq.id(),
                span: seq.span(n),
            });
            budget -= n;
            i += 1;
        }
        while !preempted && budget > 0 && self.running.len() < config.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let looked_up = seq.take_cached_prefix(kv);
            let n = encodes.limit(seq, seq.remaining().min(budget));
            if n == 0 || !seq.allocate(n, kv) {
                // Give cached blocks back rather than pin them while waiting.
                seq.release_blocks();
                // With nothing running, nothing will free a block: what keeps the first in
                // line from starting is the blocks that those behind it hold.
                if self.running.is_empty() && !released {
                    released = true;
                    if self.release_waiting_blocks() {
                        continue;
                    }
                }
                break;
            }
            let mut seq = self.waiting.pop_front().expect("checked above");
            // Counted in tokens, as vLLM does, and once per admission.
            stats.prefix_queries += looked_up as u64;
            stats.prefix_hits += seq.computed() as u64;
            seq.mark_scheduled();
            plan.push(Scheduled {
                seq: seq.id(),
                span: seq.span(n),
            });
            self.running.push(seq);
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
        for seq in self.waiting.iter_mut().filter(|s| s.num_blocks() > 0) {
            seq.release_blocks();
            released = true;
        }
        released
    }
}

/// The step's encoder budget: images it may still encode.
struct Encodes<'a, E> {
    cache: &'a EncoderCache<E>,
    left: usize,
}

impl<E> Encodes<'_, E> {
    /// How many of `want` tokens `seq` can run given its images: each image in the span must
    /// be encoded or cached, or fit in what is left of the budget (and then takes its place).
    fn limit<P>(&mut self, seq: &Sequence<P, E>, want: usize) -> usize {
        let span = seq.span(want);
        for image in seq.images() {
            if image.rows_in(&span).is_none()
                || image.embeds().is_some()
                || self.cache.contains(image.content_hash())
            {
                continue;
            }
            if self.left > 0 {
                self.left -= 1;
                continue;
            }
            return image.range().start.max(span.start) - span.start;
        }
        want
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detokenizer::{Detokenizer, TokenDecoder};
    use crate::output::channel;
    use crate::sampling::{Sampler, SamplingParams};
    use crate::sequence::{Constraint, Output};
    use crate::stop::{StopChecker, StopParams};
    use std::sync::Arc;

    fn sequence(id: u64, prompt_len: usize) -> Sequence<(), ()> {
        let decoder: Arc<dyn TokenDecoder> = Arc::new(|ids: &[u32], _: bool| format!("{ids:?}"));
        let stop = StopParams {
            max_tokens: 8,
            ..StopParams::default()
        };
        let output = Output {
            sampler: Sampler::new(SamplingParams::default(), 8).unwrap(),
            stop: StopChecker::new(stop, 8).unwrap(),
            detokenizer: Detokenizer::new(decoder, true),
            grammar: Constraint::Free,
            events: channel().0,
        };
        Sequence::new(SeqId(id), vec![5; prompt_len], Vec::new(), None, output)
    }

    /// The plan names sequences by id: when the newest is preempted for the oldest's next
    /// block, the plan holds the oldest alone, and the preempted one waits first in line with
    /// nothing computed.
    #[test]
    fn preemption_leaves_a_plan_of_the_survivors_by_id() {
        let mut config = EngineConfig::new(3, 4, 64);
        config.enable_prefix_caching = false;
        let kv = KvCacheManager::new(&config);
        let cache = EncoderCache::new(0);
        let mut stats = EngineStats::default();
        let mut queues = Queues::new();
        queues.waiting.extend([sequence(7, 8), sequence(9, 4)]);

        let plan = queues.schedule(&config, &kv, &cache, &mut stats);
        let want = [(SeqId(7), 0..8), (SeqId(9), 0..4)];
        let got: Vec<_> = plan.iter().map(|s| (s.seq, s.span.clone())).collect();
        assert_eq!(got, want);
        for scheduled in &plan {
            let seq = queues.running_mut(scheduled.seq);
            seq.advance(scheduled.span.len(), &kv);
            seq.append(1);
        }
        assert_eq!(kv.num_free(), 0);

        let plan = queues.schedule(&config, &kv, &cache, &mut stats);
        let want = Scheduled {
            seq: SeqId(7),
            span: 8..9,
        };
        assert_eq!(plan, [want]);
        assert_eq!(stats.preemptions, 1);
        let preempted = &queues.waiting[0];
        assert_eq!(preempted.id(), SeqId(9));
        assert_eq!((preempted.computed(), preempted.num_blocks()), (0, 0));
        assert_eq!(queues.running(SeqId(7)).num_blocks(), 3);
    }
}
