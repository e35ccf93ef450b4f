//! An image of a sequence, its placeholder span and, once encoded, its embeddings; and the
//! one test of which of its rows a token range holds.

use crate::content_hash::ContentHash;
use crate::request::ImageInput;
use std::ops::Range;
use std::sync::Arc;

/// An image of the sequence and, once encoded, its embeddings.
pub(crate) struct SeqImage<P, E> {
    input: ImageInput<P>,
    embeds: Option<Arc<E>>,
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
    /// An image not encoded yet.
    pub fn new(input: ImageInput<P>) -> Self {
        Self {
            input,
            embeds: None,
        }
    }

    /// The image's placeholder positions in the prompt.
    pub fn range(&self) -> Range<usize> {
        // `validate` checked that offset + num_tokens fits in the prompt.
        self.input.offset..self.input.offset + self.input.num_tokens
    }

    /// The rows of the image's embeddings whose placeholders lie in the token range `span`,
    /// or `None` when the image has no placeholder there: the one test of an image against a
    /// span, for scheduling, encoding, hashing and the forward alike.
    pub fn rows_in(&self, span: &Range<usize>) -> Option<Range<usize>> {
        let range = self.range();
        (range.start < span.end && span.start < range.end).then(|| {
            span.start.max(range.start) - range.start..span.end.min(range.end) - range.start
        })
    }

    pub fn content_hash(&self) -> ContentHash {
        self.input.content_hash
    }

    pub fn pixels(&self) -> &Arc<P> {
        &self.input.pixels
    }

    pub fn embeds(&self) -> Option<&Arc<E>> {
        self.embeds.as_ref()
    }

    pub fn set_embeds(&mut self, embeds: Arc<E>) {
        self.embeds = Some(embeds);
    }
}
