//! The built-in default of every `serve` setting that has a fixed one, each declared once:
//! `serve --help` shows it, [`super::Settings::resolve`] applies it, and a test holds
//! `config/default.toml` to it. (Defaults worked out at startup, from the checkpoint, the
//! device or the CPUs, are described in the setting's help and computed where it resolves.)

use internvl_scheduler::config::{
    DEFAULT_ENABLE_PREFIX_CACHING, DEFAULT_MAX_BUFFERED_OUTPUT_BYTES, DEFAULT_MAX_IMAGES_PER_STEP,
    DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS,
};
use std::fmt;

/// A size in bytes, shown in help in the largest binary unit that divides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(30, "GiB"), (20, "MiB"), (10, "KiB")];
        match units
            .iter()
            .find(|&&(shift, _)| self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift))
        {
            Some(&(shift, unit)) => write!(f, "{} {unit}", self.0 >> shift),
            None => write!(f, "{}", self.0),
        }
    }
}

/// The KV cache's memory when none is set: on the CPU, and on a GPU (30 GiB leaves an 80 GB
/// GPU room for V1.1's 38 GB of weights and activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerDevice {
    pub cpu: Bytes,
    pub cuda: Bytes,
}

impl fmt::Display for PerDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on CPU, {} on CUDA", self.cpu, self.cuda)
    }
}

pub const HOST: &str = "127.0.0.1";
pub const PORT: u16 = 8000;
pub const DEVICE: &str = "cpu";
pub const DTYPE: &str = "auto";
pub const ATTENTION: &str = "auto";
// These four are the engine's own defaults (internvl_scheduler::config), declared there.
pub const MAX_NUM_SEQS: usize = DEFAULT_MAX_NUM_SEQS;
pub const MAX_NUM_BATCHED_TOKENS: usize = DEFAULT_MAX_NUM_BATCHED_TOKENS;
pub const KV_CACHE_MEMORY: PerDevice = PerDevice {
    cpu: Bytes(1 << 30),
    cuda: Bytes(30 << 30),
};
pub const BLOCK_SIZE: usize = 16;
pub const MAX_QUEUED_REQUESTS: usize = 256;
pub const MAX_IMAGES_PER_REQUEST: usize = 8;
pub const MAX_IMAGES_PER_STEP: usize = DEFAULT_MAX_IMAGES_PER_STEP;
pub const ENABLE_PREFIX_CACHING: bool = DEFAULT_ENABLE_PREFIX_CACHING;
/// The engine's own: a bound no reader that keeps up comes near.
pub const MAX_BUFFERED_OUTPUT_BYTES: Bytes = Bytes(DEFAULT_MAX_BUFFERED_OUTPUT_BYTES);
pub const MAX_BODY_BYTES: Bytes = Bytes(64 << 20);
pub const MAX_PROMPT_BYTES: Bytes = Bytes(256 << 10);
pub const MAX_IMAGE_BYTES: Bytes = Bytes(20 << 20);
pub const MAX_REQUEST_IMAGE_BYTES: Bytes = Bytes(64 << 20);
pub const MAX_IMAGE_MEMORY: Bytes = Bytes(2 << 30);
pub const MAX_IMAGE_PIXELS: u64 = 50_000_000;
/// Seconds.
pub const IMAGE_FETCH_TIMEOUT: u64 = 10;
pub const ALLOW_PRIVATE_IMAGE_URLS: bool = false;
pub const ALLOWED_ORIGINS: &str = "none";
/// Seconds.
pub const SHUTDOWN_TIMEOUT: u64 = 30;
/// Seconds.
pub const HEADER_READ_TIMEOUT: u64 = 10;
/// Seconds.
pub const BODY_READ_TIMEOUT: u64 = 60;
/// Seconds.
pub const IDLE_TIMEOUT: u64 = 75;
pub const MAX_CONNECTIONS: usize = 1024;
pub const MAX_HEADER_BYTES: usize = 64 << 10;
pub const LOG_FORMAT: &str = "text";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_show_in_their_unit() {
        assert_eq!(MAX_BODY_BYTES.to_string(), "64 MiB");
        assert_eq!(MAX_PROMPT_BYTES.to_string(), "256 KiB");
        assert_eq!(MAX_IMAGE_MEMORY.to_string(), "2 GiB");
        assert_eq!(Bytes(1000).to_string(), "1000");
        assert_eq!(KV_CACHE_MEMORY.to_string(), "1 GiB on CPU, 30 GiB on CUDA");
    }
}
