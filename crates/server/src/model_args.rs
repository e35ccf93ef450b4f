//! The model a command-line run loads: which weights, on which device, in which precision.
//! Shared by `generate` and `bench`; `serve` takes the same through its settings.

use internvl_model::LoadedModel;
use internvl_server::device::{demo_model_dir, parse_device, parse_dtype};
use internvl_server::loading::load_model;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Checkpoint directory; the bundled demo checkpoint (random weights) when omitted. With
    /// --random-weights, only its tokenizer is used.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Random weights for the model this config.json (InternVLChatConfig format) describes,
    /// e.g. config/models/internvl-chat-chinese-v1.1.json, instead of a checkpoint's.
    #[arg(long, value_name = "CONFIG_JSON")]
    pub random_weights: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

impl ModelArgs {
    /// The checkpoint (or, with random weights, tokenizer) directory: `--model` or the demo.
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(demo_model_dir)
    }

    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        parse_device(&self.device)
    }

    /// Loads the model onto `device`.
    pub fn load(&self, device: &candle_core::Device) -> anyhow::Result<LoadedModel> {
        let dtype = parse_dtype(&self.dtype)?;
        load_model(
            &self.dir(),
            self.random_weights.as_deref(),
            device,
            dtype,
            internvl_model::AttentionChoice::Auto,
            None,
        )
    }
}
