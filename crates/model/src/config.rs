//! The checkpoint's `config.json`, in upstream's `InternVLChatConfig` format.
//!
//! Every dimension the forward needs is read from here, never assumed: the fixture checkpoint
//! and the published one differ in every size, and fields that upstream leaves out
//! (`ps_version`, `vision_config.norm_type`) carry the defaults upstream gives them. serde
//! reads the file's layout (`config_file`, which also holds the readers `from_dir` and
//! `from_file`); the typed config is then checked for what the
//! forward relies on, each error naming the file and the field.

use serde::Deserialize;

/// Why a `config.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: missing field `{field}`")]
    Missing { path: String, field: String },
    #[error("{path}: field `{field}` is invalid: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
}

/// How the 2×2 neighbourhoods of the ViT grid are folded into channels.
///
/// V1.1 was trained with `V1`, which leaves the downsampled grid transposed; `V2` undoes the
/// transposition. The difference is a permutation of the visual tokens, so using the wrong one
/// silently degrades answers instead of failing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelShuffleVersion {
    #[default]
    V1,
    V2,
}

/// The normalisation layers of the vision encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionNorm {
    #[default]
    RmsNorm,
    LayerNorm,
}

/// InternViT dimensions (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub qkv_bias: bool,
    pub qk_normalization: bool,
    pub layer_norm_eps: f64,
    pub norm_type: VisionNorm,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// LLaMA dimensions (`llm_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl LlmConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The whole model: vision encoder, projector settings and language model.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlConfig {
    pub vision: VisionConfig,
    pub llm: LlmConfig,
    /// Index into the ViT's hidden states (embeddings first), negative from the end.
    pub select_layer: i64,
    pub downsample_ratio: f64,
    pub ps_version: PixelShuffleVersion,
    pub template: String,
    pub image_size: usize,
    pub system_message: String,
}

impl InternVlConfig {
    /// Number of ViT layers that must run: the one `select_layer` points at and all before it.
    pub fn vision_layers_used(&self) -> usize {
        let states = self.vision.num_hidden_layers as i64 + 1;
        let index = if self.select_layer < 0 {
            states + self.select_layer
        } else {
            self.select_layer
        };
        index as usize
    }

    /// Visual tokens one image becomes after the pixel shuffle.
    pub fn num_image_tokens(&self) -> usize {
        let grid = self.image_size / self.vision.patch_size;
        let reduced = (grid as f64 * self.downsample_ratio).round() as usize;
        reduced * reduced
    }

    /// Side of the folded neighbourhood: 2 for `downsample_ratio` 0.5.
    pub fn shuffle_factor(&self) -> usize {
        (1.0 / self.downsample_ratio).round() as usize
    }

    /// The relations between fields the forward relies on; an error names the field.
    pub(crate) fn validate(&self) -> Result<(), (&'static str, String)> {
        let v = &self.vision;
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err((
                "vision_config.num_attention_heads",
                format!("does not divide hidden_size {}", v.hidden_size),
            ));
        }
        if !self.image_size.is_multiple_of(v.patch_size) {
            return Err((
                "force_image_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.image_size, v.patch_size
                ),
            ));
        }
        let states = v.num_hidden_layers as i64 + 1;
        if self.select_layer >= states || self.select_layer < -states || self.select_layer == 0 {
            return Err((
                "select_layer",
                format!(
                    "{} is outside 1..{states} and -{states}..-1",
                    self.select_layer
                ),
            ));
        }
        let factor = self.shuffle_factor();
        let grid = self.image_size / v.patch_size;
        if (self.downsample_ratio * factor as f64 - 1.0).abs() > 1e-9
            || !grid.is_multiple_of(factor)
        {
            return Err((
                "downsample_ratio",
                format!(
                    "{} must be 1/n with n dividing the {grid}-patch grid",
                    self.downsample_ratio
                ),
            ));
        }
        let l = &self.llm;
        if !l.hidden_size.is_multiple_of(l.num_attention_heads) {
            return Err((
                "llm_config.num_attention_heads",
                format!("does not divide hidden_size {}", l.hidden_size),
            ));
        }
        if l.num_key_value_heads == 0
            || !l.num_attention_heads.is_multiple_of(l.num_key_value_heads)
        {
            return Err((
                "llm_config.num_key_value_heads",
                format!(
                    "{} must be at least 1 and divide num_attention_heads {}",
                    l.num_key_value_heads, l.num_attention_heads
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn demo() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/demo-internvl/config.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn parse(config: &Value) -> Result<InternVlConfig, ConfigError> {
        InternVlConfig::from_json(&config.to_string(), "config.json")
    }

    /// Zero key/value heads divided by zero before; now the field is named.
    #[test]
    fn zero_kv_heads_is_refused_by_name() {
        let mut config = demo();
        config["llm_config"]["num_key_value_heads"] = 0.into();
        let error = parse(&config).unwrap_err().to_string();
        assert!(
            error.contains("config.json") && error.contains("llm_config.num_key_value_heads"),
            "{error}"
        );
        config["llm_config"]["num_key_value_heads"] = 3.into();
        let error = parse(&config).unwrap_err().to_string();
        assert!(error.contains("llm_config.num_key_value_heads"), "{error}");
    }

    /// Fields upstream leaves out, or writes as null, take upstream's defaults.
    #[test]
    fn absent_fields_take_upstream_defaults() {
        let mut config = demo();
        for (section, field) in [
            ("llm_config", "num_key_value_heads"),
            ("llm_config", "rope_theta"),
            ("vision_config", "norm_type"),
            ("vision_config", "qkv_bias"),
        ] {
            config[section].as_object_mut().unwrap().remove(field);
        }
        let root = config.as_object_mut().unwrap();
        root.remove("force_image_size");
        root.remove("ps_version");
        root.insert("system_message".into(), Value::Null);
        let parsed = parse(&config).unwrap();
        assert_eq!(
            parsed.llm.num_key_value_heads,
            parsed.llm.num_attention_heads
        );
        assert_eq!(parsed.llm.rope_theta, 10_000.0);
        assert_eq!(parsed.vision.norm_type, VisionNorm::RmsNorm);
        assert!(!parsed.vision.qkv_bias);
        assert_eq!(parsed.image_size, parsed.vision.image_size);
        assert_eq!(parsed.ps_version, PixelShuffleVersion::V1);
        assert_eq!(parsed.system_message, "");
    }

    #[test]
    fn checked_values_name_their_field() {
        let cases: [(&str, &str, Value, &str); 4] = [
            (
                "llm_config",
                "rope_scaling",
                serde_json::json!({"type": "linear"}),
                "not supported",
            ),
            (
                "vision_config",
                "norm_type",
                "batch_norm".into(),
                "unknown variant",
            ),
            ("llm_config", "hidden_size", 0.into(), "must be positive"),
            (
                "vision_config",
                "layer_norm_eps",
                (-1.0).into(),
                "positive number",
            ),
        ];
        for (section, field, value, reason) in cases {
            let mut config = demo();
            config[section][field] = value;
            let error = parse(&config).unwrap_err().to_string();
            assert!(
                error.contains(&format!("{section}.{field}")) && error.contains(reason),
                "{error}"
            );
        }
    }
}
