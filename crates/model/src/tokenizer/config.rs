//! The transformers side of a tokenizer checkpoint: `tokenizer_config.json`,
//! `special_tokens_map.json` and `added_tokens.json`, resolved as transformers 4.x's
//! `PreTrainedTokenizerBase.from_pretrained` does.
//!
//! The precedence matters because the files can disagree: when `tokenizer_config.json` has an
//! `added_tokens_decoder` (files saved by transformers >= 4.34), it alone defines the added and
//! special tokens and the two other files are ignored; older checkpoints take special tokens
//! from `special_tokens_map.json` and added tokens from `added_tokens.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

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

/// The serde struct `T` from a file's JSON object; errors name the file and the field.
fn fields<T: DeserializeOwned>(path: &Path, value: &Value) -> Result<T, TokenizerError> {
    if !value.is_object() {
        return Err(config_error(path, "expected a JSON object"));
    }
    serde_path_to_error::deserialize(value)
        .map_err(|e| config_error(path, format!("{}: {}", e.path(), e.inner())))
}

/// A special token as the files write it: the text, or an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenValue {
    Text(String),
    Object { content: String },
}

impl TokenValue {
    fn content(self) -> String {
        match self {
            TokenValue::Text(content) | TokenValue::Object { content } => content,
        }
    }
}

/// A field as a file has it: not there, or there with a value (which may be null), told
/// apart because a token written as null is unset while a token not written keeps its default.
#[derive(Default)]
enum Named<T> {
    #[default]
    Absent,
    Given(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Named<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Self::Given)
    }
}

impl<T> Named<T> {
    fn given(self) -> Option<T> {
        match self {
            Self::Absent => None,
            Self::Given(value) => Some(value),
        }
    }
}

/// The special tokens `tokenizer_config.json` and `special_tokens_map.json` both may name.
#[derive(Deserialize, Default)]
#[serde(default)]
struct SpecialTokenFields {
    bos_token: Named<Option<TokenValue>>,
    eos_token: Named<Option<TokenValue>>,
    unk_token: Named<Option<TokenValue>>,
    sep_token: Named<Option<TokenValue>>,
    pad_token: Named<Option<TokenValue>>,
    cls_token: Named<Option<TokenValue>>,
    mask_token: Named<Option<TokenValue>>,
    additional_special_tokens: Named<Vec<Option<TokenValue>>>,
}

impl SpecialTokenFields {
    /// The single tokens in [`SINGLE_SPECIAL_TOKENS`] order, and the additional ones.
    fn split(self) -> (SingleTokens, Option<Vec<String>>) {
        let single = [
            self.bos_token,
            self.eos_token,
            self.unk_token,
            self.sep_token,
            self.pad_token,
            self.cls_token,
            self.mask_token,
        ]
        .map(|token| token.given().map(|t| t.map(TokenValue::content)));
        let additional = self.additional_special_tokens.given().map(|list| {
            list.into_iter()
                .flatten()
                .map(TokenValue::content)
                .collect()
        });
        (single, additional)
    }
}

/// Per [`SINGLE_SPECIAL_TOKENS`] entry: `None` not named, `Some(None)` unset.
type SingleTokens = [Option<Option<String>>; 7];

/// The settings of `tokenizer_config.json` besides its special tokens.
#[derive(Deserialize)]
struct TokenizerSettings {
    /// Only a string names a class, as transformers reads it.
    tokenizer_class: Option<Value>,
    legacy: Option<bool>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    clean_up_tokenization_spaces: Option<bool>,
    /// Null is refused, as transformers would fail on it.
    #[serde(default)]
    added_tokens_decoder: Named<BTreeMap<String, Value>>,
}

/// `added_tokens_decoder`: `{"id": {"content": ..., "lstrip": ..., ...}}`.
fn parse_added_tokens_decoder(
    path: &Path,
    decoder: BTreeMap<String, Value>,
) -> Result<Vec<AddedTokenEntry>, TokenizerError> {
    let mut entries = Vec::new();
    for (id, token) in decoder {
        let key = format!("added_tokens_decoder.{id}");
        let id = id
            .parse()
            .map_err(|_| config_error(path, format!("{key}: the key is not a token id")))?;
        let content = Option::<TokenValue>::deserialize(&token)
            .map_err(|e| config_error(path, format!("{key}: {e}")))?
            .ok_or_else(|| config_error(path, format!("{key}: token without content")))?
            .content();
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
        let config = read_json(&path)?.unwrap_or_else(|| Value::Object(Default::default()));
        let settings: TokenizerSettings = fields(&path, &config)?;
        let (named, additional) = fields::<SpecialTokenFields>(&path, &config)?.split();
        let defaults = [
            Some("<s>"),
            Some("</s>"),
            Some("<unk>"),
            None,
            None,
            None,
            None,
        ];
        let mut single: Vec<Option<String>> = named
            .into_iter()
            .zip(defaults)
            .map(|(named, default)| named.unwrap_or_else(|| default.map(str::to_owned)))
            .collect();
        let mut additional = additional.unwrap_or_default();

        let added_tokens = match settings.added_tokens_decoder.given() {
            Some(decoder) => parse_added_tokens_decoder(&path, decoder)?,
            None => {
                let map_path = dir.join(SPECIAL_TOKENS_MAP);
                if let Some(map) = read_json(&map_path)? {
                    let (named, listed) = fields::<SpecialTokenFields>(&map_path, &map)?.split();
                    for token in listed.into_iter().flatten() {
                        if !additional.contains(&token) {
                            additional.push(token);
                        }
                    }
                    for (slot, named) in single.iter_mut().zip(named) {
                        if let Some(token) = named {
                            *slot = token;
                        }
                    }
                }
                let added_path = dir.join(ADDED_TOKENS);
                let mut entries = Vec::new();
                if let Some(added) = read_json(&added_path)? {
                    let ids: BTreeMap<String, u32> = fields(&added_path, &added)?;
                    for (content, id) in ids {
                        entries.push(AddedTokenEntry {
                            id,
                            content,
                            strips_neighbours: false,
                        });
                    }
                }
                entries.sort_by_key(|e| e.id);
                entries
            }
        };

        let mut special_tokens: Vec<String> = Vec::new();
        for token in single.iter().flatten().chain(&additional) {
            if !special_tokens.contains(token) {
                special_tokens.push(token.clone());
            }
        }
        let get = |key: &str| {
            let i = SINGLE_SPECIAL_TOKENS.iter().position(|k| *k == key)?;
            single[i].clone()
        };
        Ok(CheckpointConfig {
            tokenizer_class: settings
                .tokenizer_class
                .as_ref()
                .and_then(Value::as_str)
                .map(str::to_owned),
            legacy: settings.legacy,
            add_bos_token: settings.add_bos_token.unwrap_or(true),
            add_eos_token: settings.add_eos_token.unwrap_or(false),
            clean_up_tokenization_spaces: settings.clean_up_tokenization_spaces.unwrap_or(false),
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

    /// A token written as null is unset; one not written keeps its default.
    #[test]
    fn null_unsets_a_token_and_absence_keeps_the_default() {
        let dir = temp_dir("null");
        write(
            &dir,
            TOKENIZER_CONFIG,
            serde_json::json!({"bos_token": null, "eos_token": {"content": "<e>"}}),
        );
        let config = CheckpointConfig::load(&dir).unwrap();
        assert_eq!(config.bos_token, None);
        assert_eq!(config.eos_token.as_deref(), Some("<e>"));
        assert_eq!(config.special_tokens, ["<e>", "<unk>"]);
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
