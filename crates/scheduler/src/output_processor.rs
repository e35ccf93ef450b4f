//! What a step's forward gives each sequence: progress recorded, a token sampled, checked
//! against the stops, detokenized and sent to the request's stream; the other completions of
//! an `n > 1` request forked once its prompt is computed; and the sequences that ended taken
//! out of the running queue, their blocks freed.

use crate::detokenizer::{Detokenizer, TokenDecoder};
use crate::kv_cache_manager::KvCacheManager;
use crate::policy::{Queues, Scheduled};
use crate::request::{ErrorCause, Event};
use crate::sampling::{Sampler, SamplingParams};
use crate::sequence::{Fork, Output, SeqId, Sequence};
use crate::stats::EngineStats;
use crate::stop::{FinishReason, StopChecker, StopReason};
use std::sync::Arc;

/// How a sequence ended: reason, what stopped it, last text; `None` when it failed or was
/// cancelled, its request told already.
pub(crate) type Ending = Option<(FinishReason, Option<StopReason>, String)>;

/// Turns logits into output for the step's sequences.
pub(crate) struct OutputProcessor<'a> {
    pub kv: &'a KvCacheManager,
    pub decoder: &'a Arc<dyn TokenDecoder>,
    pub vocab_size: usize,
    /// The engine's `max_buffered_output_bytes`.
    pub buffer_limit: usize,
    pub stats: &'a mut EngineStats,
    /// Ids for the forks' new sequences.
    pub next_id: &'a mut u64,
}

impl OutputProcessor<'_> {
    /// Records the forward's progress, samples and reports; sequences that are over go to
    /// `ended`. `rows` are the logits of the entries of `ran` that reached their last token.
    pub fn process<P, E>(
        &mut self,
        queues: &mut Queues<P, E>,
        ran: &[Scheduled],
        rows: Vec<Vec<f32>>,
        ended: &mut Vec<(SeqId, Ending)>,
    ) {
        let mut rows = rows.into_iter();
        let mut siblings = Vec::new();
        for scheduled in ran {
            let id = scheduled.seq;
            let seq = queues.running_mut(id);
            let wants_logits = scheduled.span.end == seq.tokens().len();
            seq.advance(scheduled.span.len(), self.kv);
            if !wants_logits {
                continue;
            }
            if let Some(fork) = seq.take_fork() {
                siblings.extend(self.siblings(queues.running(id), fork));
            }
            let seq = queues.running_mut(id);
            let logits = rows.next().expect("counted in forward");
            let sampled = match seq.sample(&logits) {
                Ok(sampled) => sampled,
                Err((message, cause)) => {
                    seq.output().events.fail(message, cause);
                    self.stats.failed += 1;
                    ended.push((id, None));
                    continue;
                }
            };
            let step = seq.append(sampled.token);
            let stopped_by_token = matches!(
                step.stop_reason,
                Some(StopReason::Eos) | Some(StopReason::Token(_))
            );
            let Some(reason) = step.finish else {
                let token = seq.token_event(sampled, step.text);
                if !self.report(seq, token) {
                    ended.push((id, None));
                }
                continue;
            };
            let mut text = step.text;
            // A stop token has no text, but it is a completion token: with logprobs asked
            // for, it is reported (without text) so that logprobs cover every completion
            // token, as OpenAI's and vLLM's do.
            let report_token = !stopped_by_token || sampled.logprob.is_some();
            if report_token {
                if step.stop_reason.is_none() {
                    // Length: the full decode's last characters, even if incomplete.
                    text.push_str(&seq.flush_text());
                }
                let token_text = if stopped_by_token {
                    String::new()
                } else {
                    std::mem::take(&mut text)
                };
                let token = seq.token_event(sampled, token_text);
                if !self.report(seq, token) {
                    ended.push((id, None));
                    continue;
                }
            }
            ended.push((id, Some((reason, step.stop_reason, text))));
        }
        // Siblings go first in line, in order: they hold the prompt's blocks already.
        for sibling in siblings.into_iter().rev() {
            queues.waiting.push_front(sibling);
        }
    }

    /// Takes the step's ended sequences out of the running queue (their blocks go back to the
    /// pool), newest first, reporting the finish of those that have one.
    pub fn retire<P, E>(&mut self, queues: &mut Queues<P, E>, ended: Vec<(SeqId, Ending)>) {
        let mut at: Vec<(usize, Ending)> = ended
            .into_iter()
            .filter_map(|(id, end)| Some((queues.position(id)?, end)))
            .collect();
        at.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, end) in at {
            let mut seq = queues.running.remove(i);
            if let Some((reason, stop_reason, text)) = end {
                let finished = seq.finished_event(reason, stop_reason, text);
                if self.report(&seq, finished) {
                    self.stats.finished += 1;
                }
            }
        }
    }

    /// The other completions of an `n > 1` request whose prompt `parent` just computed.
    ///
    /// They share the prompt's full blocks; each recomputes the tokens of the last, partial
    /// block (fewer than a block) into a block of its own, so no block is written by two
    /// sequences. Each gets its own random stream: seed + index when seeded.
    fn siblings<P, E>(&mut self, parent: &Sequence<P, E>, fork: Fork) -> Vec<Sequence<P, E>> {
        let shared = (parent.tokens().len() - 1) / self.kv.block_size();
        (1..fork.n)
            .filter_map(|index| {
                let sampling = SamplingParams {
                    // Modular on purpose: any u64 is a seed, and seed + k names completion k
                    // of every seed, u64::MAX included.
                    seed: fork.sampling.seed.map(|s| s.wrapping_add(index as u64)),
                    ..fork.sampling.clone()
                };
                // Both were validated with the parent's identical settings.
                let output = Output {
                    sampler: Sampler::new(sampling, self.vocab_size).ok()?,
                    stop: StopChecker::new(fork.stop.clone(), self.vocab_size).ok()?,
                    detokenizer: Detokenizer::new(self.decoder.clone(), fork.skip_special_tokens),
                    grammar: fork.grammar.clone().into(),
                    events: parent.output().events.clone(),
                };
                let id = SeqId(*self.next_id);
                // One per completion: 2^64 outlast any server.
                *self.next_id += 1;
                Some(parent.sibling(id, index, shared, self.kv, output))
            })
            .collect()
    }

    /// Sends `event` to the sequence's reader unless the request is already over (its reader
    /// gone, or an error ended it) or the reader has too many bytes unread; past that the
    /// request is cancelled with an error event (counted once per request). False when the
    /// sequence must stop. Abandonment is checked before sending, never after: a reader that
    /// leaves once it has its `Finished` event must count as finished, not aborted.
    fn report<P, E>(&mut self, seq: &Sequence<P, E>, event: Event) -> bool {
        if seq.is_abandoned() {
            self.stats.aborted += 1;
            return false;
        }
        let limit = self.buffer_limit;
        let events = &seq.output().events;
        if let Err(overflow) = events.send(event, limit) {
            let ended = events.fail(
                format!(
                    "the request was cancelled: its client left {} bytes of output unread, more \
                 than the server's limit of {limit} (max_buffered_output_bytes)",
                    overflow.buffered
                ),
                ErrorCause::Engine,
            );
            if ended {
                self.stats.output_overflows += 1;
            }
            self.stats.aborted += 1;
            return false;
        }
        true
    }
}
