//! The parts of SentencePiece's `ModelProto` (`sentencepiece_model.proto`) that encoding and
//! decoding depend on, read with a minimal protobuf wire-format reader.
//!
//! A hand-written reader keeps the crate free of a protobuf code generator for one message type;
//! `tokenizer.model` is a plain proto2 message, so varints, fixed32 floats and length-delimited
//! strings and sub-messages are all it takes. Unknown fields are skipped, as protobuf requires,
//! and absent fields take the defaults declared in the `.proto` file.

use std::fmt;

/// Why a `tokenizer.model` could not be read; the caller adds the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtoError(pub(crate) String);

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn error<T>(message: impl Into<String>) -> Result<T, ProtoError> {
    Err(ProtoError(message.into()))
}

/// One field value as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    fn varint(self, field: u32) -> Result<u64, ProtoError> {
        match self {
            Value::Varint(v) => Ok(v),
            other => error(format!("field {field}: expected a varint, found {other:?}")),
        }
    }

    fn bool(self, field: u32) -> Result<bool, ProtoError> {
        Ok(self.varint(field)? != 0)
    }

    fn float(self, field: u32) -> Result<f32, ProtoError> {
        match self {
            Value::Fixed32(bits) => Ok(f32::from_bits(bits)),
            other => error(format!(
                "field {field}: expected a 32-bit float, found {other:?}"
            )),
        }
    }

    fn bytes(self, field: u32) -> Result<&'a [u8], ProtoError> {
        match self {
            Value::Bytes(bytes) => Ok(bytes),
            other => error(format!(
                "field {field}: expected a length-delimited value, found {other:?}"
            )),
        }
    }

    fn string(self, field: u32) -> Result<String, ProtoError> {
        let bytes = self.bytes(field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => error(format!("field {field}: string is not valid UTF-8")),
        }
    }
}

/// Iterates over the `(field number, value)` pairs of one encoded message.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn read_varint(&mut self) -> Result<u64, ProtoError> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        error("truncated or over-long varint")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return error(format!(
                "value of {n} bytes runs past the end of the message"
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// The next field, or `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, ProtoError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.read_varint()?;
        let field = u32::try_from(key >> 3).or_else(|_| error("field number out of range"))?;
        if field == 0 {
            return error("field number 0");
        }
        let value = match key & 7 {
            0 => Value::Varint(self.read_varint()?),
            1 => Value::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().expect("8 bytes"),
            )),
            2 => {
                let len = usize::try_from(self.read_varint()?)
                    .or_else(|_| error("length out of range"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            wire => return error(format!("field {field}: unsupported wire type {wire}")),
        };
        Ok(Some((field, value)))
    }
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_wire(value: u64) -> Result<Self, ProtoError> {
        Ok(match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => return error(format!("unknown piece type {other}")),
        })
    }
}

/// `ModelProto.SentencePiece`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PieceProto {
    pub(crate) piece: String,
    pub(crate) score: f32,
    pub(crate) kind: PieceType,
}

impl PieceProto {
    fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut piece = PieceProto {
            piece: String::new(),
            score: 0.0,
            kind: PieceType::Normal,
        };
        let mut reader = Reader::new(buf);
        while let Some((field, value)) = reader.next_field()? {
            match field {
                1 => piece.piece = value.string(field)?,
                2 => piece.score = value.float(field)?,
                3 => piece.kind = PieceType::from_wire(value.varint(field)?)?,
                _ => {}
            }
        }
        Ok(piece)
    }
}

/// `TrainerSpec.ModelType`'s BPE value: the only algorithm implemented here.
pub(crate) const MODEL_TYPE_BPE: u64 = 2;

/// The `TrainerSpec` fields that change encoding or decoding.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TrainerSpec {
    pub(crate) model_type: u64,
    pub(crate) byte_fallback: bool,
    pub(crate) treat_whitespace_as_suffix: bool,
    pub(crate) unk_surface: String,
}

