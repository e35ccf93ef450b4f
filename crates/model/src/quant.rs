//! Weight types a linear layer may be quantized to at load, and which one a layer's shape
//! can take.
//!
//! candle's quantized matmul (ggml's block formats) quantizes each row of a weight [out, in]
//! in blocks along `in`: 32 elements for the legacy types, 256 for the k-quants. A layer whose
//! `in` is not a multiple of its type's block falls back, as llama.cpp does, to the nearest
//! type of 32-element blocks (q4k → q5_0, q5k → q5_1, q6k → q8_0); candle's q5_0 and q5_1 dot
//! products also take blocks in pairs, and a row of an odd number falls back once more, to
//! q8_0. Past that the layer stays dense.

use candle_core::quantized::GgmlDType;
use std::fmt;
use std::str::FromStr;

/// A quantized weight type, by llama.cpp's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightQuant {
    Q8_0,
    Q6K,
    Q5K,
    Q5_1,
    Q5_0,
    Q4K,
    Q4_0,
}

/// A type name that is not one of [`WeightQuant`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown quantization `{0}`: none, or one of q8_0, q6k, q5k, q5_1, q5_0, q4k, q4_0")]
pub struct UnknownQuant(pub String);

impl WeightQuant {
    pub const ALL: [WeightQuant; 7] = [
        WeightQuant::Q8_0,
        WeightQuant::Q6K,
        WeightQuant::Q5K,
        WeightQuant::Q5_1,
        WeightQuant::Q5_0,
        WeightQuant::Q4K,
        WeightQuant::Q4_0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightQuant::Q8_0 => "q8_0",
            WeightQuant::Q6K => "q6k",
            WeightQuant::Q5K => "q5k",
            WeightQuant::Q5_1 => "q5_1",
            WeightQuant::Q5_0 => "q5_0",
            WeightQuant::Q4K => "q4k",
            WeightQuant::Q4_0 => "q4_0",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            WeightQuant::Q8_0 => GgmlDType::Q8_0,
            WeightQuant::Q6K => GgmlDType::Q6K,
            WeightQuant::Q5K => GgmlDType::Q5K,
            WeightQuant::Q5_1 => GgmlDType::Q5_1,
            WeightQuant::Q5_0 => GgmlDType::Q5_0,
            WeightQuant::Q4K => GgmlDType::Q4K,
            WeightQuant::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// Bytes per weight, block scales included.
    pub fn bytes_per_weight(self) -> f64 {
        let t = self.ggml();
        t.type_size() as f64 / t.block_size() as f64
    }

    /// The type a layer `in_dim` wide gets: this one, or the fallback its blocks fit; `None`
    /// when not even 32-element blocks fit (the layer stays dense).
    pub fn for_width(self, in_dim: usize) -> Option<WeightQuant> {
        let mut quant = self;
        loop {
            if quant.fits(in_dim) {
                return Some(quant);
            }
            quant = quant.fallback()?;
        }
    }

    /// Whether rows `in_dim` long are whole blocks of this type (pairs of them for q5_0 and
    /// q5_1, whose dot products candle computes two blocks at a time).
    fn fits(self, in_dim: usize) -> bool {
        let block = self.ggml().block_size();
        let paired = matches!(self, WeightQuant::Q5_0 | WeightQuant::Q5_1);
        in_dim.is_multiple_of(block) && (!paired || (in_dim / block).is_multiple_of(2))
    }

    /// The next type to try for a shape this one cannot take.
    fn fallback(self) -> Option<WeightQuant> {
        match self {
            WeightQuant::Q6K | WeightQuant::Q5_1 | WeightQuant::Q5_0 => Some(WeightQuant::Q8_0),
            WeightQuant::Q5K => Some(WeightQuant::Q5_1),
            WeightQuant::Q4K => Some(WeightQuant::Q5_0),
            WeightQuant::Q8_0 | WeightQuant::Q4_0 => None,
        }
    }

    /// At least as precise as q6k: the type of the LM head, whose errors go straight into the
    /// logits (llama.cpp's `Q4_K_M` keeps its output layer at q6k for the same reason).
    pub fn for_lm_head(self) -> WeightQuant {
        match self {
            WeightQuant::Q8_0 | WeightQuant::Q6K => self,
            _ => WeightQuant::Q6K,
        }
    }
}

impl fmt::Display for WeightQuant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for WeightQuant {
    type Err = UnknownQuant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('-', "_");
        let wanted = match wanted.as_str() {
            "q6_k" => "q6k",
            "q5_k" => "q5k",
            "q4_k" => "q4k",
            other => other,
        };
        WeightQuant::ALL
            .into_iter()
            .find(|q| q.name() == wanted)
            .ok_or_else(|| UnknownQuant(s.to_string()))
    }
}

