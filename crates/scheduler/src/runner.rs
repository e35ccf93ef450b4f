//! The small interface through which the engine drives a model.

use std::ops::Range;

/// A model failure; the requests of the failed step get it as their error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RunnerError(pub String);

/// Runs one call into the model, turning a panic inside it into that call's error. A panic
/// that one sequence's input provokes (a shape the model does not expect, a kernel's
/// assertion) must fail that sequence, found like any other failure by the step's retries,
/// rather than end the step thread and every request with it. The model's state after a
/// panic is that of a failed call: a rerun rewrites the KV slots the call may have written.
pub(crate) fn contain<T>(call: impl FnOnce() -> Result<T, RunnerError>) -> Result<T, RunnerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Err(RunnerError(format!("the model panicked: {what}")))
    })
}

/// One sequence's share of a forward: `tokens` at positions `start..start + tokens.len()`.
pub struct ForwardSeq<'a, E> {
    pub tokens: &'a [u32],
    pub start: usize,
    /// Cache blocks covering positions `0..start + tokens.len()`, in order.
    pub block_table: Vec<u32>,
    /// Whether to return logits for the last token.
    pub wants_logits: bool,
    /// For each image with placeholders among `tokens`, in order: its embeddings and the rows
    /// of them that fill those placeholders.
    pub images: Vec<(&'a E, Range<usize>)>,
}

/// A model that encodes images and runs batched forwards over a paged KV cache it owns.
pub trait ModelRunner: Send + 'static {
    /// Preprocessed image input.
    type Pixels: Send + Sync + 'static;
    /// Encoder output of one image.
    type ImageEmbeds: Send + Sync + 'static;

    /// Encodes several images in one batch.
    fn encode_images(
        &mut self,
        images: &[&Self::Pixels],
    ) -> Result<Vec<Self::ImageEmbeds>, RunnerError>;

    /// Entries of a logits row.
    fn vocab_size(&self) -> usize;

    /// Memory one encoder output takes, for the encoder cache's budget.
    fn embeds_bytes(&self, embeds: &Self::ImageEmbeds) -> usize;

    /// Runs the batch, writing its keys and values into the blocks; returns one logits row per
    /// sequence that wants them, in batch order.
    fn forward(
        &mut self,
        batch: &[ForwardSeq<'_, Self::ImageEmbeds>],
    ) -> Result<Vec<Vec<f32>>, RunnerError>;
}
