//! A SentencePiece BPE model: `tokenizer.model` loaded natively, encoding and decoding as the
//! `sentencepiece` library does.
//!
//! The published checkpoint ships no `tokenizer.json`, and the reference is the slow
//! `LlamaTokenizer`, which calls the C++ library chunk by chunk. Rather than convert the model to
//! a Hugging Face BPE (whose merge ranks only approximate SentencePiece's score order), this
//! reproduces `sentencepiece_processor.cc`: identity normalisation with the dummy prefix, BPE by
//! score (`bpe`), byte fallback, and the decoder with its quirks (the first `▁` of a
//! sequence is dropped, unknown piece strings pass through verbatim, invalid UTF-8 in byte pieces
//! becomes one U+FFFD per byte).

use std::collections::HashMap;

use super::bpe::{self, MergeTarget};
use super::proto::{ModelProto, PieceType, MODEL_TYPE_BPE};

/// `▁` (U+2581): how SentencePiece writes a space inside pieces.
pub(crate) const SPACE_SYMBOL: &str = "\u{2581}";

#[derive(Debug, Clone)]
struct Piece {
    text: String,
    score: f32,
    kind: PieceType,
    /// The byte a BYTE piece (`<0xXX>`) stands for.
    byte: Option<u8>,
}

/// A loaded SentencePiece BPE model.
#[derive(Debug, Clone)]
pub(crate) struct SentencePiece {
    pieces: Vec<Piece>,
    /// NORMAL, USER_DEFINED and UNUSED pieces: the ones BPE may form.
    mergeable: HashMap<String, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces: found by `piece_to_id` but never formed by merging.
    reserved: HashMap<String, u32>,
    /// Matched whole, before splitting into characters, and never merged further.
    user_defined: Vec<String>,
    unk_id: u32,
    /// Byte -> id of its `<0xXX>` piece, when byte fallback is on.
    byte_ids: Option<[u32; 256]>,
    unk_surface: String,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// The byte a `<0xXX>` piece stands for.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

impl SentencePiece {
    /// Validates the model as `ModelInterface::InitializePieces` does, and rejects the
    /// configurations this implementation does not reproduce (non-BPE, rule-based
    /// normalisation, whitespace as suffix) instead of tokenizing them differently.
    pub(crate) fn from_proto(proto: ModelProto) -> Result<Self, String> {
        if proto.trainer_spec.model_type != MODEL_TYPE_BPE {
            return Err(format!(
                "model type {} is not BPE (2); only SentencePiece BPE models are supported",
                proto.trainer_spec.model_type
            ));
        }
        let normalizer = &proto.normalizer_spec;
        if normalizer.has_charsmap {
            return Err(format!(
                "normalization rule {:?} is not supported, only identity",
                normalizer.name
            ));
        }
        if proto
            .denormalizer_spec
            .as_ref()
            .is_some_and(|d| d.has_charsmap)
        {
            return Err("a denormalizer is not supported".to_owned());
        }
        if proto.trainer_spec.treat_whitespace_as_suffix {
            return Err("treat_whitespace_as_suffix is not supported".to_owned());
        }

        let byte_fallback = proto.trainer_spec.byte_fallback;
        let mut mergeable = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user_defined = Vec::new();
        let mut unk_id = None;
        let mut byte_ids: [Option<u32>; 256] = [None; 256];
        let mut pieces = Vec::with_capacity(proto.pieces.len());
        for (id, p) in proto.pieces.into_iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| "too many pieces".to_owned())?;
            if p.piece.is_empty() {
                return Err(format!("piece {id} is empty"));
            }
            let is_mergeable = matches!(
                p.kind,
                PieceType::Normal | PieceType::UserDefined | PieceType::Unused
            );
            let map = if is_mergeable {
                &mut mergeable
            } else {
                &mut reserved
            };
            if map.insert(p.piece.clone(), id).is_some() {
                return Err(format!("piece {:?} is defined twice", p.piece));
            }
            let mut byte = None;
            match p.kind {
                PieceType::UserDefined => user_defined.push(p.piece.clone()),
                PieceType::Unknown if unk_id.is_some() => {
                    return Err("two unknown pieces".to_owned())
                }
                PieceType::Unknown => unk_id = Some(id),
                PieceType::Byte => {
                    if !byte_fallback {
                        return Err(format!(
                            "byte piece {:?} found although byte_fallback is false",
                            p.piece
                        ));
                    }
                    let b = parse_byte_piece(&p.piece)
                        .ok_or_else(|| format!("invalid byte piece {:?}", p.piece))?;
                    byte_ids[usize::from(b)] = Some(id);
                    byte = Some(b);
                }
                PieceType::Normal | PieceType::Control | PieceType::Unused => {}
            }
            pieces.push(Piece {
                text: p.piece,
                score: p.score,
                kind: p.kind,
                byte,
            });
        }
        let unk_id = unk_id.ok_or("no unknown piece")?;
        let byte_ids = if byte_fallback {
            let mut ids = [0; 256];
            for (b, id) in byte_ids.iter().enumerate() {
                ids[b] = id.ok_or_else(|| {
                    format!("byte_fallback is on but there is no piece <0x{b:02X}>")
                })?;
            }
            Some(ids)
        } else {
            None
        };
        // Longest first, so the first match is the longest, as the C++ prefix matcher returns.
        user_defined.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Ok(SentencePiece {
            pieces,
            mergeable,
            reserved,
            user_defined,
            unk_id,
            byte_ids,
            unk_surface: proto.trainer_spec.unk_surface,
            add_dummy_prefix: normalizer.add_dummy_prefix,
            remove_extra_whitespaces: normalizer.remove_extra_whitespaces,
            escape_whitespaces: normalizer.escape_whitespaces,
        })
    }

    /// Number of pieces in the model.
    pub(crate) fn len(&self) -> usize {
        self.pieces.len()
    }

    /// The piece string of `id` (`▁hello`, `<0x0A>`, `<s>`).
    pub(crate) fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// `PieceToId` without its fallback to the unknown id.
    pub(crate) fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.mergeable
            .get(piece)
            .or_else(|| self.reserved.get(piece))
            .copied()
    }

    /// The bytes `id` contributes to decoded text: `▁` as a space, `<0xXX>` as that byte;
    /// control pieces contribute nothing and the unknown piece its surface (` ⁇ `).
    pub(crate) fn piece_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.pieces.get(id as usize)?;
        Some(match (piece.kind, piece.byte) {
            (_, Some(b)) => vec![b],
            (PieceType::Control, _) => Vec::new(),
            (PieceType::Unknown, _) => self.unk_surface.as_bytes().to_vec(),
            _ => piece.text.replace(SPACE_SYMBOL, " ").into_bytes(),
        })
    }

    /// Length of the symbol starting `s` and whether it is a user-defined symbol: the longest
    /// user-defined symbol that prefixes `s`, else one character.
    fn prefix_match(&self, s: &str) -> (usize, bool) {
        match self.user_defined.iter().find(|u| s.starts_with(u.as_str())) {
            Some(u) => (u.len(), true),
            None => (s.chars().next().map_or(0, char::len_utf8), false),
        }
    }

    /// `Normalizer::Normalize` for a model without normalisation rules: the dummy prefix,
    /// spaces escaped as `▁`, and optionally extra whitespace removed.
    fn normalize(&self, text: &str) -> String {
        let mut input = text;
        if self.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        if input.is_empty() {
            return String::new();
        }
        let space = if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        let mut out = String::with_capacity(input.len() * 3);
        if self.add_dummy_prefix {
            out.push_str(space);
        }
        let mut prev_is_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (len, _) = self.prefix_match(input);
            let mut unit = &input[..len];
            input = &input[len..];
            if prev_is_space {
                unit = unit.trim_start_matches(' ');
            }
            if !unit.is_empty() {
                out.push_str(&unit.replace(' ', space));
                prev_is_space = unit.ends_with(' ');
            }
            if !self.remove_extra_whitespaces {
                prev_is_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        out
    }

    /// `SentencePieceProcessor::Encode` to ids: normalise, segment, then map pieces to ids;
    /// unknown pieces become their UTF-8 bytes with byte fallback, else one unknown id per run.
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let pieces = bpe::segment(
            &normalized,
            |s| self.prefix_match(s),
            |p| {
                let id = *self.mergeable.get(p)?;
                let piece = &self.pieces[id as usize];
                Some(MergeTarget {
                    score: piece.score,
                    unused: piece.kind == PieceType::Unused,
                })
            },
        );
        let mut ids = Vec::with_capacity(pieces.len());
        let mut prev_is_unk = false;
        for piece in pieces {
            let id = self.piece_to_id(piece).unwrap_or(self.unk_id);
            let is_unk = id == self.unk_id;
            match (&self.byte_ids, is_unk) {
                (Some(byte_ids), true) => {
                    ids.extend(piece.bytes().map(|b| byte_ids[usize::from(b)]))
                }
                (None, true) if prev_is_unk => {}
                _ => ids.push(id),
            }
            prev_is_unk = is_unk;
        }
        ids
    }

    /// `SentencePieceProcessor::Decode` of piece strings, as `sp_model.decode(tokens)` is called
    /// by the slow tokenizer: each string is looked up again, so strings that are not pieces
    /// (the slow tokenizer strips a `▁` before decoding) count as unknown and pass through as
    /// they are, `▁` included.
    pub(crate) fn decode_pieces(&self, pieces: &[&str]) -> String {
        let mut text = String::new();
        let mut bytes = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for &piece in pieces {
            let id = self.piece_to_id(piece).unwrap_or(self.unk_id);
            let info = &self.pieces[id as usize];
            if let Some(b) = info.byte {
                bytes.push(b);
                continue;
            }
            push_bytes_lossy(&mut text, &bytes);
            bytes.clear();
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            let decoded = match info.kind {
                PieceType::Control => {
                    bos_ws_seen = false;
                    String::new()
                }
                PieceType::Unknown => {
                    bos_ws_seen = false;
                    if info.text == piece {
                        self.unk_surface.clone()
                    } else {
                        piece.to_owned()
                    }
                }
                _ => {
                    let mut rest = piece;
                    bos_ws_seen = false;
                    if is_bos_ws && (self.add_dummy_prefix || self.remove_extra_whitespaces) {
                        if let Some(stripped) = rest.strip_prefix(SPACE_SYMBOL) {
                            rest = stripped;
                            bos_ws_seen = !self.remove_extra_whitespaces;
                        }
                    }
                    rest.replace(SPACE_SYMBOL, " ")
                }
            };
            text.push_str(&decoded);
        }
        push_bytes_lossy(&mut text, &bytes);
        text
    }

    /// `decode_pieces` of the pieces of `ids`: what `sp_model.decode(ids)` returns.
    #[cfg(test)]
    pub(crate) fn decode_ids(&self, ids: &[u32]) -> String {
        let pieces: Vec<&str> = ids.iter().filter_map(|&id| self.id_to_piece(id)).collect();
        self.decode_pieces(&pieces)
    }
}

