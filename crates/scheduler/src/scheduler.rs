//! The step: ask the policy what runs, encode the images it needs, check each sequence's
//! part, run one forward (retried in parts when it fails, to pin the failure on its
//! sequences), and hand the logits to output processing.
//!
//! The parts: `policy` (which sequences run: a `StepPlan`), `kv_cache_manager` (blocks and
//! the prefix cache), `image_encoding` (the encoder and its cache), `output_processor`
//! (sampling, stops, events, forks, finishing). This file ties them into [`Scheduler::add`] and
//! [`Scheduler::step`].

use crate::config::EngineConfig;
use crate::detokenizer::{Detokenizer, TokenDecoder};
use crate::encoder_cache::EncoderCache;
use crate::grammar::Grammar;
use crate::image_encoding::ImageEncoding;
use crate::kv_cache_manager::KvCacheManager;
use crate::output::EventSender;
use crate::output_processor::{Ending, OutputProcessor};
use crate::policy::{Queues, Scheduled, StepPlan};
use crate::request::{ErrorCause, Request};
use crate::runner::{contain, ForwardSeq, ModelRunner, RunnerError};
use crate::sampling::Sampler;
use crate::sequence::{Fork, Output, SeqId, Sequence};
use crate::stats::EngineStats;
use crate::stop::StopChecker;
use crate::validation::{validate, SubmitError};
use std::sync::Arc;
use std::time::Instant;

/// The engine's state and its step, driven by one thread.
pub struct Scheduler<R: ModelRunner> {
    runner: R,
    config: EngineConfig,
    kv: KvCacheManager,
    queues: Queues<R::Pixels, R::ImageEmbeds>,
    encoder_cache: EncoderCache<R::ImageEmbeds>,
    decoder: Arc<dyn TokenDecoder>,
    stats: EngineStats,
    /// The id of the next sequence: one per completion, so 2^64 outlast any server.
    next_id: u64,
}

impl<R: ModelRunner> Scheduler<R> {
    /// `decoder` turns tokens into text for every request.
    pub fn new(runner: R, config: EngineConfig, decoder: Arc<dyn TokenDecoder>) -> Self {
        Self {
            runner,
            decoder,
            kv: KvCacheManager::new(&config),
            encoder_cache: EncoderCache::new(config.encoder_cache_bytes),
            stats: EngineStats {
                blocks_total: config.num_blocks,
                ..EngineStats::default()
            },
            config,
            queues: Queues::new(),
            next_id: 0,
        }
    }

