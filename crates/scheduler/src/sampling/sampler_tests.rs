//! The sampler's distributions, truncations, penalties, logprobs, seeds and refusals,
//! checked by drawing many times.

use super::*;
use std::collections::HashMap;

const DRAWS: usize = 20_000;

fn seeded(params: SamplingParams) -> SamplingParams {
    SamplingParams {
        seed: Some(7),
        ..params
    }
}

fn with_temperature(temperature: f32) -> SamplingParams {
    seeded(SamplingParams {
        temperature,
        ..Default::default()
    })
}

/// Frequencies of each token over [`DRAWS`] seeded draws from the same logits.
fn frequencies(params: SamplingParams, logits: &[f32], generated: &[u32]) -> Vec<f64> {
    let mut sampler = Sampler::new(params, logits.len()).unwrap();
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..DRAWS {
        let token = sampler
            .sample(logits, &[], generated, &[], None)
            .unwrap()
            .token;
        counts[token as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / DRAWS as f64).collect()
}

/// softmax(logits / t) over the tokens `keep` accepts, renormalised; 0 elsewhere.
fn expected(logits: &[f32], t: f32, keep: impl Fn(usize) -> bool) -> Vec<f64> {
    let w: Vec<f64> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            if keep(i) {
                (l as f64 / t as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let z: f64 = w.iter().sum();
    w.iter().map(|w| w / z).collect()
}

/// Each frequency within 5 standard errors of its expectation; excluded tokens never drawn.
fn assert_matches(freq: &[f64], expected: &[f64]) {
    for (i, (&f, &p)) in freq.iter().zip(expected).enumerate() {
        let tolerance = 5.0 * (p * (1.0 - p) / DRAWS as f64).sqrt();
        assert!(
            (f - p).abs() <= tolerance,
            "token {i}: frequency {f} vs expected {p} (±{tolerance})"
        );
    }
}

/// Indices sorted most likely first, a reference for the truncations.
fn ranked(logits: &[f32]) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    ids
}

/// The reference nucleus: the smallest most-likely prefix reaching `top_p` of `probs`.
fn nucleus(probs: &[f64], top_p: f64) -> Vec<usize> {
    let order = ranked(&probs.iter().map(|&p| p as f32).collect::<Vec<_>>());
    let mut mass = 0.0;
    let mut kept = Vec::new();
    for i in order {
        if mass >= top_p || probs[i] == 0.0 {
            break;
        }
        mass += probs[i];
        kept.push(i);
    }
    kept
}

#[test]
fn greedy_takes_the_first_maximum_whatever_the_truncation() {
    let mut s = Sampler::new(
        SamplingParams {
            top_k: 1,
            top_p: 0.1,
            min_p: 1.0,
            ..Default::default()
        },
        4,
    )
    .unwrap();
    let sampled = s
        .sample(&[0.1, 3.0, -1.0, 3.0], &[], &[], &[], None)
        .unwrap();
    assert_eq!(sampled.token, 1);
    assert_eq!((sampled.logprob, sampled.top_logprobs), (None, vec![]));
    assert_eq!(
        argmax(&[f32::NAN, 1.0, f32::NAN, 2.0]),
        3,
        "NaN is never the max"
    );
}

#[test]
fn temperature_scales_the_softmax() {
    let logits = [0.0f32, 1.0, 2.0, 0.5];
    for t in [0.5, 1.0, 2.0] {
        let freq = frequencies(with_temperature(t), &logits, &[]);
        assert_matches(&freq, &expected(&logits, t, |_| true));
    }
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    let logits = [0.3f32, 2.0, -1.0, 1.5, 0.0, 1.0];
    let params = seeded(SamplingParams {
        temperature: 1.0,
        top_k: 3,
        ..Default::default()
    });
    let freq = frequencies(params, &logits, &[]);
    assert_matches(&freq, &expected(&logits, 1.0, |i| [1, 3, 5].contains(&i)));
}

#[test]
fn top_p_keeps_the_nucleus() {
    // Probabilities 0.4, 0.3, 0.2, 0.1: top_p 0.65 keeps two, 0.75 three.
    let logits = [0.4f32, 0.3, 0.2, 0.1].map(f32::ln);
    for (top_p, kept) in [(0.65, 2), (0.75, 3)] {
        let params = seeded(SamplingParams {
            temperature: 1.0,
            top_p,
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[]);
        assert_matches(&freq, &expected(&logits, 1.0, |i| i < kept));
    }
}

#[test]
fn top_p_applies_to_what_top_k_left_renormalised() {
    // top_k 3 leaves 0.4, 0.3, 0.2, renormalised 0.44, 0.33, 0.22: top_p 0.75 keeps two
    // (on the original probabilities it would keep three).
    let logits = [0.4f32, 0.3, 0.2, 0.1].map(f32::ln);
    let params = seeded(SamplingParams {
        temperature: 1.0,
        top_k: 3,
        top_p: 0.75,
        ..Default::default()
    });
    let freq = frequencies(params, &logits, &[]);
    assert_matches(&freq, &expected(&logits, 1.0, |i| i < 2));
}

#[test]
fn min_p_is_relative_to_the_most_likely_after_temperature() {
    // Relative to token 0: e^-1 = 0.37, e^-2 = 0.14, e^-3 = 0.05 at temperature 1; at
    // temperature 2: 0.61, 0.37, 0.22.
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    for (t, kept) in [(1.0, 2), (2.0, 3)] {
        let params = seeded(SamplingParams {
            temperature: t,
            min_p: 0.3,
            ..Default::default()
        });
        let freq = frequencies(params, &logits, &[]);
        assert_matches(&freq, &expected(&logits, t, |i| i < kept));
    }
}

#[test]
fn sampling_a_wide_nucleus_follows_it() {
    let logits: Vec<f32> = (0..300).map(|i| -(i as f32) * 0.01).collect();
    let params = seeded(SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        ..Default::default()
    });
    let want = nucleus(&expected(&logits, 1.0, |_| true), 0.9);
    assert!(want.len() > 64);
    let freq = frequencies(params, &logits, &[]);
    assert_matches(&freq, &expected(&logits, 1.0, |i| want.contains(&i)));
}

#[test]
fn presence_and_frequency_penalties_shift_the_distribution() {
    let logits = [1.0f32, 1.0, 1.0, 1.0];
    let params = seeded(SamplingParams {
        temperature: 1.0,
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..Default::default()
    });
    let freq = frequencies(params, &logits, &[0, 0, 1, 0]);
    let penalised = [1.0 - 0.5 - 3.0 * 0.25, 1.0 - 0.5 - 0.25, 1.0, 1.0];
    assert_matches(&freq, &expected(&penalised, 1.0, |_| true));
}

#[test]
fn negative_presence_penalty_encourages_repeats() {
    let logits = [0.0f32; 3];
    let params = seeded(SamplingParams {
        temperature: 1.0,
        presence_penalty: -1.0,
        ..Default::default()
    });
    let freq = frequencies(params, &logits, &[2]);
    assert_matches(&freq, &expected(&[0.0, 0.0, 1.0], 1.0, |_| true));
}

#[test]
fn repetition_penalty_covers_prompt_and_output() {
    let logits = [2.0f32, -1.0, 0.5, 0.5];
    let mut sampler = Sampler::new(
        seeded(SamplingParams {
            temperature: 1.0,
            repetition_penalty: 1.5,
            ..Default::default()
        }),
        4,
    )
    .unwrap();
    let mut counts = [0usize; 4];
    let mut generated = vec![1];
    for _ in 0..DRAWS {
        let token = sampler
            .sample(&logits, &[0], &generated, &[], None)
            .unwrap()
            .token;
        counts[token as usize] += 1;
        // The output grows, but only with tokens already penalised: the repetition
        // penalty applies once per distinct token, so the distribution stays the same.
        if token <= 1 {
            generated.push(token);
        }
    }
    let freq: Vec<f64> = counts.iter().map(|&c| c as f64 / DRAWS as f64).collect();
    // Token 0 (prompt) is positive, divided; token 1 (output) negative, multiplied.
    let penalised = [2.0 / 1.5, -1.5, 0.5, 0.5];
    assert_matches(&freq, &expected(&penalised, 1.0, |_| true));
}

#[test]
fn logit_bias_is_added() {
    let logits = [0.0f32, 0.0, 0.0];
    let params = seeded(SamplingParams {
        temperature: 1.0,
        logit_bias: HashMap::from([(0, 1.0), (2, -100.0)]),
        ..Default::default()
    });
    let freq = frequencies(params, &logits, &[]);
    assert_eq!(freq[2], 0.0);
    assert_matches(&freq, &expected(&[1.0, 0.0, -100.0], 1.0, |_| true));
}

#[test]
fn banned_tokens_are_never_chosen() {
    let logits = [5.0f32, 0.0, 1.0];
    let mut greedy = Sampler::new(SamplingParams::default(), 3).unwrap();
    assert_eq!(
        greedy.sample(&logits, &[], &[], &[0], None).unwrap().token,
        2
    );
    let mut random = Sampler::new(with_temperature(2.0), 3).unwrap();
    for _ in 0..1000 {
        assert_ne!(
            random
                .sample(&logits, &[], &[], &[0, 2], None)
                .unwrap()
                .token,
            0
        );
    }
    assert_eq!(
        random
            .sample(&logits, &[], &[], &[0, 1, 2], None)
            .unwrap_err(),
        SamplingError::NoCandidates
    );
    assert_eq!(
        greedy
            .sample(&logits, &[], &[], &[0, 1, 2], None)
            .unwrap_err(),
        SamplingError::NoCandidates
    );
}

#[test]
fn logprobs_are_the_log_softmax_after_penalties_before_temperature() {
    let logits: Vec<f32> = (0..50).map(|i| ((i as f32) * 0.7).sin() * 3.0).collect();
    let prompt = [3, 4, 4];
    let generated = [4, 7, 7, 7];
    let params = seeded(SamplingParams {
        temperature: 0.7,
        top_k: 5,
        top_p: 0.9,
        presence_penalty: 0.3,
        frequency_penalty: 0.2,
        repetition_penalty: 1.3,
        logit_bias: HashMap::from([(10, 2.5), (11, -1.0)]),
        logprobs: Some(6),
        ..Default::default()
    });
    let mut processed: Vec<f64> = logits.iter().map(|&l| l as f64).collect();
    for id in [3, 4, 7] {
        let l = &mut processed[id];
        *l = if *l > 0.0 { *l / 1.3 } else { *l * 1.3 };
    }
    processed[4] -= 0.3 + 0.2;
    processed[7] -= 0.3 + 3.0 * 0.2;
    processed[10] += 2.5;
    processed[11] -= 1.0;
    processed[12] = f64::NEG_INFINITY; // banned
    let log_z = processed.iter().map(|l| l.exp()).sum::<f64>().ln();
    let log_softmax: Vec<f64> = processed.iter().map(|l| l - log_z).collect();

    let mut sampler = Sampler::new(params, logits.len()).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let s = sampler
            .sample(&logits, &prompt, &generated, &[12], None)
            .unwrap();
        seen.insert(s.token);
        let lp = s.logprob.unwrap() as f64;
        assert!((lp - log_softmax[s.token as usize]).abs() < 1e-4);
        let want: Vec<usize> = ranked(&log_softmax.iter().map(|&l| l as f32).collect::<Vec<_>>())
            .into_iter()
            .take(6)
            .collect();
        let got: Vec<usize> = s.top_logprobs.iter().map(|&(id, _)| id as usize).collect();
        assert_eq!(got, want);
        for &(id, lp) in &s.top_logprobs {
            assert!((lp as f64 - log_softmax[id as usize]).abs() < 1e-4);
        }
    }
    assert!(
        seen.len() > 1,
        "temperature sampling, yet logprobs did not change"
    );

    let mut only_chosen = Sampler::new(
        SamplingParams {
            logprobs: Some(0),
            ..Default::default()
        },
        logits.len(),
    )
    .unwrap();
    let s = only_chosen.sample(&logits, &[], &[], &[], None).unwrap();
    assert!(s.logprob.is_some() && s.top_logprobs.is_empty());
}

#[test]
fn top_logprobs_skip_impossible_tokens() {
    let mut s = Sampler::new(
        SamplingParams {
            logprobs: Some(5),
            ..Default::default()
        },
        3,
    )
    .unwrap();
    let out = s.sample(&[0.0, 0.0, 1.0], &[], &[], &[1], None).unwrap();
    assert_eq!(out.token, 2);
    let ids: Vec<u32> = out.top_logprobs.iter().map(|&(id, _)| id).collect();
    assert_eq!(ids, [2, 0]);
    let total: f32 = out.top_logprobs.iter().map(|&(_, lp)| lp.exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
}

#[test]
fn a_seed_fixes_the_tokens_whatever_else_is_sampled() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let params = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(seed),
        ..Default::default()
    };
    let alone = {
        let mut s = Sampler::new(params(7), 50).unwrap();
        (0..64)
            .map(|_| s.sample(&logits, &[], &[], &[], None).unwrap().token)
            .collect::<Vec<_>>()
    };
    // The same request batched with others, sampled in between them.
    let mut s = Sampler::new(params(7), 50).unwrap();
    let mut others: Vec<Sampler> = (0..3)
        .map(|i| Sampler::new(params(100 + i), 50).unwrap())
        .collect();
    let mut batched = Vec::new();
    for step in 0..64 {
        for other in others.iter_mut().take(step % 4) {
            other.sample(&logits, &[], &[], &[], None).unwrap();
        }
        batched.push(s.sample(&logits, &[], &[], &[], None).unwrap().token);
    }
    assert_eq!(alone, batched);
    let mut other_seed = Sampler::new(params(8), 50).unwrap();
    let different: Vec<u32> = (0..64)
        .map(|_| {
            other_seed
                .sample(&logits, &[], &[], &[], None)
                .unwrap()
                .token
        })
        .collect();
    assert_ne!(alone, different);
}

