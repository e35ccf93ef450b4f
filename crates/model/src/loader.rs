//! Loading a checkpoint directory into everything a chat needs: model, tokenizer, template
//! and image preprocessing, checked against each other.

use crate::backends::Backends;
use crate::config::{ConfigError, InternVlConfig};
use crate::model::InternVlChat;
use crate::param_count::ParamCount;
use crate::preprocess::{PixelValues, PreprocessConfig};
use crate::prompt::{ChatMessage, PromptError, PromptTemplate, IMG_CONTEXT};
use crate::random_weights::random_model;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{Checkpoint, ProgressFn, WeightsError};
use candle_core::{Device, Tensor};
use std::path::Path;
use std::sync::Arc;

/// Why a checkpoint directory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error("the tokenizer has no `{0}` token")]
    MissingToken(&'static str),
    #[error("the prompt has {found} image placeholder blocks for {images} images (image tokens in the text?)")]
    ImagePlaceholders { found: usize, images: usize },
    #[error("the tokenizer has {tokenizer} tokens but the model's vocabulary only {model}")]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error("building the model: {0}")]
    Model(#[from] candle_core::Error),
}

/// A loaded checkpoint: the model and the text and image front ends that feed it.
pub struct LoadedModel {
    /// Shared: the engine's runner holds it too.
    pub model: Arc<InternVlChat>,
    /// Shared: the engine's detokenizer and every reply hold it too.
    pub tokenizer: Arc<Tokenizer>,
    pub template: PromptTemplate,
    pub preprocess: PreprocessConfig,
}

/// A conversation turned into model input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    pub text: String,
    pub ids: Vec<u32>,
    pub num_images: usize,
    /// Index in `ids` of each image's first placeholder token, in order.
    pub image_offsets: Vec<usize>,
}

impl LoadedModel {
    /// Loads `dir` onto the device, in the dtype and with the layers `backends` name.
    pub fn load(dir: &Path, backends: &Backends) -> Result<Self, LoadError> {
        Self::load_with_progress(dir, backends, None)
    }

    /// As [`LoadedModel::load`], reporting each tensor read to `progress`.
    pub fn load_with_progress(
        dir: &Path,
        backends: &Backends,
        progress: Option<ProgressFn>,
    ) -> Result<Self, LoadError> {
        let config = InternVlConfig::from_dir(dir)?;
        let front = FrontEnd::new(&config, dir)?;
        let mut checkpoint = Checkpoint::open(dir)?;
        if let Some(progress) = progress {
            checkpoint = checkpoint.with_progress(progress);
        }
        let model = InternVlChat::new(
            config,
            Box::new(checkpoint),
            front.image_context_id,
            backends,
        )?;
        Ok(front.with_model(model))
    }

    /// The model `config_file` (a `config.json`) describes, with random weights drawn from
    /// `seed` instead of a checkpoint's, and the tokenizer of `tokenizer_dir`: for benchmarks
    /// where the real weights cannot be had. Also returns how many parameters were made.
    pub fn load_random(
        config_file: &Path,
        tokenizer_dir: &Path,
        backends: &Backends,
        seed: u64,
    ) -> Result<(Self, ParamCount), LoadError> {
        let config = InternVlConfig::from_file(config_file)?;
        let front = FrontEnd::new(&config, tokenizer_dir)?;
        let (model, params) = random_model(config, front.image_context_id, backends, seed)?;
        Ok((front.with_model(model), params))
    }

    /// Renders and tokenizes a conversation.
    pub fn encode_prompt(&self, messages: &[ChatMessage]) -> Result<EncodedPrompt, LoadError> {
        let prompt = self.template.render(messages)?;
        let ids = self.tokenizer.encode(&prompt.text)?;
        let context = self.model.image_context_id();
        let per_image = self.model.config().num_image_tokens();
        let image_offsets: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i] == context && (i == 0 || ids[i - 1] != context))
            .collect();
        let well_formed = image_offsets.len() == prompt.num_images
            && image_offsets.iter().all(|&o| {
                ids.get(o..o + per_image)
                    .is_some_and(|run| run.iter().all(|&t| t == context))
                    && ids.get(o + per_image) != Some(&context)
            });
        if !well_formed {
            return Err(LoadError::ImagePlaceholders {
                found: image_offsets.len(),
                images: prompt.num_images,
            });
        }
        Ok(EncodedPrompt {
            text: prompt.text,
            ids,
            num_images: prompt.num_images,
            image_offsets,
        })
    }
}

/// Everything a chat needs besides the weights: the tokenizer, checked against the model's
/// vocabulary, the prompt template and the image preprocessing.
struct FrontEnd {
    tokenizer: Tokenizer,
    image_context_id: u32,
    template: PromptTemplate,
    preprocess: PreprocessConfig,
}

impl FrontEnd {
    fn new(config: &InternVlConfig, tokenizer_dir: &Path) -> Result<Self, LoadError> {
        let tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
        let image_context_id = tokenizer
            .token_to_id(IMG_CONTEXT)
            .ok_or(LoadError::MissingToken(IMG_CONTEXT))?;
        // Smaller is fine: the rows past the tokenizer's ids are simply never looked up.
        if tokenizer.vocab_size() > config.llm.vocab_size {
            return Err(LoadError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: config.llm.vocab_size,
            });
        }
        let template = PromptTemplate::new(
            &config.template,
            config.system_message.clone(),
            config.num_image_tokens(),
        )?;
        let preprocess = PreprocessConfig {
            image_size: config.image_size as u32,
            ..PreprocessConfig::default()
        };
        Ok(Self {
            tokenizer,
            image_context_id,
            template,
            preprocess,
        })
    }

    fn with_model(self, model: InternVlChat) -> LoadedModel {
        LoadedModel {
            model: Arc::new(model),
            tokenizer: Arc::new(self.tokenizer),
            template: self.template,
            preprocess: self.preprocess,
        }
    }
}

/// Stacks preprocessed images into a vision-encoder batch [B, 3, H, W] on `device`.
pub fn pixel_batch(images: &[&PixelValues], device: &Device) -> candle_core::Result<Tensor> {
    let tensors = images
        .iter()
        .map(|p| {
            Tensor::from_slice(
                &p.data,
                (3, p.height as usize, p.width as usize),
                &Device::Cpu,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&tensors, 0)?.to_device(device)
}