impl TrainerSpec {
    fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        // Defaults from sentencepiece_model.proto.
        let mut spec = TrainerSpec {
            model_type: 1,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_surface: " \u{2047} ".to_owned(),
        };
        let mut reader = Reader::new(buf);
        while let Some((field, value)) = reader.next_field()? {
            match field {
                3 => spec.model_type = value.varint(field)?,
                24 => spec.treat_whitespace_as_suffix = value.bool(field)?,
                35 => spec.byte_fallback = value.bool(field)?,
                44 => spec.unk_surface = value.string(field)?,
                _ => {}
            }
        }
        Ok(spec)
    }
}

/// The `NormalizerSpec` fields that change encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NormalizerSpec {
    pub(crate) name: String,
    /// Non-empty for rule-based normalisations (NFKC and friends), which are not implemented.
    pub(crate) has_charsmap: bool,
    pub(crate) add_dummy_prefix: bool,
    pub(crate) remove_extra_whitespaces: bool,
    pub(crate) escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    /// The defaults from sentencepiece_model.proto, used when the message is absent.
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            has_charsmap: false,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

impl NormalizerSpec {
    fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut spec = NormalizerSpec::default();
        let mut reader = Reader::new(buf);
        while let Some((field, value)) = reader.next_field()? {
            match field {
                1 => spec.name = value.string(field)?,
                2 => spec.has_charsmap = !value.bytes(field)?.is_empty(),
                3 => spec.add_dummy_prefix = value.bool(field)?,
                4 => spec.remove_extra_whitespaces = value.bool(field)?,
                5 => spec.escape_whitespaces = value.bool(field)?,
                _ => {}
            }
        }
        Ok(spec)
    }
}

/// `ModelProto`: the content of `tokenizer.model`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelProto {
    pub(crate) pieces: Vec<PieceProto>,
    pub(crate) trainer_spec: TrainerSpec,
    pub(crate) normalizer_spec: NormalizerSpec,
    /// Only its presence with a charsmap matters: decoding would then need a denormaliser.
    pub(crate) denormalizer_spec: Option<NormalizerSpec>,
}

