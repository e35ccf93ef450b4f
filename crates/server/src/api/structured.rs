//! Structured outputs: the grammar a chat request asks for, from OpenAI's `response_format`
//! or vLLM's `structured_outputs` and `guided_*` fields.

use super::error::ApiError;
use super::openai::ChatCompletionRequest;
use internvl_scheduler::GrammarSpec;

/// A request's grammar, with the field it came from (for the 400 when it does not compile).
#[derive(Debug, Clone, PartialEq)]
pub struct Constrained {
    pub spec: GrammarSpec,
    pub param: &'static str,
}

/// The grammar `req` asks for, if any.
pub fn constraint(_req: &ChatCompletionRequest) -> Result<Option<Constrained>, ApiError> {
    Ok(None)
}
