//! Errors of tokenizer loading and encoding, each naming the file involved so that a broken
//! checkpoint directory can be fixed without reading code.

use std::path::PathBuf;

/// Why a tokenizer could not be loaded, or a text not encoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read (a missing `tokenizer.model` lands here).
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `tokenizer.model` is not a SentencePiece model this crate can run.
    #[error("{path} is not a usable SentencePiece model: {reason}")]
    Model { path: PathBuf, reason: String },
    /// A JSON file is malformed.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file is well-formed but asks for something wrong or unsupported.
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// `tokenizer.json` could not be loaded by the `tokenizers` crate.
    #[error("cannot load {path}: {source}")]
    TokenizerJson {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// The `tokenizers` crate failed to encode a text.
    #[error("encoding with {path} failed: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
}
