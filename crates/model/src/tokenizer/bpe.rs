//! SentencePiece's BPE segmentation (`bpe_model.cc`, `Model::SampleEncode` without dropout).
//!
//! Unlike Hugging Face BPE, which applies a ranked list of merge rules, SentencePiece merges the
//! adjacent pair whose concatenation is the vocabulary piece with the highest score, taking the
//! leftmost pair on ties, until no adjacent pair forms a piece. Reproducing that order exactly is
//! what makes the ids equal to the reference, so this follows the C++ step by step, including
//! its stale-candidate check and the resegmentation of UNUSED pieces.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// What the vocabulary says about a candidate merge result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MergeTarget {
    pub(crate) score: f32,
    /// UNUSED pieces may be formed during merging but are split back into their parts after.
    pub(crate) unused: bool,
}

/// A candidate merge of `symbols[left]` and `symbols[right]` into a piece of `size` bytes.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Candidate {
    /// The C++ comparator: a higher score first, then the leftmost. Scores compare like C++
    /// floats (`-0.0 == 0.0`), not by `total_cmp`, so ties are the same ties.
    fn cmp(&self, other: &Self) -> Ordering {
        if self.score < other.score {
            Ordering::Less
        } else if self.score > other.score {
            Ordering::Greater
        } else {
            other.left.cmp(&self.left)
        }
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// A run of the normalised text; `start == end` once merged into its left neighbour.
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// User-defined symbols never merge.
    frozen: bool,
}

/// Splits `normalized` into pieces.
///
/// `initial` gives the length in bytes of the first symbol at the start of a string and whether
/// it is frozen (a user-defined symbol); `lookup` says whether a string is a mergeable piece
/// (NORMAL, USER_DEFINED or UNUSED) and with which score. The returned slices cover the input;
/// mapping them to ids (and unknown ones to byte pieces) is the caller's job.
pub(crate) fn segment<'a>(
    normalized: &'a str,
    initial: impl Fn(&str) -> (usize, bool),
    lookup: impl Fn(&str) -> Option<MergeTarget>,
) -> Vec<&'a str> {
    let mut symbols: Vec<Symbol> = Vec::new();
    let mut pos = 0;
    while pos < normalized.len() {
        let (len, frozen) = initial(&normalized[pos..]);
        let index = symbols.len();
        symbols.push(Symbol {
            start: pos,
            end: pos + len,
            prev: index.checked_sub(1),
            next: (pos + len < normalized.len()).then_some(index + 1),
            frozen,
        });
        pos += len;
    }
    if symbols.is_empty() {
        return Vec::new();
    }

    let mut agenda = BinaryHeap::new();
    // Merged UNUSED piece -> the two pieces it was made of, for resegmentation.
    let mut rev_merge: HashMap<&'a str, (&'a str, &'a str)> = HashMap::new();
    let mut maybe_add = |symbols: &[Symbol],
                         agenda: &mut BinaryHeap<Candidate>,
                         left: Option<usize>,
                         right: Option<usize>| {
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (l, r) = (&symbols[left], &symbols[right]);
        if l.frozen || r.frozen {
            return;
        }
        let piece = &normalized[l.start..r.end];
        let Some(target) = lookup(piece) else { return };
        agenda.push(Candidate {
            score: target.score,
            left,
            right,
            size: piece.len(),
        });
        if target.unused {
            rev_merge.insert(
                piece,
                (&normalized[l.start..l.end], &normalized[r.start..r.end]),
            );
        }
    };

    for i in 1..symbols.len() {
        maybe_add(&symbols, &mut agenda, Some(i - 1), Some(i));
    }

    while let Some(top) = agenda.pop() {
        let (left_len, right_len) = (
            symbols[top.left].end - symbols[top.left].start,
            symbols[top.right].end - symbols[top.right].start,
        );
        // Stale: one side was merged away, or grew, since this candidate was pushed.
        if left_len == 0 || right_len == 0 || left_len + right_len != top.size {
            continue;
        }
        let right_next = symbols[top.right].next;
        symbols[top.left].end = symbols[top.right].end;
        symbols[top.left].next = right_next;
        if let Some(next) = right_next {
            symbols[next].prev = Some(top.left);
        }
        symbols[top.right].end = symbols[top.right].start;
        let left_prev = symbols[top.left].prev;
        maybe_add(&symbols, &mut agenda, left_prev, Some(top.left));
        maybe_add(&symbols, &mut agenda, Some(top.left), right_next);
    }

    let mut output = Vec::new();
    let mut index = Some(0);
    while let Some(i) = index {
        resegment(
            &normalized[symbols[i].start..symbols[i].end],
            &lookup,
            &rev_merge,
            &mut output,
        );
        index = symbols[i].next;
    }
    output
}

