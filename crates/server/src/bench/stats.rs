//! The statistics a benchmark reports, and the helpers that format them into its JSON.

use serde_json::Value;

/// The window of a level in which every chat was decoding, from each chat's token arrival
/// times (seconds, any common origin).
#[derive(Debug, PartialEq)]
pub(super) struct DecodeWindow {
    /// The last chat's first token.
    pub(super) start: f64,
    /// The first finished chat's last token.
    pub(super) end: f64,
    /// Tokens that arrived in (start, end].
    pub(super) tokens: usize,
    /// Mean number of tokens a chat had generated before each counted token.
    pub(super) mean_generated: f64,
}

pub(super) fn decode_window(token_times: &[Vec<f64>]) -> Option<DecodeWindow> {
    let start = token_times
        .iter()
        .map(|t| t.first().copied())
        .try_fold(f64::NEG_INFINITY, |acc, t| t.map(|t| acc.max(t)))?;
    let end = token_times
        .iter()
        .map(|t| t.last().copied())
        .try_fold(f64::INFINITY, |acc, t| t.map(|t| acc.min(t)))?;
    if end <= start {
        return None;
    }
    let (mut tokens, mut generated) = (0, 0);
    for times in token_times {
        for (k, &t) in times.iter().enumerate() {
            if t > start && t <= end {
                tokens += 1;
                generated += k;
            }
        }
    }
    (tokens > 0).then(|| DecodeWindow {
        start,
        end,
        tokens,
        mean_generated: generated as f64 / tokens as f64,
    })
}

/// Nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub(super) fn round(v: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (v * scale).round() / scale
}

pub(super) fn mib(bytes: usize) -> usize {
    bytes >> 20
}

pub(super) fn push(array: &mut Value, item: Value) {
    if let Value::Array(items) = array {
        items.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_window_counts_tokens_while_all_chats_decode() {
        // Chat 0 starts at 1 s, one token per second, 6 tokens (last at 6 s); chat 1 starts
        // at 3 s and ends at 8 s. Both decode in (3, 6]: chat 0's tokens at 4, 5, 6 and
        // chat 1's at 4, 5, 6.
        let times = vec![
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            vec![3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        ];
        let w = decode_window(&times).unwrap();
        assert_eq!((w.start, w.end, w.tokens), (3.0, 6.0, 6));
        // chat 0's tokens 3..=5 (3, 4, 5 generated before), chat 1's 1..=3
        assert_eq!(w.mean_generated, (3 + 4 + 5 + 1 + 2 + 3) as f64 / 6.0);
    }

    #[test]
    fn decode_window_of_one_chat_is_its_decode_rate() {
        let w = decode_window(&[vec![0.5, 0.6, 0.7, 0.8]]).unwrap();
        assert_eq!(w.tokens, 3);
        assert!((w.tokens as f64 / (w.end - w.start) - 10.0).abs() < 1e-9);
    }

    #[test]
    fn no_window_when_a_chat_ends_before_another_starts() {
        assert_eq!(decode_window(&[vec![1.0, 2.0], vec![3.0, 4.0]]), None);
        assert_eq!(decode_window(&[vec![1.0]]), None);
        assert_eq!(decode_window(&[vec![1.0, 2.0], vec![]]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
