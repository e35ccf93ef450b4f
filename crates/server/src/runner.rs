//! The model crate's InternVL behind the engine's `ModelRunner` interface.

use candle_core::Tensor;
use internvl_model::loader::pixel_batch;
use internvl_model::preprocess::PixelValues;
use internvl_model::tokenizer::Tokenizer;
use internvl_model::{InternVlChat, PagedKvCache, SequenceSlice};
use internvl_scheduler::runner::{ForwardSeq, ModelRunner, RunnerError};
use internvl_scheduler::TokenDecoder;
use std::sync::Arc;

/// InternVL with the KV cache the engine's block tables index into.
pub struct CandleRunner {
    model: Arc<InternVlChat>,
    cache: PagedKvCache,
}

impl CandleRunner {
    pub fn new(
        model: Arc<InternVlChat>,
        num_blocks: usize,
        block_size: usize,
    ) -> candle_core::Result<Self> {
        let cache = model.new_kv_cache(num_blocks, block_size)?;
        Ok(Self { model, cache })
    }
}

fn failed(e: candle_core::Error) -> RunnerError {
    RunnerError(e.to_string())
}

impl ModelRunner for CandleRunner {
    type Pixels = PixelValues;
    /// One image's LLM embeddings [tokens, hidden].
    type ImageEmbeds = Tensor;

    fn encode_images(&mut self, images: &[&PixelValues]) -> Result<Vec<Tensor>, RunnerError> {
        let batch = pixel_batch(images, self.model.device()).map_err(failed)?;
        let embeds = self.model.encode_images(&batch).map_err(failed)?;
        (0..images.len())
            .map(|i| embeds.get(i).map_err(failed))
            .collect()
    }

    fn vocab_size(&self) -> usize {
        self.model.config().llm.vocab_size
    }

    fn embeds_bytes(&self, embeds: &Tensor) -> usize {
        embeds.elem_count() * embeds.dtype().size_in_bytes()
    }

    fn forward(&mut self, batch: &[ForwardSeq<'_, Tensor>]) -> Result<Vec<Vec<f32>>, RunnerError> {
        let mut embeddings = Vec::with_capacity(batch.len());
        let mut slices = Vec::with_capacity(batch.len());
        for seq in batch {
            let rows = seq
                .images
                .iter()
                .map(|(e, r)| e.narrow(0, r.start, r.len()))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(failed)?;
            let rows = if rows.is_empty() {
                None
            } else {
                Some(Tensor::cat(&rows, 0).map_err(failed)?)
            };
            embeddings.push(
                self.model
                    .embed(seq.tokens, rows.as_ref())
                    .map_err(failed)?,
            );
            slices.push(SequenceSlice {
                start: seq.start,
                len: seq.tokens.len(),
                block_table: seq.block_table.clone(),
                wants_logits: seq.wants_logits,
            });
        }
        let embeddings = Tensor::cat(&embeddings, 0).map_err(failed)?;
        let logits = self
            .model
            .forward(&embeddings, &slices, &mut self.cache)
            .map_err(failed)?;
        logits.to_vec2().map_err(failed)
    }
}

/// The model's tokenizer as the engine's detokenizer sees it.
pub struct TokenizerDecoder(pub Arc<Tokenizer>);

impl TokenDecoder for TokenizerDecoder {
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.0.decode(ids, skip_special_tokens)
    }
}
