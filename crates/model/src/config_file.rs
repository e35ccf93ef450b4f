//! `config.json` as upstream writes it: serde structs in the file's own layout and names,
//! turned into [`InternVlConfig`] once every field is there, of its type and in its range.
//!
//! Fields the forward does not use but must agree with (`model_type`s, `hidden_act`,
//! `rope_scaling`) are read here only to be checked; defaults that depend on another field
//! (`num_key_value_heads`, `force_image_size`) are applied here.

use crate::config::{
    ConfigError, InternVlConfig, LlmConfig, PixelShuffleVersion, VisionConfig, VisionNorm,
};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

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
    pub(crate) fn from_json(text: &str, path: &str) -> Result<Self, ConfigError> {
        let file = parse(text, path)?;
        let config = file
            .into_config()
            .map_err(|(field, reason)| ConfigError::Invalid {
                path: path.to_string(),
                field: field.to_string(),
                reason,
            })?;
        config
            .validate()
            .map_err(|(field, reason)| ConfigError::Invalid {
                path: path.to_string(),
                field: field.to_string(),
                reason,
            })?;
        Ok(config)
    }
}

/// A field (its full dotted path) and why it is refused.
type FieldError = (&'static str, String);

#[derive(Deserialize)]
pub(crate) struct ConfigFile {
    model_type: String,
    vision_config: VisionSection,
    llm_config: LlmSection,
    select_layer: i64,
    downsample_ratio: f64,
    ps_version: Option<PixelShuffleVersion>,
    template: String,
    system_message: Option<String>,
    force_image_size: Option<usize>,
}

#[derive(Deserialize)]
struct VisionSection {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    patch_size: usize,
    image_size: usize,
    qkv_bias: Option<bool>,
    qk_normalization: Option<bool>,
    layer_norm_eps: f64,
    norm_type: Option<VisionNorm>,
    hidden_act: Option<String>,
}

#[derive(Deserialize)]
struct LlmSection {
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    num_hidden_layers: usize,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    max_position_embeddings: usize,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    hidden_act: Option<String>,
}

/// Parses `text`; errors name `path` and, past the syntax, the field (`llm_config.vocab_size`).
pub(crate) fn parse(text: &str, path: &str) -> Result<ConfigFile, ConfigError> {
    let mut json = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut json).map_err(|error| {
        let at = error.path().to_string();
        let source = error.into_inner();
        let path = path.to_string();
        if source.is_syntax() || source.is_eof() {
            return ConfigError::Json { path, source };
        }
        let reason = source.to_string();
        // A missing field is reported at the struct that lacks it: name the field itself.
        let missing = reason
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next());
        match missing {
            Some(name) if at == "." => ConfigError::Missing {
                path,
                field: name.to_string(),
            },
            Some(name) => ConfigError::Missing {
                path,
                field: format!("{at}.{name}"),
            },
            None => ConfigError::Invalid {
                path,
                field: at,
                reason,
            },
        }
    })
}

impl ConfigFile {
    /// The typed config, once every value is in its range.
    pub(crate) fn into_config(self) -> Result<InternVlConfig, FieldError> {
        expect("model_type", &self.model_type, "internvl_chat")?;
        let vision = self.vision_config.into_config()?;
        let llm = self.llm_config.into_config()?;
        Ok(InternVlConfig {
            select_layer: self.select_layer,
            downsample_ratio: positive_float("downsample_ratio", self.downsample_ratio)?,
            ps_version: self.ps_version.unwrap_or_default(),
            template: self.template,
            system_message: self.system_message.unwrap_or_default(),
            image_size: self.force_image_size.unwrap_or(vision.image_size),
            vision,
            llm,
        })
    }
}

impl VisionSection {
    fn into_config(self) -> Result<VisionConfig, FieldError> {
        expect(
            "vision_config.model_type",
            &self.model_type,
            "intern_vit_6b",
        )?;
        if let Some(act) = self.hidden_act.filter(|act| act != "gelu") {
            return Err((
                "vision_config.hidden_act",
                format!("`{act}` (only exact gelu is supported)"),
            ));
        }
        Ok(VisionConfig {
            hidden_size: positive("vision_config.hidden_size", self.hidden_size)?,
            intermediate_size: positive("vision_config.intermediate_size", self.intermediate_size)?,
            num_attention_heads: positive(
                "vision_config.num_attention_heads",
                self.num_attention_heads,
            )?,
            num_hidden_layers: positive("vision_config.num_hidden_layers", self.num_hidden_layers)?,
            patch_size: positive("vision_config.patch_size", self.patch_size)?,
            image_size: positive("vision_config.image_size", self.image_size)?,
            qkv_bias: self.qkv_bias.unwrap_or(false),
            qk_normalization: self.qk_normalization.unwrap_or(false),
            layer_norm_eps: positive_float("vision_config.layer_norm_eps", self.layer_norm_eps)?,
            norm_type: self.norm_type.unwrap_or_default(),
        })
    }
}

impl LlmSection {
    fn into_config(self) -> Result<LlmConfig, FieldError> {
        expect("llm_config.model_type", &self.model_type, "llama")?;
        if let Some(scaling) = self.rope_scaling {
            return Err((
                "llm_config.rope_scaling",
                format!("{scaling} is not supported"),
            ));
        }
        if let Some(act) = self.hidden_act.filter(|act| act != "silu") {
            return Err((
                "llm_config.hidden_act",
                format!("`{act}` (only silu is supported)"),
            ));
        }
        let heads = positive("llm_config.num_attention_heads", self.num_attention_heads)?;
        Ok(LlmConfig {
            hidden_size: positive("llm_config.hidden_size", self.hidden_size)?,
            intermediate_size: positive("llm_config.intermediate_size", self.intermediate_size)?,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            num_hidden_layers: positive("llm_config.num_hidden_layers", self.num_hidden_layers)?,
            vocab_size: positive("llm_config.vocab_size", self.vocab_size)?,
            rms_norm_eps: positive_float("llm_config.rms_norm_eps", self.rms_norm_eps)?,
            rope_theta: match self.rope_theta {
                Some(theta) => positive_float("llm_config.rope_theta", theta)?,
                None => 10_000.0,
            },
            max_position_embeddings: positive(
                "llm_config.max_position_embeddings",
                self.max_position_embeddings,
            )?,
            bos_token_id: self.bos_token_id.unwrap_or(1),
            eos_token_id: self.eos_token_id.unwrap_or(2),
        })
    }
}

fn expect(field: &'static str, found: &str, supported: &str) -> Result<(), FieldError> {
    if found == supported {
        return Ok(());
    }
    Err((
        field,
        format!("`{found}` is not supported (expected `{supported}`)"),
    ))
}

fn positive(field: &'static str, value: usize) -> Result<usize, FieldError> {
    if value == 0 {
        return Err((field, "must be positive".into()));
    }
    Ok(value)
}

fn positive_float(field: &'static str, value: f64) -> Result<f64, FieldError> {
    if !(value.is_finite() && value > 0.0) {
        return Err((field, format!("{value} must be a positive number")));
    }
    Ok(value)
}
