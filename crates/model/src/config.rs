//! The checkpoint's `config.json`, in upstream's `InternVLChatConfig` format.
//!
//! Every dimension the forward needs is read from here, never assumed: the fixture checkpoint
//! and the published one differ in every size, and fields that upstream leaves out
//! (`ps_version`, `vision_config.norm_type`) carry the defaults upstream gives them.

use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelShuffleVersion {
    V1,
    V2,
}

/// The normalisation layers of the vision encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionNorm {
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

    /// Patches per side of the image grid.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
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
    /// Reads `config.json` from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads a config file of that format wherever it is: random weights need no checkpoint.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_json(&text, &shown)
    }

    /// Parses the JSON text of a `config.json`; `path` names it in errors.
    pub fn from_json(text: &str, path: &str) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_string(),
            source,
        })?;
        let f = Fields { path, root: &root };
        let model_type = f.string("model_type")?;
        if model_type != "internvl_chat" {
            return Err(f.invalid(
                "model_type",
                format!("`{model_type}` is not supported (expected `internvl_chat`)"),
            ));
        }
        let vision = f.vision()?;
        let llm = f.llm()?;
        let ps_version = match f.opt_string("ps_version")?.as_deref() {
            None | Some("v1") => PixelShuffleVersion::V1,
            Some("v2") => PixelShuffleVersion::V2,
            Some(other) => {
                return Err(f.invalid("ps_version", format!("`{other}` (expected v1 or v2)")))
            }
        };
        let image_size = match f.opt_usize("force_image_size")? {
            Some(size) => size,
            None => vision.image_size,
        };
        let config = InternVlConfig {
            select_layer: f.int("select_layer")?,
            downsample_ratio: f.float("downsample_ratio")?,
            ps_version,
            template: f.string("template")?,
            system_message: f.opt_string("system_message")?.unwrap_or_default(),
            image_size,
            vision,
            llm,
        };
        config.validate(&f)?;
        Ok(config)
    }

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

    fn validate(&self, f: &Fields<'_>) -> Result<(), ConfigError> {
        let v = &self.vision;
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(f.invalid(
                "vision_config.num_attention_heads",
                format!("does not divide hidden_size {}", v.hidden_size),
            ));
        }
        if self.image_size % v.patch_size != 0 {
            return Err(f.invalid(
                "force_image_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.image_size, v.patch_size
                ),
            ));
        }
        let states = v.num_hidden_layers as i64 + 1;
        if self.select_layer >= states || self.select_layer < -states || self.select_layer == 0 {
            return Err(f.invalid(
                "select_layer",
                format!(
                    "{} is outside 1..{states} and -{states}..-1",
                    self.select_layer
                ),
            ));
        }
        let factor = self.shuffle_factor();
        let grid = self.image_size / v.patch_size;
        if (self.downsample_ratio * factor as f64 - 1.0).abs() > 1e-9 || grid % factor != 0 {
            return Err(f.invalid(
                "downsample_ratio",
                format!(
                    "{} must be 1/n with n dividing the {grid}-patch grid",
                    self.downsample_ratio
                ),
            ));
        }
        let l = &self.llm;
        if l.hidden_size % l.num_attention_heads != 0 {
            return Err(f.invalid(
                "llm_config.num_attention_heads",
                format!("does not divide hidden_size {}", l.hidden_size),
            ));
        }
        if l.num_attention_heads % l.num_key_value_heads != 0 {
            return Err(f.invalid(
                "llm_config.num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    l.num_key_value_heads, l.num_attention_heads
                ),
            ));
        }
        Ok(())
    }
}

/// Typed access to JSON fields with errors that name the full field path.
struct Fields<'a> {
    path: &'a str,
    root: &'a Value,
}

