//! Choosing the next token from logits: greedy, or temperature with top-k / top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How one request wants its tokens chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Makes the choices reproducible; `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
        }
    }
}

/// Invalid sampling settings.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("logits are empty")]
    NoLogits,
}

/// A request's sampler: its settings and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        if !(params.temperature.is_finite() && params.temperature >= 0.0) {
            return Err(SamplingError::Temperature(params.temperature));
        }
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return Err(SamplingError::TopP(params.top_p));
        }
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    /// Picks a token id from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::NoLogits);
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let candidates = self.candidates(logits);
        let total: f64 = candidates.iter().map(|&(_, p)| p).sum();
        let mut draw = self.rng.random::<f64>() * total;
        for &(id, p) in &candidates {
            if draw < p {
                return Ok(id);
            }
            draw -= p;
        }
        Ok(candidates[candidates.len() - 1].0)
    }

    /// Tokens that survive top-k and top-p, most likely first, with unnormalised weights.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let t = self.params.temperature as f64;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut weighted: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
            .filter(|&(_, w)| w > 0.0)
            .collect();
        weighted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            weighted.truncate(self.params.top_k);
        }
        if self.params.top_p < 1.0 {
            let total: f64 = weighted.iter().map(|&(_, w)| w).sum();
            let mut mass = 0.0;
            let keep = weighted
                .iter()
                .position(|&(_, w)| {
                    mass += w / total;
                    mass >= self.params.top_p as f64
                })
                .map_or(weighted.len(), |i| i + 1);
            weighted.truncate(keep);
        }
        weighted
    }
}

/// Index of the largest logit; the lowest index wins ties, as torch's argmax does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
        })
        .unwrap()
    }

    fn frequencies(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits).unwrap() as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(0.0, 0, 1.0, 0);
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = sampler(1.0, 0, 1.0, seed);
            (0..64)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn temperature_one_follows_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let freq = frequencies(&mut sampler(1.0, 0, 1.0, 1), &logits, 20_000);
        for (i, &l) in logits.iter().enumerate() {
            let expected = (l as f64).exp() / z;
            assert!(
                (freq[i] - expected).abs() < 0.015,
                "{i}: {} vs {expected}",
                freq[i]
            );
        }
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let freq = frequencies(&mut sampler(1.0, 2, 1.0, 2), &logits, 5_000);
        assert_eq!(freq[2] + freq[3], 0.0);
        let e = |x: f64| x.exp();
        let p0 = e(3.0) / (e(3.0) + e(2.0));
        assert!((freq[0] - p0).abs() < 0.03);
        // p(top1) ≈ 0.64 < 0.7, so top_p = 0.7 keeps exactly the two best.
        let freq = frequencies(&mut sampler(1.0, 0, 0.7, 3), &logits, 5_000);
        assert_eq!(freq[2] + freq[3], 0.0);
        assert!(freq[1] > 0.2);
    }

    #[test]
    fn rejects_bad_settings() {
        let bad_t = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert_eq!(
            Sampler::new(bad_t).unwrap_err(),
            SamplingError::Temperature(-1.0)
        );
        let bad_p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert_eq!(Sampler::new(bad_p).unwrap_err(), SamplingError::TopP(0.0));
        assert_eq!(
            sampler(0.0, 0, 1.0, 0).sample(&[]).unwrap_err(),
            SamplingError::NoLogits
        );
    }
}