/// What is quantized at load: the language model's linear layers and the vision encoder's,
/// each to its own type or not at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quantization {
    pub llm: Option<WeightQuant>,
    pub vision: Option<WeightQuant>,
}

/// `none`, or a [`WeightQuant`] name: the value of `--quantize` and `--quantize-vision`.
pub fn parse_quant(s: &str) -> Result<Option<WeightQuant>, UnknownQuant> {
    match s.trim() {
        "none" | "" => Ok(None),
        other => other.parse().map(Some),
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |q: Option<WeightQuant>| q.map_or("dense", WeightQuant::name);
        write!(f, "llm {}, vision {}", name(self.llm), name(self.vision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_llama_cpp_spellings() {
        for q in WeightQuant::ALL {
            assert_eq!(q.name().parse::<WeightQuant>(), Ok(q));
        }
        assert_eq!("Q4_K".parse::<WeightQuant>(), Ok(WeightQuant::Q4K));
        assert_eq!("q8-0".parse::<WeightQuant>(), Ok(WeightQuant::Q8_0));
        assert!("q3k".parse::<WeightQuant>().is_err());
        assert_eq!(parse_quant("none"), Ok(None));
        assert_eq!(parse_quant("q6k"), Ok(Some(WeightQuant::Q6K)));
    }

    #[test]
    fn shapes_fall_back_as_llama_cpp_does() {
        // LLaMA2-13B: 5120 and 13824 take 256-element blocks.
        assert_eq!(WeightQuant::Q4K.for_width(5120), Some(WeightQuant::Q4K));
        assert_eq!(WeightQuant::Q4K.for_width(13824), Some(WeightQuant::Q4K));
        // InternViT-6B: 3200 does not.
        assert_eq!(WeightQuant::Q4K.for_width(3200), Some(WeightQuant::Q5_0));
        assert_eq!(WeightQuant::Q6K.for_width(3200), Some(WeightQuant::Q8_0));
        assert_eq!(WeightQuant::Q5K.for_width(3200), Some(WeightQuant::Q5_1));
        assert_eq!(WeightQuant::Q8_0.for_width(3200), Some(WeightQuant::Q8_0));
        assert_eq!(WeightQuant::Q8_0.for_width(100), None);
        // 160 is five blocks of 32: q5_0 takes pairs only.
        assert_eq!(WeightQuant::Q4K.for_width(160), Some(WeightQuant::Q8_0));
        assert_eq!(WeightQuant::Q4_0.for_width(160), Some(WeightQuant::Q4_0));
        assert_eq!(WeightQuant::Q4K.for_width(48), None);
        assert_eq!(WeightQuant::Q4K.for_lm_head(), WeightQuant::Q6K);
        assert_eq!(WeightQuant::Q8_0.for_lm_head(), WeightQuant::Q8_0);
        assert!((WeightQuant::Q8_0.bytes_per_weight() - 34.0 / 32.0).abs() < 1e-9);
        assert!((WeightQuant::Q4K.bytes_per_weight() - 144.0 / 256.0).abs() < 1e-9);
    }
}
