//! How attention is computed, chosen once when the model is built.
//!
//! The binary names a wish ([`AttentionChoice`], from its settings); [`crate::Backends`]
//! turns it, with the device and dtype, into the [`AttentionBackend`] every attention layer
//! is built with. A new way of computing attention is one new variant here and its arm in
//! the layers that match on it.

use std::fmt;
use std::str::FromStr;

/// What the binary asks for: `auto`, `kernels` or `matmul`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionChoice {
    /// The fastest path the device has: the project's CUDA kernels on a GPU (in a build with
    /// the `cuda` feature), the in-place CPU attention on the CPU in f32.
    #[default]
    Auto,
    /// The project's CUDA kernels; refused where there are none (the CPU, a build without
    /// the `cuda` feature).
    Kernels,
    /// candle's gather + matmul attention everywhere: the escape hatch should a kernel
    /// misbehave on some GPU, and the baseline the kernels are measured against.
    Matmul,
}

impl AttentionChoice {
    const NAMES: [(&'static str, AttentionChoice); 3] = [
        ("auto", AttentionChoice::Auto),
        ("kernels", AttentionChoice::Kernels),
        ("matmul", AttentionChoice::Matmul),
    ];
}

/// `s` is not one of `auto`, `kernels`, `matmul`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown attention `{0}` (expected auto, kernels or matmul)")]
pub struct UnknownAttention(String);

impl FromStr for AttentionChoice {
    type Err = UnknownAttention;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, choice)| choice)
            .ok_or_else(|| UnknownAttention(s.to_string()))
    }
}

impl fmt::Display for AttentionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, choice)| choice == self)
            .map_or("auto", |(name, _)| name);
        f.write_str(name)
    }
}

/// The attention the model's layers are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBackend {
    /// The CPU in f32: the LLM's short query runs read keys and values in place from the
    /// paged cache ([`crate::paged_attention`]), its long ones gather + matmul; the vision
    /// encoder runs its fused block attention ([`crate::dense_attention`]).
    CpuF32,
    /// candle's ops on any device and dtype: each sequence's context gathered from the cache,
    /// then matmul, softmax, matmul.
    Matmul,
    /// The project's CUDA kernels ([`crate::cuda_kernels`]) where the layer's head size and
    /// dtype fit them, the matmul path where not.
    #[cfg(feature = "cuda")]
    CudaKernels,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (name, choice) in AttentionChoice::NAMES {
            assert_eq!(name.parse::<AttentionChoice>().unwrap(), choice);
            assert_eq!(choice.to_string(), name);
        }
        assert_eq!(AttentionChoice::default(), AttentionChoice::Auto);
        let error = "flash".parse::<AttentionChoice>().unwrap_err();
        assert!(error.to_string().contains("`flash`"), "{error}");
    }
}