/// Splits an UNUSED piece back into the pieces it was merged from, recursively.
fn resegment<'a>(
    piece: &'a str,
    lookup: &impl Fn(&str) -> Option<MergeTarget>,
    rev_merge: &HashMap<&'a str, (&'a str, &'a str)>,
    output: &mut Vec<&'a str>,
) {
    let unused = lookup(piece).is_some_and(|t| t.unused);
    match rev_merge.get(piece) {
        Some(&(left, right)) if unused => {
            resegment(left, lookup, rev_merge, output);
            resegment(right, lookup, rev_merge, output);
        }
        _ => output.push(piece),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One UTF-8 character per initial symbol, no user-defined symbols.
    fn by_char(s: &str) -> (usize, bool) {
        (s.chars().next().map_or(0, char::len_utf8), false)
    }

    fn run(text: &str, vocab: &[(&str, f32, bool)]) -> Vec<String> {
        let map: HashMap<&str, MergeTarget> = vocab
            .iter()
            .map(|&(p, score, unused)| (p, MergeTarget { score, unused }))
            .collect();
        segment(text, by_char, |p| map.get(p).copied())
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn merges_highest_score_first() {
        // "bc" outranks "ab", so "abc" becomes a + bc, even though "ab" is leftmost.
        let vocab = [("ab", -2.0, false), ("bc", -1.0, false)];
        assert_eq!(run("abc", &vocab), ["a", "bc"]);
        let vocab = [("ab", -1.0, false), ("bc", -2.0, false)];
        assert_eq!(run("abc", &vocab), ["ab", "c"]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        let vocab = [("aa", -1.0, false)];
        assert_eq!(run("aaa", &vocab), ["aa", "a"]);
        assert_eq!(run("aaaaa", &vocab), ["aa", "aa", "a"]);
        // -0.0 and 0.0 are the same score, as in C++.
        let vocab = [("ab", -0.0, false), ("bc", 0.0, false)];
        assert_eq!(run("abc", &vocab), ["ab", "c"]);
    }

    #[test]
    fn merges_cascade_and_stop_when_no_pair_is_a_piece() {
        let vocab = [
            ("▁t", 0.0, false),
            ("he", -1.0, false),
            ("▁the", -2.0, false),
            ("re", -3.0, false),
        ];
        assert_eq!(run("▁there", &vocab), ["▁the", "re"]);
        assert_eq!(run("xyz", &vocab), ["x", "y", "z"]);
        assert!(run("", &vocab).is_empty());
    }

    #[test]
    fn unused_pieces_are_split_back() {
        // "ab" is UNUSED: it may be formed (and feed "abc"), but not be output.
        let vocab = [("ab", -1.0, true), ("abc", -2.0, false)];
        assert_eq!(run("abc", &vocab), ["abc"]);
        assert_eq!(run("abd", &vocab), ["a", "b", "d"]);
    }

    #[test]
    fn frozen_symbols_do_not_merge() {
        let initial = |s: &str| {
            if s.starts_with("<x>") {
                (3, true)
            } else {
                by_char(s)
            }
        };
        let lookup = |p: &str| {
            ["a<x>", "<x>a", "aa"].contains(&p).then_some(MergeTarget {
                score: 0.0,
                unused: false,
            })
        };
        assert_eq!(segment("a<x>aa", initial, lookup), ["a", "<x>", "aa"]);
    }
}
