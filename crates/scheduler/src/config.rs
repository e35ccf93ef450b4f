//! Engine settings, and the error for settings under which the engine could not run.

/// Sizes and budgets of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// KV-cache blocks the runner allocated.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decodes) in one step.
    pub max_num_batched_tokens: usize,
    /// Most tokens (prompt plus generated) of one sequence.
    pub max_model_len: usize,
    /// Most images the vision encoder runs in one step.
    pub max_images_per_step: usize,
    /// Memory for cached encoder outputs.
    pub encoder_cache_bytes: usize,
    pub enable_prefix_caching: bool,
    /// Most bytes of events one request may have sent and its reader not yet taken (see
    /// `output`): past it the request is cancelled, so a client that never reads cannot make
    /// the engine buffer its whole answer, nor hold KV blocks and a running slot meanwhile.
    pub max_buffered_output_bytes: usize,
}

/// Room for about 16 completions × 1000 tokens with text and no logprobs, far more than a
/// reader that keeps up ever has waiting.
pub const DEFAULT_MAX_BUFFERED_OUTPUT_BYTES: usize = 4 << 20;
/// vLLM's defaults for the step's sequences and tokens; the server's settings take these.
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 2048;
pub const DEFAULT_MAX_IMAGES_PER_STEP: usize = 8;
pub const DEFAULT_ENABLE_PREFIX_CACHING: bool = true;

impl EngineConfig {
    /// Defaults as vLLM's, for a cache of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize, max_model_len: usize) -> Self {
        Self {
            num_blocks,
            block_size,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            max_model_len,
            max_images_per_step: DEFAULT_MAX_IMAGES_PER_STEP,
            encoder_cache_bytes: 256 << 20,
            enable_prefix_caching: DEFAULT_ENABLE_PREFIX_CACHING,
            max_buffered_output_bytes: DEFAULT_MAX_BUFFERED_OUTPUT_BYTES,
        }
    }

    /// Rejects settings under which the engine could not make progress.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("num_blocks", self.num_blocks),
            ("block_size", self.block_size),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("max_images_per_step", self.max_images_per_step),
            ("max_buffered_output_bytes", self.max_buffered_output_bytes),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(())
    }
}

/// Engine settings under which the engine could not make progress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A size or budget that must be positive is 0; the setting's name.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}