    /// Queues a request; its events go to `events`.
    pub fn add(
        &mut self,
        request: Request<R::Pixels>,
        events: EventSender,
    ) -> Result<(), SubmitError> {
        let vocab = self.runner.vocab_size();
        validate(&self.config, vocab, &request)?;
        let fork = (request.n > 1).then(|| Fork {
            n: request.n,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            skip_special_tokens: request.skip_special_tokens,
            grammar: request.grammar.clone(),
        });
        let output = Output {
            sampler: Sampler::new(request.sampling, vocab)?,
            stop: StopChecker::new(request.stop, vocab)?,
            detokenizer: Detokenizer::new(self.decoder.clone(), request.skip_special_tokens),
            grammar: request.grammar.into(),
            events,
        };
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.queues.waiting.push_back(Sequence::new(
            id,
            request.prompt,
            request.images,
            fork,
            output,
        ));
        self.update_stats();
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        !self.queues.is_empty()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Free blocks of the pool (cached prefixes included).
    pub fn free_blocks(&self) -> usize {
        self.kv.num_free()
    }

    /// Runs one step: one forward, or more when a failure must be traced to its sequences.
    ///
    /// One sequence's failure is never another's: a sequence whose planned positions, blocks
    /// or images are unsound is failed alone before the forward; when the batched encode or
    /// forward fails, the work is retried in parts until the failure is pinned on the
    /// sequences that fail alone (see `forward_isolating`), and only those fail.
    pub fn step(&mut self) {
        self.stats.aborted += self.queues.drop_abandoned() as u64;
        let plan =
            self.queues
                .schedule(&self.config, &self.kv, &self.encoder_cache, &mut self.stats);
        if !plan.is_empty() {
            let mut ended: Vec<(SeqId, Ending)> = Vec::new();
            let mut failed = ImageEncoding {
                runner: &mut self.runner,
                cache: &mut self.encoder_cache,
                stats: &mut self.stats,
            }
            .encode(&mut self.queues, &plan);
            let plan: StepPlan = plan
                .into_iter()
                .filter(|scheduled| {
                    if failed.iter().any(|f| f.0 == scheduled.seq) {
                        return false;
                    }
                    match self.unsound(scheduled) {
                        Some(reason) => {
                            failed.push((scheduled.seq, RunnerError(reason)));
                            false
                        }
                        None => true,
                    }
                })
                .collect();
            // The grammars' masks for the tokens this step samples do not depend on its
            // logits: they are computed on other threads while the forward runs.
            let grammars = self.take_grammars(&plan);
            let started = Instant::now();
            let ((ran, rows), masked) = std::thread::scope(|scope| {
                let masks = (!grammars.is_empty()).then(|| scope.spawn(|| compute_masks(grammars)));
                let forward = self.forward_isolating(&plan, &mut failed);
                (forward, masks.map(|m| m.join()))
            });
            self.stats.forward_time += started.elapsed();
            self.put_grammars(masked);
            for (id, error) in failed {
                self.fail(id, &error);
                ended.push((id, None));
            }
            let started = Instant::now();
            let mut output = OutputProcessor {
                kv: &self.kv,
                decoder: &self.decoder,
                vocab_size: self.runner.vocab_size(),
                buffer_limit: self.config.max_buffered_output_bytes,
                stats: &mut self.stats,
                next_id: &mut self.next_id,
            };
            output.process(&mut self.queues, &ran, rows, &mut ended);
            output.stats.sample_time += started.elapsed();
            output.retire(&mut self.queues, ended);
            self.stats.steps += 1;
            self.stats.tokens_last_step = ran.iter().map(|s| s.span.len()).sum();
        }
        self.update_stats();
    }

    /// The grammars of the plan's sequences that will sample after this step's forward.
    fn take_grammars(&mut self, plan: &[Scheduled]) -> Vec<(SeqId, Grammar)> {
        plan.iter()
            .filter_map(|scheduled| {
                let seq = self.queues.running_mut(scheduled.seq);
                if scheduled.span.end != seq.tokens().len() {
                    return None;
                }
                Some((scheduled.seq, seq.take_grammar()?))
            })
            .collect()
    }

    /// Gives the grammars back to their sequences after [`compute_masks`]. A mask that
    /// failed is computed again when its sequence samples, which fails it with the reason.
    /// Were the mask thread to panic (llguidance contains its own panics), the grammars stay
    /// lent and their sequences fail at sampling, never sample unconstrained.
    fn put_grammars(&mut self, masked: Option<std::thread::Result<Vec<MaskedGrammar>>>) {
        let Some(Ok(masked)) = masked else {
            return;
        };
        for (id, grammar, took) in masked {
            if let Some(took) = took {
                self.stats.grammar_masks.record(took);
            }
            if let Some(seq) = self.queues.running.iter_mut().find(|s| s.id() == id) {
                seq.put_grammar(grammar);
            }
        }
    }

    /// Why `scheduled` cannot run, if it cannot: positions past the model's length or the
    /// sequence's own tokens, a block table too short for them, or an image among them
    /// without embeddings. The policy never plans such a span; checking keeps a bug or an
    /// unforeseen input from reaching the batched forward, where it would fail every
    /// sequence of the step.
    fn unsound(&self, scheduled: &Scheduled) -> Option<String> {
        let seq = self.queues.running(scheduled.seq);
        let span = &scheduled.span;
        let (start, end) = (span.start, span.end);
        if span.is_empty() || start != seq.computed() || end > seq.tokens().len() {
            return Some(format!(
                "planned {} tokens from position {start} of a {}-token sequence",
                span.len(),
                seq.tokens().len()
            ));
        }
        if end > self.config.max_model_len {
            return Some(format!(
                "position {end} is past the maximum model length {}",
                self.config.max_model_len
            ));
        }
        let blocks = seq.num_blocks();
        if blocks
            .checked_mul(self.config.block_size)
            .is_none_or(|c| c < end)
        {
            return Some(format!("{blocks} KV blocks cannot hold {end} positions"));
        }
        let unencoded = seq
            .images()
            .iter()
            .position(|img| img.rows_in(span).is_some() && img.embeds().is_none());
        unencoded.map(|k| format!("image {k} has no embeddings"))
    }

    /// Runs the plan's forward; if it fails, runs each half of the plan, and so on down to
    /// single sequences, whose failure is then theirs alone and goes to `failed`. Returns the
    /// entries that ran, in plan order, and their logits rows.
    ///
    /// Rerunning a sequence is safe: a forward writes keys and values only at the positions it
    /// runs, past those computed, into blocks no other sequence reads yet (shared blocks are
    /// full and computed; blocks are registered in the prefix cache only after a successful
    /// forward, in output processing), so a rerun writes the same slots again with the same
    /// values and the sequence's tokens are those it would have had anyway. A model that fails
    /// every time fails every sequence after at most 2·len − 1 forwards.
    fn forward_isolating(
        &mut self,
        plan: &[Scheduled],
        failed: &mut Vec<(SeqId, RunnerError)>,
    ) -> (StepPlan, Vec<Vec<f32>>) {
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
                Err(e) if part.len() == 1 => failed.push((part[0].seq, e)),
                Err(_) => {
                    let (first, second) = part.split_at(part.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
            }
        }
        (ran, rows)
    }

    fn forward(&mut self, plan: &[Scheduled]) -> Result<Vec<Vec<f32>>, RunnerError> {
        let batch: Vec<ForwardSeq<'_, R::ImageEmbeds>> = plan
            .iter()
            .map(|scheduled| {
                let seq = self.queues.running(scheduled.seq);
                let span = &scheduled.span;
                let images = seq
                    .images()
                    .iter()
                    .filter_map(|img| Some((img.embeds()?.as_ref(), img.rows_in(span)?)))
                    .collect();
                ForwardSeq {
                    tokens: &seq.tokens()[span.clone()],
                    start: span.start,
                    block_table: seq.block_table(),
                    wants_logits: span.end == seq.tokens().len(),
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

    /// Ends the request of the running sequence `id`, whose encode, forward or checks failed,
    /// with `error`; the caller retires the sequence, the request's other completions stop at
    /// the next step.
    fn fail(&mut self, id: SeqId, error: &RunnerError) {
        self.queues
            .running(id)
            .output()
            .events
            .fail(error.to_string(), ErrorCause::Engine);
        self.stats.failed += 1;
    }

    fn update_stats(&mut self) {
        let s = &mut self.stats;
        s.running = self.queues.running.len();
        s.waiting = self.queues.waiting.len();
        s.blocks_used = self.kv.num_used();
        s.image_cache_queries = self.encoder_cache.queries;
        s.image_cache_hits = self.encoder_cache.hits;
    }
}

/// A grammar back from [`compute_masks`], with the time its mask took (`None` when it failed
/// or was computed already).
type MaskedGrammar = (SeqId, Grammar, Option<std::time::Duration>);

/// Each grammar's next mask, computed in parallel (rayon's pool).
fn compute_masks(mut grammars: Vec<(SeqId, Grammar)>) -> Vec<MaskedGrammar> {
    use rayon::prelude::*;
    let results: Vec<Option<std::time::Duration>> = grammars
        .par_iter_mut()
        .map(|(_, grammar)| grammar.compute_mask().ok().flatten())
        .collect();
    grammars
        .into_iter()
        .zip(results)
        .map(|((id, grammar), result)| (id, grammar, result))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{channel, RequestStream};
    use crate::request::Event;
    use crate::sampling::SamplingParams;
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
            grammar: None,
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
        assert_eq!(s.queues.running.len(), 2);
        // A block table too short for the span is caught too (the scheduler itself always
        // allocates enough before this check runs, so it is looked at directly): one block
        // for five positions, then enough.
        let seq = &mut s.queues.running[0];
        seq.release_blocks();
        assert!(seq.allocate(1, &s.kv));
        let planned = Scheduled {
            seq: seq.id(),
            span: 0..5,
        };
        let message = s.unsound(&planned).expect("unsound");
        assert!(message.contains("KV blocks cannot hold"), "{message}");
        assert!(s.queues.running[0].allocate(5, &s.kv));
        assert_eq!(s.unsound(&planned), None);

        s.queues.running[1].corrupt_with_tokens(&[5; 60]);
        while s.has_work() {
            s.step();
        }
        let first = events(&mut streams[0]);
        assert!(
            matches!(first.last(), Some(Event::Finished { .. })),
            "{first:?}"
        );
        match events(&mut streams[1]).last() {
            Some(Event::Error { message, .. }) => {
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
