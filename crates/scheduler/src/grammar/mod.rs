//! Constrained decoding: a request's output held to a JSON schema, a regular expression, a list
//! of choices or a Lark grammar, with llguidance.
//!
//! - `vocab` builds llguidance's token trie from the model's tokens, once at load: each token
//!   as the bytes it stands for, special and added tokens marked so that no grammar produces
//!   them by accident.
//! - `spec` is what a request asks for ([`GrammarSpec`]), and how it becomes llguidance's
//!   grammar.
//! - `compiler` turns a spec into a [`Grammar`] under fuel and size limits, so that a hostile
//!   schema costs its own request a bounded time and the engine nothing: compilation runs
//!   before the request reaches the engine, never on the step thread.
//! - `matcher` is one sequence's parser state: the mask of tokens it allows next, and the
//!   tokens it consumed.
//!
//! The mask is one more logits processor (see `sampling`): applied after the penalties and the
//! bias, so that logprobs are those of the constrained distribution, as vLLM reports them.

mod compiler;
mod matcher;
mod spec;
mod vocab;

pub use compiler::{GrammarCompiler, GrammarError, GrammarLimits};
pub use matcher::{Grammar, TokenMask};
pub use spec::GrammarSpec;
pub use vocab::VocabToken;
