//! The transformers side of a tokenizer checkpoint: `tokenizer_config.json`,
//! `special_tokens_map.json` and `added_tokens.json`, resolved as transformers 4.x's
//! `PreTrainedTokenizerBase.from_pretrained` does.
//!
//! The precedence matters because the files can disagree: when `tokenizer_config.json` has an
//! `added_tokens_decoder` (files saved by transformers >= 4.34), it alone defines the added and
//! special tokens and the two other files are ignored; older checkpoints take special tokens
//! from `special_tokens_map.json` and added tokens from `added_tokens.json`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::TokenizerError;

pub(crate) const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub(crate) const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
pub(crate) const ADDED_TOKENS: &str = "added_tokens.json";

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES` that hold one token.
const SINGLE_SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// An added token with a fixed id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddedTokenEntry {
    pub(crate) id: u32,
    pub(crate) content: String,
    /// `lstrip`, `rstrip` or `single_word`: the token changes how its neighbours split. The
    /// SentencePiece path rejects these rather than tokenize differently from the reference.
    pub(crate) strips_neighbours: bool,
}

/// What the checkpoint's JSON files say about tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckpointConfig {
    /// File the settings below came from, for error messages.
    pub(crate) path: PathBuf,
    pub(crate) tokenizer_class: Option<String>,
    /// `None` when absent, which transformers 4.x treats as `true`.
    pub(crate) legacy: Option<bool>,
    pub(crate) add_bos_token: bool,
    pub(crate) add_eos_token: bool,
    pub(crate) clean_up_tokenization_spaces: bool,
    pub(crate) bos_token: Option<String>,
    pub(crate) eos_token: Option<String>,
    /// `all_special_tokens`: the single special tokens, then `additional_special_tokens`.
    pub(crate) special_tokens: Vec<String>,
    pub(crate) additional_special_tokens: Vec<String>,
    pub(crate) added_tokens: Vec<AddedTokenEntry>,
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| TokenizerError::Json {
                path: path.to_owned(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn config_error(path: &Path, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Config {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn as_object<'a>(path: &Path, value: &'a Value) -> Result<&'a Map<String, Value>, TokenizerError> {
    value
        .as_object()
        .ok_or_else(|| config_error(path, "expected a JSON object"))
}

/// A special token value: a string, or an `AddedToken` dict with `content`.
fn token_content(path: &Path, key: &str, value: &Value) -> Result<Option<String>, TokenizerError> {
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(config_error(
                path,
                format!("{key}: token object without a string \"content\""),
            )),
        },
        _ => Err(config_error(
            path,
            format!("{key}: expected a string or a token object"),
        )),
    }
}

fn token_list(path: &Path, key: &str, value: &Value) -> Result<Vec<String>, TokenizerError> {
    let Value::Array(items) = value else {
        return Err(config_error(path, format!("{key}: expected a list")));
    };
    items
        .iter()
        .filter_map(|v| token_content(path, key, v).transpose())
        .collect()
}

fn bool_field(
    path: &Path,
    config: &Map<String, Value>,
    key: &str,
    default: bool,
) -> Result<bool, TokenizerError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(config_error(path, format!("{key}: expected true or false"))),
    }
}

fn id_field(path: &Path, key: &str, value: &Value) -> Result<u32, TokenizerError> {
    value
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| config_error(path, format!("{key}: expected a token id")))
}

/// `added_tokens_decoder`: `{"id": {"content": ..., "lstrip": ..., ...}}`.
fn parse_added_tokens_decoder(
    path: &Path,
    value: &Value,
) -> Result<Vec<AddedTokenEntry>, TokenizerError> {
    let mut entries = Vec::new();
    for (id, token) in as_object(path, value)? {
        let key = format!("added_tokens_decoder.{id}");
        let id = id
            .parse()
            .map_err(|_| config_error(path, format!("{key}: the key is not a token id")))?;
        let content = token_content(path, &key, token)?
            .ok_or_else(|| config_error(path, format!("{key}: token without content")))?;
        let flag = |name: &str| token.get(name).and_then(Value::as_bool).unwrap_or(false);
        let strips_neighbours = flag("lstrip") || flag("rstrip") || flag("single_word");
        entries.push(AddedTokenEntry {
            id,
            content,
            strips_neighbours,
        });
    }
    entries.sort_by_key(|e| e.id);
    Ok(entries)
}

impl CheckpointConfig {
    /// Reads the three files from `dir`; each is optional, as for transformers, and missing
    /// settings take `LlamaTokenizer`'s defaults (`<s>`, `</s>`, `<unk>`, BOS added, EOS not).
    pub(crate) fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join(TOKENIZER_CONFIG);
        let config = match read_json(&path)? {
            Some(value) => as_object(&path, &value)?.clone(),
            None => Map::new(),
        };
        let mut single: Vec<(String, Option<String>)> = Vec::new();
        for key in SINGLE_SPECIAL_TOKENS {
            let default = match key {
                "bos_token" => Some("<s>".to_owned()),
                "eos_token" => Some("</s>".to_owned()),
                "unk_token" => Some("<unk>".to_owned()),
                _ => None,
            };
            let value = match config.get(key) {
                Some(v) => token_content(&path, key, v)?,
                None => default,
            };
            single.push((key.to_owned(), value));
        }
        let mut additional = match config.get("additional_special_tokens") {
            Some(v) => token_list(&path, "additional_special_tokens", v)?,
            None => Vec::new(),
        };

        let added_tokens = match config.get("added_tokens_decoder") {
            Some(decoder) => parse_added_tokens_decoder(&path, decoder)?,
            None => {
                let map_path = dir.join(SPECIAL_TOKENS_MAP);
                if let Some(map) = read_json(&map_path)? {
                    for (key, value) in as_object(&map_path, &map)? {
                        if key == "additional_special_tokens" {
                            for token in token_list(&map_path, key, value)? {
                                if !additional.contains(&token) {
                                    additional.push(token);
                                }
                            }
                        } else if let Some(slot) = single.iter_mut().find(|(k, _)| k == key) {
                            slot.1 = token_content(&map_path, key, value)?;
                        }
                    }
                }
                let added_path = dir.join(ADDED_TOKENS);
                let mut entries = Vec::new();
                if let Some(added) = read_json(&added_path)? {
                    for (content, id) in as_object(&added_path, &added)? {
                        let id = id_field(&added_path, content, id)?;
                        entries.push(AddedTokenEntry {
                            id,
                            content: content.clone(),
                            strips_neighbours: false,
                        });
                    }
                }
                entries.sort_by_key(|e| e.id);
                entries
            }
        };

        let mut special_tokens: Vec<String> = Vec::new();
        for token in single
            .iter()
            .filter_map(|(_, v)| v.clone())
            .chain(additional.iter().cloned())
        {
            if !special_tokens.contains(&token) {
                special_tokens.push(token);
            }
        }
        let get = |key: &str| {
            single
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.clone())
        };
        Ok(CheckpointConfig {
            tokenizer_class: config
                .get("tokenizer_class")
                .and_then(Value::as_str)
                .map(str::to_owned),
            legacy: match config.get("legacy") {
                None | Some(Value::Null) => None,
                Some(_) => Some(bool_field(&path, &config, "legacy", true)?),
            },
            add_bos_token: bool_field(&path, &config, "add_bos_token", true)?,
            add_eos_token: bool_field(&path, &config, "add_eos_token", false)?,
            clean_up_tokenization_spaces: bool_field(
                &path,
                &config,
                "clean_up_tokenization_spaces",
                false,
            )?,
            bos_token: get("bos_token"),
            eos_token: get("eos_token"),
            special_tokens,
            additional_special_tokens: additional,
            added_tokens,
            path,
        })
    }
}

/// transformers' `clean_up_tokenization`: undo the spaces a word-level detokenizer would have
/// put before punctuation and English contractions. Applied only when the config asks for it.
pub(crate) fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, value: Value) {
        std::fs::write(dir.join(name), value.to_string()).unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "internvl-tokenizer-config-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn defaults_without_files() {
        let dir = temp_dir("defaults");
        let config = CheckpointConfig::load(&dir).unwrap();
        assert!(
            config.add_bos_token && !config.add_eos_token && !config.clean_up_tokenization_spaces
        );
        assert_eq!(config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(config.special_tokens, ["<s>", "</s>", "<unk>"]);
        assert!(config.added_tokens.is_empty());
    }

    #[test]
    fn old_checkpoints_use_special_tokens_map_and_added_tokens_json() {
        let dir = temp_dir("old");
        write(
            &dir,
            TOKENIZER_CONFIG,
            serde_json::json!({"bos_token": {"content": "<s>"}, "legacy": null}),
        );
        write(
            &dir,
            SPECIAL_TOKENS_MAP,
            serde_json::json!({"pad_token": "</s>", "additional_special_tokens": ["<x>"]}),
        );
        write(
            &dir,
            ADDED_TOKENS,
            serde_json::json!({"<y>": 11, "<x>": 10}),
        );
        let config = CheckpointConfig::load(&dir).unwrap();
        assert_eq!(config.special_tokens, ["<s>", "</s>", "<unk>", "<x>"]);
        assert_eq!(config.additional_special_tokens, ["<x>"]);
        let added: Vec<_> = config
            .added_tokens
            .iter()
            .map(|e| (e.id, e.content.as_str()))
            .collect();
        assert_eq!(added, [(10, "<x>"), (11, "<y>")]);
        assert_eq!(config.legacy, None);
    }

    #[test]
    fn added_tokens_decoder_overrides_the_other_files() {
        let dir = temp_dir("new");
        write(
            &dir,
            TOKENIZER_CONFIG,
            serde_json::json!({"added_tokens_decoder": {"5": {"content": "<a>", "rstrip": true}}, "pad_token": null}),
        );
        write(
            &dir,
            SPECIAL_TOKENS_MAP,
            serde_json::json!({"pad_token": "<a>"}),
        );
        write(&dir, ADDED_TOKENS, serde_json::json!({"<b>": 6}));
        let config = CheckpointConfig::load(&dir).unwrap();
        assert_eq!(
            config.added_tokens,
            [AddedTokenEntry {
                id: 5,
                content: "<a>".into(),
                strips_neighbours: true
            }]
        );
        assert_eq!(config.special_tokens, ["<s>", "</s>", "<unk>"]);
    }

    #[test]
    fn malformed_files_name_the_file() {
        let dir = temp_dir("bad");
        std::fs::write(dir.join(TOKENIZER_CONFIG), "{not json").unwrap();
        let err = CheckpointConfig::load(&dir).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_CONFIG), "{err}");
        write(
            &dir,
            TOKENIZER_CONFIG,
            serde_json::json!({"add_bos_token": "yes"}),
        );
        let err = CheckpointConfig::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("add_bos_token") && err.contains(TOKENIZER_CONFIG),
            "{err}"
        );
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(
            clean_up_tokenization("a , b . c ' d do n't I 'm"),
            "a, b. c'd don't I'm"
        );
    }
}
