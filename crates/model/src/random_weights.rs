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
use rayon::prelude::*;
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
                // The lock is held only to set the draws aside, not while they are drawn.
                let start = rng
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("random generator poisoned".into()))?
                    .take(shape.elem_count());
                let values = start.normals(shape.elem_count(), std);
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

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, seedable and plenty for test weights. Its
/// state advances by a constant per draw, so the generator any number of draws on is known at
/// once, and a tensor's values are drawn in parallel, each chunk from where a single
/// generator would have reached.
struct SplitMix64(u64);

/// What SplitMix64's state advances by per draw.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Values drawn by one task; even, so that every chunk starts on a Box–Muller pair.
const VALUES_PER_TASK: usize = 1 << 16;

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The generator `draws` draws on.
    fn skipped(&self, draws: u64) -> Self {
        SplitMix64(self.0.wrapping_add(GAMMA.wrapping_mul(draws)))
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Fills `out` with draws from N(0, std²), two at a time by the Box–Muller transform; a
    /// last odd value still takes a whole pair's two draws.
    fn fill_normals(&mut self, out: &mut [f32], std: f64) {
        for pair in out.chunks_mut(2) {
            let radius = (-2.0 * self.unit().ln()).sqrt() * std;
            let angle = std::f64::consts::TAU * self.unit();
            pair[0] = (radius * angle.cos()) as f32;
            if let Some(second) = pair.get_mut(1) {
                *second = (radius * angle.sin()) as f32;
            }
        }
    }

    /// Sets aside the draws of `n` normals: returns the generator they start from and moves
    /// this one past them (two draws per pair of values), so they are drawn without it.
    fn take(&mut self, n: usize) -> SplitMix64 {
        let start = SplitMix64(self.0);
        *self = start.skipped(2 * n.div_ceil(2) as u64);
        start
    }

    /// `n` draws from N(0, std²) from this state: the values [`Self::fill_normals`] gives,
    /// drawn on the host's threads.
    fn normals(&self, n: usize, std: f64) -> Vec<f32> {
        let mut values = vec![0f32; n];
        values
            .par_chunks_mut(VALUES_PER_TASK)
            .enumerate()
            .for_each(|(task, chunk)| {
                // A chunk starts as many draws on as values came before it.
                self.skipped((task * VALUES_PER_TASK) as u64)
                    .fill_normals(chunk, std);
            });
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

    /// The draws one after another from one generator, pushed two at a time and the odd one
    /// cut off: the weights every seed gave before they were drawn in parallel.
    fn one_by_one(rng: &mut SplitMix64, n: usize, std: f64) -> Vec<f32> {
        let mut values = Vec::new();
        while values.len() < n {
            let radius = (-2.0 * rng.unit().ln()).sqrt() * std;
            let angle = std::f64::consts::TAU * rng.unit();
            values.push((radius * angle.cos()) as f32);
            values.push((radius * angle.sin()) as f32);
        }
        values.truncate(n);
        values
    }

    #[test]
    fn parallel_draws_are_the_single_generators() {
        // Tensors of several chunks, one of them odd, one within a chunk, one empty, drawn in
        // a row as the model's tensors are: each must match, and so must what follows it.
        let (mut parallel, mut single) = (SplitMix64(11), SplitMix64(11));
        for n in [
            3 * VALUES_PER_TASK + 7,
            5,
            0,
            VALUES_PER_TASK,
            2 * VALUES_PER_TASK - 1,
        ] {
            let ours = parallel.take(n).normals(n, 0.2);
            let reference = one_by_one(&mut single, n, 0.2);
            assert!(ours == reference, "{n} values differ from one generator's");
            assert_eq!(parallel.0, single.0, "the generator after {n} values");
        }
    }
}
