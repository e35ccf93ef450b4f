//! InternVL-Chat: vision encoder, pixel shuffle, projector and LLaMA, built from any source
//! of tensors named as in the checkpoint (the checkpoint itself, random weights) with the
//! layers the resolved [`Backends`] name.

use crate::backends::Backends;
use crate::config::InternVlConfig;
use crate::kv_cache::{PagedKvCache, SequenceSlice};
use crate::llama::Llama;
use crate::projector::{pixel_shuffle, Projector};
use crate::vision::InternVisionModel;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// The whole model, ready to encode images and run the language model.
pub struct InternVlChat {
    config: InternVlConfig,
    vision: InternVisionModel,
    projector: Projector,
    llm: Llama,
    image_context_id: u32,
    device: Device,
    dtype: DType,
    kv_dtype: DType,
}

impl InternVlChat {
    /// Builds the model `config` describes from `weights`, any source of tensors named as in
    /// the checkpoint (a [`crate::Checkpoint`], random weights), on the device and with the
    /// layers `backends` name.
    ///
    /// `image_context_id` is the tokenizer's `<IMG_CONTEXT>` id: the positions whose
    /// embeddings the image features replace.
    pub fn new(
        config: InternVlConfig,
        weights: Box<dyn SimpleBackend>,
        image_context_id: u32,
        backends: &Backends,
    ) -> Result<Self> {
        let vb = VarBuilder::from_backend(weights, backends.dtype(), backends.device().clone());
        let vision = InternVisionModel::new(
            &config.vision,
            config.image_size,
            config.vision_layers_used(),
            backends,
            vb.pp("vision_model"),
        )?;
        let factor = config.shuffle_factor();
        let projector = Projector::new(
            config.vision.hidden_size * factor * factor,
            config.llm.hidden_size,
            backends,
            vb.pp("mlp1"),
        )?;
        let llm = Llama::new(&config.llm, backends, vb.pp("language_model"))?;
        Ok(Self {
            vision,
            projector,
            llm,
            image_context_id,
            device: backends.device().clone(),
            dtype: backends.dtype(),
            kv_dtype: backends.kv_dtype(),
            config,
        })
    }

    pub fn config(&self) -> &InternVlConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn image_context_id(&self) -> u32 {
        self.image_context_id
    }

    /// A KV cache of `num_blocks` blocks of `block_size` tokens for this model.
    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<PagedKvCache> {
        PagedKvCache::new(
            &self.config.llm,
            num_blocks,
            block_size,
            self.kv_dtype,
            &self.device,
        )
    }

    /// The KV cache's element type (`Backends::kv_dtype`).
    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Encodes preprocessed images [B, 3, H, W] into LLM embeddings [B, tokens, hidden].
    pub fn encode_images(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pixel_values = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let hidden = self.vision.forward(&pixel_values)?;
        let patches = hidden.narrow(1, 1, hidden.dim(1)? - 1)?; // drop CLS
        let shuffled = pixel_shuffle(
            &patches,
            self.config.shuffle_factor(),
            self.config.ps_version,
        )?;
        self.projector.forward(&shuffled)
    }

    /// Input embeddings [tokens, hidden] for `ids`, with the rows of `image_embeds`
    /// [n, hidden] placed, in order, at the `<IMG_CONTEXT>` positions; `n` must equal their
    /// count.
    pub fn embed(&self, ids: &[u32], image_embeds: Option<&Tensor>) -> Result<Tensor> {
        let id_tensor = Tensor::new(ids, &self.device)?;
        let text = self.llm.embed(&id_tensor)?;
        let placeholders = ids
            .iter()
            .filter(|&&id| id == self.image_context_id)
            .count();
        let provided = match image_embeds {
            Some(e) => e.dim(0)?,
            None => 0,
        };
        if placeholders != provided {
            candle_core::bail!(
                "{placeholders} <IMG_CONTEXT> tokens but {provided} image embedding rows"
            );
        }
        let Some(images) = image_embeds.filter(|_| provided > 0) else {
            return Ok(text);
        };
        // One gather from [text rows; image rows] puts every row in place.
        let mut next_image = ids.len() as u32;
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if id == self.image_context_id {
                    next_image += 1;
                    next_image - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let images = images.to_device(&self.device)?.to_dtype(text.dtype())?;
        Tensor::cat(&[&text, &images], 0)?.index_select(&Tensor::new(rows, &self.device)?, 0)
    }

    /// Runs the language model over a packed batch; see [`Llama::forward`].
    pub fn forward(
        &self,
        embeddings: &Tensor,
        slices: &[SequenceSlice],
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        self.llm.forward(embeddings, slices, cache)
    }
}
