//! The truncations of a random step: which tokens top_k and top_p keep, found by selection
//! rather than by sorting the vocabulary.

use std::cmp::Ordering;

/// Most likely first, the lower id first among equals: a total order on `(id, weight)`.
pub(crate) fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The least likely token that top_k and top_p keep, by [`by_rank`], among the tokens of
/// positive weight (at most 1); `None` when neither cuts. top_k keeps the `top_k` most likely
/// (0: all); top_p then keeps the smallest most-likely set whose weight reaches `top_p` of
/// what top_k left (vLLM's top-p: a token stays when the tokens more likely than it hold less
/// than `top_p`).
pub(crate) fn rank_cutoff(weights: &[f32], top_k: usize, top_p: f32) -> Option<(u32, f32)> {
    if top_k == 0 && top_p >= 1.0 {
        return None;
    }
    let (floor, total) = selection_floor(weights, top_k, top_p);
    let mut candidates: Vec<(u32, f32)> = weights
        .iter()
        .enumerate()
        .filter(|&(_, &w)| w > 0.0 && w >= floor)
        .map(|(id, &w)| (id as u32, w))
        .collect();
    let mut cutoff = None;
    let mut kept_total = total;
    if top_k > 0 && top_k < candidates.len() {
        candidates.select_nth_unstable_by(top_k - 1, by_rank);
        cutoff = Some(candidates[top_k - 1]);
        candidates.truncate(top_k);
        kept_total = candidates.iter().map(|&(_, w)| w as f64).sum();
    }
    if top_p < 1.0 {
        cutoff = Some(nucleus_cutoff(&mut candidates, kept_total * top_p as f64));
    }
    cutoff
}

/// A weight such that the tokens at or above it are enough to decide the cutoffs, and the
/// total weight. Selecting among the whole vocabulary costs several passes over it, while a
/// trained model puts nearly all its probability on a few dozen tokens: so the weights are
/// counted by binary order of magnitude, four octaves per bucket, in one pass, and selection
/// only considers the buckets needed to hold `top_k` tokens or, without top_k, `top_p` of the
/// weight.
fn selection_floor(weights: &[f32], top_k: usize, top_p: f32) -> (f32, f64) {
    const BUCKETS: usize = 32;
    let mut count = [0usize; BUCKETS];
    let mut mass = [0f64; BUCKETS];
    for &w in weights.iter().filter(|&&w| w > 0.0) {
        // w <= 1, so its biased exponent is at most 127: octave o holds [2^-o, 2^(1-o)).
        let octave = 127 - ((w.to_bits() >> 23) & 0xff) as usize;
        let bucket = (octave / 4).min(BUCKETS - 1);
        count[bucket] += 1;
        mass[bucket] += w as f64;
    }
    let total: f64 = mass.iter().sum();
    let (mut tokens, mut weight) = (0, 0.0);
    for bucket in 0..BUCKETS - 1 {
        tokens += count[bucket];
        weight += mass[bucket];
        let enough = if top_k > 0 {
            tokens >= top_k
        } else {
            weight >= total * top_p as f64
        };
        if enough {
            // The smallest weight of the bucket, whose lowest octave is 4 * bucket + 3.
            return (0.5f32.powi(4 * bucket as i32 + 3), total);
        }
    }
    (0.0, total)
}

/// The least likely token of the top-p nucleus of `candidates` (not empty, ranked before any
/// token left out of them): the token at which their running weight, most likely first,
/// reaches `target`. By weighted quickselect: split around the median rank, keep the half
/// where the running weight crosses the target, repeat; O(n) expected, where sorting would
/// be O(n log n) on every step for flat distributions, whose nucleus is most of the
/// vocabulary.
fn nucleus_cutoff(candidates: &mut [(u32, f32)], target: f64) -> (u32, f32) {
    // Invariant: `above` is the weight of the tokens ranked before candidates[lo..hi], less
    // than the target, and the crossing token is in candidates[lo..hi].
    let (mut lo, mut hi, mut above) = (0, candidates.len(), 0.0);
    while hi - lo > 32 {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, by_rank);
        let upper: f64 = candidates[lo..=mid].iter().map(|&(_, w)| w as f64).sum();
        if above + upper >= target {
            hi = mid + 1;
        } else {
            above += upper;
            lo = mid + 1;
        }
    }
    let rest = &mut candidates[lo..hi];
    rest.sort_unstable_by(by_rank);
    for &candidate in rest.iter() {
        above += candidate.1 as f64;
        if above >= target {
            return candidate;
        }
    }
    // Rounding left the sum just short of the target: keep everything.
    rest[rest.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vocabularies whose nucleus is hundreds of tokens, so that the quickselect has to
    /// recurse, with min_p and top_k in front of it, with many tied weights, and with a tail
    /// that the selection floor leaves out or (top_k 100 > 30 likely tokens) must not: the
    /// kept set must be exactly the one a full sort gives.
    #[test]
    fn cutoffs_equal_a_full_sort() {
        let spread: Vec<f32> = (0..1500)
            .map(|i| ((i * 7919) % 1500) as f32 * -0.004 + (i % 3) as f32 * 0.01)
            .collect();
        let tied: Vec<f32> = (0..1500).map(|i| (i % 50) as f32 * -0.02).collect();
        // A trained model's shape: a few likely tokens, a long tail many octaves below.
        let peaked: Vec<f32> = (0..3000)
            .map(|i| {
                if i % 100 == 7 {
                    -(i as f32) * 1e-3
                } else {
                    -20.0 - (i % 13) as f32
                }
            })
            .collect();
        let cases = [
            (&spread, 0, 0.9, 0.0),
            (&spread, 800, 0.95, 0.0),
            (&spread, 0, 0.8, 0.01),
            (&spread, 700, 1.0, 0.0),
            (&tied, 0, 0.5, 0.0),
            (&tied, 333, 0.9, 0.0),
            (&peaked, 0, 0.9, 0.0),
            (&peaked, 5, 1.0, 0.0),
            (&peaked, 100, 0.999_999_9, 0.0),
        ];
        for (logits, top_k, top_p, min_p) in cases {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = logits
                .iter()
                .map(|&l| {
                    let w = (l - max).exp();
                    if w >= min_p {
                        w
                    } else {
                        0.0
                    }
                })
                .collect();
            let cutoff = rank_cutoff(&weights, top_k, top_p).unwrap();

            let mut ranked: Vec<(u32, f32)> = weights
                .iter()
                .enumerate()
                .filter(|&(_, &w)| w > 0.0)
                .map(|(i, &w)| (i as u32, w))
                .collect();
            ranked.sort_by(by_rank);
            let got: Vec<u32> = ranked
                .iter()
                .filter(|c| by_rank(c, &cutoff).is_le())
                .map(|&(i, _)| i)
                .collect();

            if top_k > 0 {
                ranked.truncate(top_k);
            }
            let total: f64 = ranked.iter().map(|&(_, w)| w as f64).sum();
            let mut mass = 0.0;
            let mut want = Vec::new();
            for &(i, w) in &ranked {
                if mass >= top_p as f64 {
                    break;
                }
                mass += w as f64 / total;
                want.push(i);
            }
            assert_eq!(got, want, "top_k {top_k} top_p {top_p} min_p {min_p}");
            assert!(!want.is_empty());
        }
    }
}