#[test]
fn nan_logits_are_never_drawn() {
    let logits = [f32::NAN, 0.0, f32::NAN, 0.0];
    let freq = frequencies(with_temperature(1.0), &logits, &[]);
    assert_eq!(freq[0] + freq[2], 0.0);
}

#[test]
fn rejects_bad_settings() {
    let check = |params: SamplingParams, error: SamplingError| {
        assert_eq!(Sampler::new(params, 10).unwrap_err(), error);
    };
    let p = SamplingParams::default;
    check(
        SamplingParams {
            temperature: -1.0,
            ..p()
        },
        SamplingError::Temperature(-1.0),
    );
    check(
        SamplingParams {
            temperature: f32::INFINITY,
            ..p()
        },
        SamplingError::Temperature(f32::INFINITY),
    );
    check(
        SamplingParams { top_p: 0.0, ..p() },
        SamplingError::TopP(0.0),
    );
    check(
        SamplingParams { top_p: 1.5, ..p() },
        SamplingError::TopP(1.5),
    );
    check(
        SamplingParams { min_p: -0.1, ..p() },
        SamplingError::MinP(-0.1),
    );
    check(
        SamplingParams { min_p: 1.1, ..p() },
        SamplingError::MinP(1.1),
    );
    check(
        SamplingParams {
            presence_penalty: 2.5,
            ..p()
        },
        SamplingError::PresencePenalty(2.5),
    );
    check(
        SamplingParams {
            frequency_penalty: -2.5,
            ..p()
        },
        SamplingError::FrequencyPenalty(-2.5),
    );
    check(
        SamplingParams {
            temperature: 2.5,
            ..p()
        },
        SamplingError::Temperature(2.5),
    );
    check(
        SamplingParams {
            repetition_penalty: 0.0,
            ..p()
        },
        SamplingError::RepetitionPenalty(0.0),
    );
    check(
        SamplingParams {
            repetition_penalty: 2.5,
            ..p()
        },
        SamplingError::RepetitionPenalty(2.5),
    );
    check(
        SamplingParams {
            repetition_penalty: f32::INFINITY,
            ..p()
        },
        SamplingError::RepetitionPenalty(f32::INFINITY),
    );
    check(
        SamplingParams {
            logit_bias: HashMap::from([(3, 100.5)]),
            ..p()
        },
        SamplingError::LogitBias {
            token: 3,
            bias: 100.5,
        },
    );
    check(
        SamplingParams {
            logit_bias: HashMap::from([(12, 1.0), (10, 1.0)]),
            ..p()
        },
        SamplingError::LogitBiasToken {
            token: 10,
            vocab_size: 10,
        },
    );
    check(
        SamplingParams {
            logprobs: Some(21),
            ..p()
        },
        SamplingError::TopLogprobs(21),
    );
    assert_eq!(Sampler::new(p(), 0).unwrap_err(), SamplingError::EmptyVocab);
    assert_eq!(
        SamplingError::LogitBiasToken {
            token: 10,
            vocab_size: 10
        }
        .to_string(),
        "logit_bias names token 10, but the vocabulary has 10 tokens"
    );

    let mut s = Sampler::new(
        SamplingParams {
            frequency_penalty: 1.0,
            ..p()
        },
        3,
    )
    .unwrap();
    assert_eq!(
        s.sample(&[0.0; 4], &[], &[], &[], None).unwrap_err(),
        SamplingError::LogitsLen {
            expected: 3,
            got: 4
        }
    );
    assert_eq!(
        s.sample(&[0.0; 3], &[], &[5], &[], None).unwrap_err(),
        SamplingError::TokenOutOfRange {
            token: 5,
            vocab_size: 3
        }
    );
    assert_eq!(
        s.sample(&[0.0; 3], &[], &[], &[3], None).unwrap_err(),
        SamplingError::TokenOutOfRange {
            token: 3,
            vocab_size: 3
        }
    );
}
