//! The model a command-line run loads: which weights, on which device, in which precision,
//! with which attention.
//! Shared by `generate` and `bench`; `serve` takes the same through its settings.

use internvl_model::quant::{parse_quant, Quantization, WeightQuant};
use internvl_model::AttentionChoice;
use internvl_server::device::{demo_model_dir, parse_device, parse_dtype};
use internvl_server::service::model::ModelSource;
use internvl_server::settings::defaults;
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
    #[arg(long, default_value = defaults::DEVICE)]
    pub device: String,
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16.
    #[arg(long, default_value = defaults::DTYPE)]
    pub dtype: String,
    /// Attention: auto (the device's fastest), kernels (the CUDA kernels) or matmul (candle's
    /// ops everywhere).
    #[arg(long, env = "INTERNVL_ATTENTION", default_value = defaults::ATTENTION)]
    pub attention: AttentionChoice,
    /// Quantize the language model's linear layers while loading: none, q8_0, q6k, q5k, q4k
    /// (or q5_1, q5_0, q4_0). The LM head gets at least q6k.
    // Spelled out so that clap takes the parser's `Option` as the value ("none") rather than
    // as an optional flag.
    #[arg(long, default_value = "none", value_parser = parse_quant)]
    pub quantize: std::option::Option<WeightQuant>,
    /// Quantize the vision encoder's linear layers while loading: none or q8_0.
    #[arg(long, default_value = "none", value_parser = parse_quant)]
    pub quantize_vision: std::option::Option<WeightQuant>,
    /// KV-cache element type: auto (the compute dtype), or f16 or bf16 on the CPU.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: String,
}

impl ModelArgs {
    /// The checkpoint (or, with random weights, tokenizer) directory: `--model` or the demo.
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(demo_model_dir)
    }

    /// What to load, the device opened and the names checked.
    pub fn source(&self) -> anyhow::Result<ModelSource> {
        Ok(ModelSource {
            dir: self.dir(),
            random_weights: self.random_weights.clone(),
            device: parse_device(&self.device)?,
            dtype: parse_dtype(&self.dtype)?,
            attention: self.attention,
            quantization: Quantization {
                llm: self.quantize,
                vision: self.quantize_vision,
            },
            kv_dtype: parse_dtype(&self.kv_cache_dtype)?,
        })
    }
}
