//! Loading what `--model` and `--random-weights` name, the same way for every subcommand.

use anyhow::Context;
use candle_core::{DType, Device};
use internvl_model::quant::Quantization;
use internvl_model::weights::ProgressFn;
use internvl_model::{AttentionChoice, Backends, LoadedModel};
use std::path::Path;

/// Seed of `--random-weights`: fixed, so that every run benchmarks the same model.
pub const RANDOM_WEIGHTS_SEED: u64 = 0;

/// Loads the checkpoint `dir` onto `device`, computing in `dtype` (default: the device's)
/// with the `attention` asked for and the linear layers quantized as `quantization` says
/// (tensor by tensor as they are read); with `random_weights`, builds the model that config
/// file describes with random weights instead and takes only the tokenizer from `dir`,
/// warning on stderr (through the log) that answers will be meaningless.
pub fn load_model(
    dir: &Path,
    random_weights: Option<&Path>,
    device: &Device,
    dtype: Option<DType>,
    attention: AttentionChoice,
    quantization: Quantization,
    progress: Option<ProgressFn>,
) -> anyhow::Result<LoadedModel> {
    let backends = Backends::resolve(device, dtype, attention)?.with_quantization(quantization);
    tracing::info!(
        attention = ?backends.attention(),
        linear = ?backends.dense_linear().layout,
        quantization = %quantization,
        dtype = ?backends.dtype(),
        "model backends"
    );
    let Some(config) = random_weights else {
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

    #[test]
    fn errors_name_the_config_file() {
        let missing = Path::new("/nonexistent/internvl-config.json");
        let auto = AttentionChoice::Auto;
        let error = load_model(
            &demo_model_dir(),
            Some(missing),
            &Device::Cpu,
            None,
            auto,
            Quantization::default(),
            None,
        )
        .err()
        .unwrap();
        let text = format!("{error:#}");
        assert!(
            text.contains("random weights for /nonexistent/internvl-config.json")
                && text.contains("cannot read"),
            "{text}"
        );
        let config = demo_model_dir().join("config.json");
        let error = load_model(
            &demo_model_dir(),
            Some(&config),
            &Device::Cpu,
            Some(DType::BF16),
            auto,
            Quantization::default(),
            None,
        )
        .err()
        .unwrap();
        assert!(format!("{error:#}").contains("bf16"), "{error:#}");
    }
}
