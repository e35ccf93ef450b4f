//! Engine requests from an encoded conversation and its images: the one place that ties each
//! image to its placeholder tokens in the prompt.

use internvl_model::preprocess::PixelValues;
use internvl_model::{EncodedPrompt, LoadedModel};
use internvl_scheduler::{ContentHash, Grammar, ImageInput, Request, SamplingParams, StopParams};
use std::sync::Arc;

/// An image ready for the engine: its pixels, and the SHA-256 of its encoded file, so equal
/// images (and only those) share encoder outputs and cached blocks.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub content_hash: ContentHash,
    pub pixels: Arc<PixelValues>,
}

impl PreparedImage {
    /// The image whose encoded file is `file`, preprocessed into `pixels`.
    pub fn new(file: &[u8], pixels: PixelValues) -> PreparedImage {
        PreparedImage {
            content_hash: ContentHash::of(file),
            pixels: Arc::new(pixels),
        }
    }
}

/// What to generate, apart from the prompt.
#[derive(Debug, Clone)]
pub struct Generation {
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Completions of the one prompt.
    pub n: usize,
    /// The grammar every completion follows, compiled for this model.
    pub grammar: Option<Grammar>,
}

/// The request for `prompt` whose images, in order, are `images`.
pub fn request(
    loaded: &LoadedModel,
    prompt: &EncodedPrompt,
    images: Vec<PreparedImage>,
    generation: Generation,
) -> Request<PixelValues> {
    Request {
        images: image_inputs(loaded, prompt, images),
        prompt: prompt.ids.clone(),
        sampling: generation.sampling,
        stop: generation.stop,
        skip_special_tokens: true,
        n: generation.n,
        grammar: generation.grammar,
    }
}

/// The engine's image inputs for `prompt`: each image at its placeholders.
pub fn image_inputs(
    loaded: &LoadedModel,
    prompt: &EncodedPrompt,
    images: Vec<PreparedImage>,
) -> Vec<ImageInput<PixelValues>> {
    let num_tokens = loaded.model.config().num_image_tokens();
    prompt
        .image_offsets
        .iter()
        .zip(images)
        .map(|(&offset, image)| ImageInput {
            offset,
            num_tokens,
            content_hash: image.content_hash,
            pixels: image.pixels,
        })
        .collect()
}