impl ModelProto {
    pub(crate) fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        let mut pieces = Vec::new();
        let mut trainer_spec = None;
        let mut normalizer_spec = None;
        let mut denormalizer_spec = None;
        let mut reader = Reader::new(buf);
        while let Some((field, value)) = reader.next_field()? {
            let nested = |what: &str| {
                value
                    .bytes(field)
                    .map_err(|e| ProtoError(format!("{what}: {e}")))
            };
            match field {
                1 => pieces.push(
                    PieceProto::parse(nested("piece")?)
                        .map_err(|e| ProtoError(format!("piece {}: {e}", pieces.len())))?,
                ),
                2 => trainer_spec = Some(TrainerSpec::parse(nested("trainer_spec")?)?),
                3 => normalizer_spec = Some(NormalizerSpec::parse(nested("normalizer_spec")?)?),
                5 => denormalizer_spec = Some(NormalizerSpec::parse(nested("denormalizer_spec")?)?),
                _ => {}
            }
        }
        if pieces.is_empty() {
            return error("no pieces");
        }
        Ok(ModelProto {
            pieces,
            trainer_spec: match trainer_spec {
                Some(spec) => spec,
                None => TrainerSpec::parse(&[])?,
            },
            normalizer_spec: normalizer_spec.unwrap_or_default(),
            denormalizer_spec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field_varint(field: u32, v: u64, out: &mut Vec<u8>) {
        varint(u64::from(field) << 3, out);
        varint(v, out);
    }

    fn field_bytes(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
        varint((u64::from(field) << 3) | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    fn field_float(field: u32, v: f32, out: &mut Vec<u8>) {
        varint((u64::from(field) << 3) | 5, out);
        out.extend_from_slice(&v.to_le_bytes());
    }

    fn piece(text: &str, score: f32, kind: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        field_bytes(1, text.as_bytes(), &mut out);
        field_float(2, score, &mut out);
        if let Some(kind) = kind {
            field_varint(3, kind, &mut out);
        }
        out
    }

    #[test]
    fn reads_varints_of_every_length() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            field_varint(7, v, &mut buf);
            let mut reader = Reader::new(&buf);
            assert_eq!(reader.next_field().unwrap(), Some((7, Value::Varint(v))));
            assert_eq!(reader.next_field().unwrap(), None);
        }
    }

    #[test]
    fn reads_all_wire_types_and_skips_unknown_fields() {
        let mut buf = Vec::new();
        varint((9 << 3) | 1, &mut buf);
        buf.extend_from_slice(&42u64.to_le_bytes());
        field_float(10, 1.5, &mut buf);
        field_bytes(11, b"abc", &mut buf);
        let mut reader = Reader::new(&buf);
        assert_eq!(reader.next_field().unwrap(), Some((9, Value::Fixed64(42))));
        assert_eq!(
            reader.next_field().unwrap(),
            Some((10, Value::Fixed32(1.5f32.to_bits())))
        );
        assert_eq!(
            reader.next_field().unwrap(),
            Some((11, Value::Bytes(b"abc")))
        );
        assert_eq!(reader.next_field().unwrap(), None);
    }

    #[test]
    fn rejects_truncated_input() {
        let mut buf = Vec::new();
        field_bytes(1, b"abcdef", &mut buf);
        buf.truncate(buf.len() - 2);
        assert!(Reader::new(&buf).next_field().is_err());
        assert!(Reader::new(&[0x80]).next_field().is_err());
        assert!(
            Reader::new(&[(1 << 3) | 3]).next_field().is_err(),
            "groups are not supported"
        );
        assert!(
            Reader::new(&[0x08]).next_field().is_err(),
            "key without value"
        );
    }

    #[test]
    fn parses_a_model_with_defaults() {
        let mut normalizer = Vec::new();
        field_bytes(1, b"identity", &mut normalizer);
        field_varint(4, 0, &mut normalizer);
        let mut trainer = Vec::new();
        field_varint(3, MODEL_TYPE_BPE, &mut trainer);
        field_varint(35, 1, &mut trainer);
        field_varint(99, 5, &mut trainer); // unknown field
        let mut model = Vec::new();
        field_bytes(1, &piece("<unk>", 0.0, Some(2)), &mut model);
        field_bytes(1, &piece("\u{2581}a", -1.25, None), &mut model);
        field_bytes(2, &trainer, &mut model);
        field_bytes(3, &normalizer, &mut model);

        let proto = ModelProto::parse(&model).unwrap();
        assert_eq!(proto.pieces.len(), 2);
        assert_eq!(proto.pieces[0].kind, PieceType::Unknown);
        assert_eq!(
            proto.pieces[1],
            PieceProto {
                piece: "\u{2581}a".into(),
                score: -1.25,
                kind: PieceType::Normal
            }
        );
        assert_eq!(proto.trainer_spec.model_type, MODEL_TYPE_BPE);
        assert!(proto.trainer_spec.byte_fallback);
        assert_eq!(proto.trainer_spec.unk_surface, " \u{2047} ");
        assert_eq!(proto.normalizer_spec.name, "identity");
        assert!(proto.normalizer_spec.add_dummy_prefix, "default kept");
        assert!(
            !proto.normalizer_spec.remove_extra_whitespaces,
            "explicit false read"
        );
        assert!(proto.denormalizer_spec.is_none());
    }

    #[test]
    fn rejects_models_that_are_not_sentencepiece() {
        assert!(ModelProto::parse(b"").is_err(), "no pieces");
        assert!(ModelProto::parse(b"{\"model\": {}}").is_err());
        let mut bad_type = Vec::new();
        field_bytes(1, &piece("a", 0.0, Some(9)), &mut bad_type);
        assert!(ModelProto::parse(&bad_type).is_err());
    }
}