/// Appends bytes as SentencePiece decodes byte pieces: each valid UTF-8 character as is, each
/// byte that does not start one as U+FFFD. Unlike `String::from_utf8_lossy`, a truncated
/// multi-byte sequence gives one U+FFFD per byte, not one per sequence.
fn push_bytes_lossy(text: &mut String, bytes: &[u8]) {
    let mut rest = bytes;
    while let Some(&lead) = rest.first() {
        let len = match lead {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 0,
        };
        match rest
            .get(..len)
            .filter(|_| len > 0)
            .and_then(|c| std::str::from_utf8(c).ok())
        {
            Some(c) => {
                text.push_str(c);
                rest = &rest[len..];
            }
            None => {
                text.push('\u{fffd}');
                rest = &rest[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::proto::{NormalizerSpec, PieceProto, TrainerSpec};
    use serde_json::Value;
    use std::path::PathBuf;

    fn demo_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo-internvl")
    }

    fn demo() -> SentencePiece {
        let bytes = std::fs::read(demo_dir().join("tokenizer.model")).unwrap();
        SentencePiece::from_proto(ModelProto::parse(&bytes).unwrap()).unwrap()
    }

    /// A tiny model: `<unk>`, `<s>`, `</s>`, optional bytes, then the given NORMAL pieces.
    fn tiny(
        normal: &[(&str, f32)],
        byte_fallback: bool,
        normalizer: NormalizerSpec,
    ) -> SentencePiece {
        let piece = |text: &str, score: f32, kind: PieceType| PieceProto {
            piece: text.into(),
            score,
            kind,
        };
        let mut pieces = vec![
            piece("<unk>", 0.0, PieceType::Unknown),
            piece("<s>", 0.0, PieceType::Control),
            piece("</s>", 0.0, PieceType::Control),
        ];
        if byte_fallback {
            pieces
                .extend((0..=255u8).map(|b| piece(&format!("<0x{b:02X}>"), 0.0, PieceType::Byte)));
        }
        pieces.extend(normal.iter().map(|&(t, s)| piece(t, s, PieceType::Normal)));
        let trainer_spec = TrainerSpec {
            model_type: MODEL_TYPE_BPE,
            byte_fallback,
            treat_whitespace_as_suffix: false,
            unk_surface: " \u{2047} ".into(),
        };
        let proto = ModelProto {
            pieces,
            trainer_spec,
            normalizer_spec: normalizer,
            denormalizer_spec: None,
        };
        SentencePiece::from_proto(proto).unwrap()
    }

    fn llama_normalizer() -> NormalizerSpec {
        NormalizerSpec {
            name: "identity".into(),
            remove_extra_whitespaces: false,
            ..NormalizerSpec::default()
        }
    }

    #[test]
    fn normalizes_like_llama() {
        let sp = tiny(&[], false, llama_normalizer());
        assert_eq!(sp.normalize(""), "");
        assert_eq!(sp.normalize(" "), "▁▁");
        assert_eq!(sp.normalize("a  b\n"), "▁a▁▁b\n");
    }

    #[test]
    fn removes_extra_whitespace_when_asked() {
        let sp = tiny(&[], false, NormalizerSpec::default());
        assert_eq!(sp.normalize("   "), "");
        assert_eq!(sp.normalize("  a   b  "), "▁a▁b");
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_or_one_unk_per_run() {
        let with_bytes = tiny(&[("▁a", -1.0)], true, llama_normalizer());
        // "é" is C3 A9: byte pieces are 3 + byte.
        assert_eq!(with_bytes.encode("aé"), [259, 3 + 0xc3, 3 + 0xa9]);
        let without = tiny(&[("▁a", -1.0), ("a", -2.0)], false, llama_normalizer());
        assert_eq!(without.encode("aéé"), [3, 0]);
        // "▁" is not a piece either: "▁é" is one unknown run, "é" after "a" another.
        assert_eq!(without.encode("éaé"), [0, 4, 0]);
    }

    #[test]
    fn decoder_drops_only_the_first_dummy_prefix() {
        let sp = tiny(&[("▁", -1.0), ("▁a", -2.0)], false, llama_normalizer());
        assert_eq!(sp.decode_pieces(&["▁a", "▁a"]), "a a");
        assert_eq!(sp.decode_pieces(&["▁", "▁a"]), " a");
        assert_eq!(sp.decode_pieces(&["<s>", "▁a"]), "a");
        assert_eq!(sp.decode_pieces(&["<unk>", "▁a"]), " \u{2047}  a");
        assert_eq!(
            sp.decode_pieces(&["", "▁a"]),
            "a",
            "a non-piece string is unknown and passes through"
        );
        assert_eq!(
            sp.decode_pieces(&["▁▁▁"]),
            "▁▁▁",
            "not a piece: verbatim, ▁ not replaced"
        );
    }

    #[test]
    fn bytes_decode_one_replacement_per_invalid_byte() {
        let mut s = String::new();
        push_bytes_lossy(
            &mut s,
            &[0xe4, 0xbd, b'a', 0xff, 0xed, 0xa0, 0x80, 0xef, 0xbf, 0xbd],
        );
        assert_eq!(
            s,
            "\u{fffd}\u{fffd}a\u{fffd}\u{fffd}\u{fffd}\u{fffd}\u{fffd}"
        );
        assert_eq!(
            String::from_utf8_lossy(&[0xe4, 0xbd]),
            "\u{fffd}",
            "std differs"
        );
    }

    #[test]
    fn rejects_what_it_does_not_implement() {
        let bytes = std::fs::read(demo_dir().join("tokenizer.model")).unwrap();
        let proto = ModelProto::parse(&bytes).unwrap();
        let mut unigram = proto.clone();
        unigram.trainer_spec.model_type = 1;
        assert!(SentencePiece::from_proto(unigram)
            .unwrap_err()
            .contains("not BPE"));
        let mut nfkc = proto.clone();
        nfkc.normalizer_spec.has_charsmap = true;
        assert!(SentencePiece::from_proto(nfkc).is_err());
        let mut no_bytes = proto;
        no_bytes.trainer_spec.byte_fallback = false;
        assert!(SentencePiece::from_proto(no_bytes)
            .unwrap_err()
            .contains("byte_fallback"));
    }

    /// The corpus's raw `sentencepiece` decodes of byte-fallback id sequences.
    #[test]
    fn raw_decodes_equal_sentencepiece() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/reference/tokenizer_corpus.json");
        let corpus: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let sp = demo();
        let cases = corpus["byte_piece_decodes"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                sp.decode_ids(&ids),
                case["sentencepiece_decode"].as_str().unwrap(),
                "ids {ids:?}"
            );
        }
    }

    #[test]
    fn piece_bytes_of_the_demo_model() {
        let sp = demo();
        assert_eq!(sp.piece_bytes(3 + 0x0a), Some(vec![b'\n']));
        assert_eq!(
            sp.piece_bytes(sp.piece_to_id("▁the").unwrap()),
            Some(b" the".to_vec())
        );
        assert_eq!(sp.piece_bytes(1), Some(Vec::new()));
        assert_eq!(sp.piece_bytes(0), Some(" \u{2047} ".as_bytes().to_vec()));
        assert_eq!(sp.piece_bytes(sp.len() as u32), None);
    }
}
