//! Random weights in place of a checkpoint, so the full model can be benchmarked where the
//! real weights cannot be downloaded.
//!
//! Every tensor the model asks for is made on the target device in the target dtype, one at a
//! time: building the 19 B model takes little more memory than the model itself.
//!
//! Matrices are drawn from N(0, 1/fan_in) rather than upstream's fixed N(0, 0.02): each
//! projection then keeps the scale of its input whatever the width, so activations stay near
//! 1 through every layer of the full model in bf16, and a narrow test model behaves like the
//! full one. Norm weights are 1, biases 0 and InternViT's layer scales 0.1 (upstream's
//! `initializer_factor`), as upstream initialises them.

use crate::backends::Backends;
use crate::config::InternVlConfig;
use crate::model::InternVlChat;
use crate::param_count::ParamCount;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use std::sync::{Arc, Mutex};

/// InternViT's `ls1` / `ls2` at initialisation (`initializer_factor`).
const LAYER_SCALE: f32 = 0.1;

/// Builds the model `config` describes with random weights, on the device and with the layers
/// `backends` name. Also returns the parameters made.
///
/// The same `seed` gives the same weights on the same kind of device (the CPU and CUDA draw
/// from different generators). `image_context_id` is the tokenizer's `<IMG_CONTEXT>` id.
pub fn random_model(
    config: InternVlConfig,
    image_context_id: u32,
    backends: &Backends,
    seed: u64,
) -> Result<(InternVlChat, ParamCount)> {
    let device = backends.device();
    let fill = if device.is_cpu() {
        Fill::Host(Mutex::new(SplitMix64(seed)))
    } else {
        device.set_seed(seed)?;
        Fill::Device
    };
    let count = Arc::new(Mutex::new(ParamCount::default()));
    let weights = RandomBackend {
        fill,
        count: count.clone(),
    };
    let model = InternVlChat::new(config, Box::new(weights), image_context_id, backends)?;
    let count = *count
        .lock()
        .map_err(|_| candle_core::Error::Msg("parameter count poisoned".into()))?;
    Ok((model, count))
}

/// Where random values come from.
enum Fill {
    /// The device's own generator, seeded through [`Device::set_seed`].
    Device,
    /// Ours: candle's CPU generator cannot be seeded.
    Host(Mutex<SplitMix64>),
}

impl Fill {
    fn normal(&self, shape: &Shape, std: f64, device: &Device) -> Result<Tensor> {
        match self {
            Fill::Device => Tensor::randn(0f32, std as f32, shape, device),
            Fill::Host(rng) => {
                let values = rng
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("random generator poisoned".into()))?
                    .normals(shape.elem_count(), std);
                Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
            }
        }
    }
}

/// A [`SimpleBackend`] that makes up every tensor asked for and counts their elements.
struct RandomBackend {
    fill: Fill,
    count: Arc<Mutex<ParamCount>>,
}

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Ok(mut count) = self.count.lock() {
            count.add(name, shape.elem_count() as u64);
        }
        let leaf = name.rsplit('.').next().unwrap_or(name);
        // Generated in f32 and converted one tensor at a time: curand has no bf16 normals.
        let tensor = match leaf {
            "ls1" | "ls2" => Tensor::full(LAYER_SCALE, shape.clone(), dev)?,
            "bias" => Tensor::zeros(&shape, DType::F32, dev)?,
            _ if shape.rank() == 1 => Tensor::ones(&shape, DType::F32, dev)?,
            _ => {
                let fan_in: usize = shape.dims()[1..].iter().product();
                self.fill.normal(&shape, (fan_in as f64).powf(-0.5), dev)?
            }
        };
        tensor.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need the shape of `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, seedable and plenty for test weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// `n` draws from N(0, std²), two at a time by the Box–Muller transform.
    fn normals(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut values = Vec::with_capacity(n + 1);
        while values.len() < n {
            let radius = (-2.0 * self.unit().ln()).sqrt() * std;
            let angle = std::f64::consts::TAU * self.unit();
            values.push((radius * angle.cos()) as f32);
            values.push((radius * angle.sin()) as f32);
        }
        values.truncate(n);
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normals_have_the_asked_spread() {
        let values = SplitMix64(3).normals(100_001, 0.5);
        assert_eq!(values.len(), 100_001);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "std {}", var.sqrt());
        assert_eq!(values, SplitMix64(3).normals(100_001, 0.5));
    }
}
