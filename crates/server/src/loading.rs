//! Loading what `--model` and `--random-weights` name, the same way for every subcommand.

use crate::service::model::ModelSource;
use anyhow::Context;
use internvl_model::weights::ProgressFn;
use internvl_model::{Backends, LoadedModel};

/// Seed of `--random-weights`: fixed, so that every run benchmarks the same model.
pub const RANDOM_WEIGHTS_SEED: u64 = 0;

/// Loads `source`: its checkpoint onto its device, computing in its dtype (default: the
/// device's) with the attention asked for, the linear layers quantized as it says (tensor by
/// tensor as they are read) and the KV cache in its dtype (default: the compute dtype); with
/// `random_weights`, builds the model that config file describes with random weights instead
/// and takes only the tokenizer from `dir`, warning on stderr (through the log) that answers
/// will be meaningless.
pub fn load_model(
    source: &ModelSource,
    progress: Option<ProgressFn>,
) -> anyhow::Result<LoadedModel> {
    let ModelSource {
        dir,
        random_weights,
        device,
        dtype,
        attention,
        quantization,
        kv_dtype,
    } = source;
    let backends = Backends::resolve(device, *dtype, *attention)?
        .with_quantization(*quantization)
        .with_kv_dtype(*kv_dtype)?;
    tracing::info!(
        attention = ?backends.attention(),
        linear = ?backends.dense_linear().layout,
        quantization = %quantization,
        quantized_kernels = ?backends.llm_linear().kernels,
        dtype = ?backends.dtype(),
        kv_cache_dtype = ?backends.kv_dtype(),
        "model backends"
    );
    let Some(config) = random_weights.as_deref() else {
        return LoadedModel::load_with_progress(dir, &backends, progress)
            .with_context(|| format!("loading {}", dir.display()));
    };
    let (loaded, params) = LoadedModel::load_random(config, dir, &backends, RANDOM_WEIGHTS_SEED)
        .with_context(|| {
            format!(
                "random weights for {} (tokenizer from {})",
                config.display(),
                dir.display()
            )
        })?;
    tracing::warn!(
        config = %config.display(),
        tokenizer = %dir.display(),
        seed = RANDOM_WEIGHTS_SEED,
        "random weights: {params}; answers are meaningless"
    );
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::demo_model_dir;
    use candle_core::{DType, Device};
    use internvl_model::AttentionChoice;
    use std::path::PathBuf;

    #[test]
    fn errors_name_the_config_file() {
        let source = |random_weights: PathBuf, dtype| ModelSource {
            dir: demo_model_dir(),
            random_weights: Some(random_weights),
            device: Device::Cpu,
            dtype,
            attention: AttentionChoice::Auto,
            quantization: Default::default(),
            kv_dtype: None,
        };
        let missing = source("/nonexistent/internvl-config.json".into(), None);
        let error = load_model(&missing, None).err().unwrap();
        let text = format!("{error:#}");
        assert!(
            text.contains("random weights for /nonexistent/internvl-config.json")
                && text.contains("cannot read"),
            "{text}"
        );
        let bf16 = source(demo_model_dir().join("config.json"), Some(DType::BF16));
        let error = load_model(&bf16, None).err().unwrap();
        assert!(format!("{error:#}").contains("bf16"), "{error:#}");
    }
}