impl Fields<'_> {
    fn lookup(&self, field: &str) -> Option<&Value> {
        field
            .split('.')
            .try_fold(self.root, |v, key| v.get(key))
            .filter(|v| !v.is_null())
    }

    fn missing(&self, field: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.to_string(),
            field: field.to_string(),
        }
    }

    fn invalid(&self, field: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_string(),
            field: field.to_string(),
            reason,
        }
    }

    fn typed<T: for<'de> Deserialize<'de>>(&self, field: &str) -> Result<Option<T>, ConfigError> {
        self.lookup(field)
            .map(|v| T::deserialize(v).map_err(|e| self.invalid(field, e.to_string())))
            .transpose()
    }

    fn required<T: for<'de> Deserialize<'de>>(&self, field: &str) -> Result<T, ConfigError> {
        self.typed(field)?.ok_or_else(|| self.missing(field))
    }

    fn string(&self, field: &str) -> Result<String, ConfigError> {
        self.required(field)
    }

    fn opt_string(&self, field: &str) -> Result<Option<String>, ConfigError> {
        self.typed(field)
    }

    fn int(&self, field: &str) -> Result<i64, ConfigError> {
        self.required(field)
    }

    fn positive(&self, field: &str) -> Result<usize, ConfigError> {
        let value: usize = self.required(field)?;
        if value == 0 {
            return Err(self.invalid(field, "must be positive".into()));
        }
        Ok(value)
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        self.typed(field)
    }

    fn float(&self, field: &str) -> Result<f64, ConfigError> {
        let value: f64 = self.required(field)?;
        if !(value.is_finite() && value > 0.0) {
            return Err(self.invalid(field, format!("{value} must be a positive number")));
        }
        Ok(value)
    }

    fn vision(&self) -> Result<VisionConfig, ConfigError> {
        let model_type: String = self.required("vision_config.model_type")?;
        if model_type != "intern_vit_6b" {
            return Err(self.invalid(
                "vision_config.model_type",
                format!("`{model_type}` is not supported (expected `intern_vit_6b`)"),
            ));
        }
        let norm_type = match self.typed::<String>("vision_config.norm_type")?.as_deref() {
            None | Some("rms_norm") => VisionNorm::RmsNorm,
            Some("layer_norm") => VisionNorm::LayerNorm,
            Some(other) => {
                return Err(self.invalid(
                    "vision_config.norm_type",
                    format!("`{other}` (expected rms_norm or layer_norm)"),
                ))
            }
        };
        if let Some(act) = self.typed::<String>("vision_config.hidden_act")? {
            if act != "gelu" {
                return Err(self.invalid(
                    "vision_config.hidden_act",
                    format!("`{act}` (only exact gelu is supported)"),
                ));
            }
        }
        Ok(VisionConfig {
            hidden_size: self.positive("vision_config.hidden_size")?,
            intermediate_size: self.positive("vision_config.intermediate_size")?,
            num_attention_heads: self.positive("vision_config.num_attention_heads")?,
            num_hidden_layers: self.positive("vision_config.num_hidden_layers")?,
            patch_size: self.positive("vision_config.patch_size")?,
            image_size: self.positive("vision_config.image_size")?,
            qkv_bias: self.typed("vision_config.qkv_bias")?.unwrap_or(false),
            qk_normalization: self
                .typed("vision_config.qk_normalization")?
                .unwrap_or(false),
            layer_norm_eps: self.float("vision_config.layer_norm_eps")?,
            norm_type,
        })
    }

    fn llm(&self) -> Result<LlmConfig, ConfigError> {
        let model_type: String = self.required("llm_config.model_type")?;
        if model_type != "llama" {
            return Err(self.invalid(
                "llm_config.model_type",
                format!("`{model_type}` is not supported (expected `llama`)"),
            ));
        }
        if let Some(scaling) = self.lookup("llm_config.rope_scaling") {
            return Err(self.invalid(
                "llm_config.rope_scaling",
                format!("{scaling} is not supported"),
            ));
        }
        if let Some(act) = self.typed::<String>("llm_config.hidden_act")? {
            if act != "silu" {
                return Err(self.invalid(
                    "llm_config.hidden_act",
                    format!("`{act}` (only silu is supported)"),
                ));
            }
        }
        let num_attention_heads = self.positive("llm_config.num_attention_heads")?;
        Ok(LlmConfig {
            hidden_size: self.positive("llm_config.hidden_size")?,
            intermediate_size: self.positive("llm_config.intermediate_size")?,
            num_attention_heads,
            num_key_value_heads: self
                .typed("llm_config.num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            num_hidden_layers: self.positive("llm_config.num_hidden_layers")?,
            vocab_size: self.positive("llm_config.vocab_size")?,
            rms_norm_eps: self.float("llm_config.rms_norm_eps")?,
            rope_theta: match self.lookup("llm_config.rope_theta") {
                Some(_) => self.float("llm_config.rope_theta")?,
                None => 10_000.0,
            },
            max_position_embeddings: self.positive("llm_config.max_position_embeddings")?,
            bos_token_id: self.typed("llm_config.bos_token_id")?.unwrap_or(1),
            eos_token_id: self.typed("llm_config.eos_token_id")?.unwrap_or(2),
        })
    }
}
