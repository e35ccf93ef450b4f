//! `data:` image URLs: the media type and encoding checked, base64 decoded forgivingly (as
//! browsers do) with the byte cap enforced from the encoded length, before allocating.

use super::error::ImageFetchError;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;

/// Decodes what follows `data:`: `[<media type>][;<parameter>]*;base64,<data>`.
pub(super) fn decode_data_url(rest: &str, max_bytes: usize) -> Result<Vec<u8>, ImageFetchError> {
    let (header, data) = rest.split_once(',').ok_or(ImageFetchError::InvalidDataUrl(
        "missing `,` before the data",
    ))?;
    let mut params = header.split(';');
    let media_type = params.next().unwrap_or_default().trim();
    if !media_type.is_empty()
        && !media_type
            .get(..6)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("image/"))
    {
        return Err(ImageFetchError::InvalidDataUrl(
            "the media type is not an image type",
        ));
    }
    if !params
        .next_back()
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("base64"))
    {
        return Err(ImageFetchError::InvalidDataUrl(
            "only base64-encoded data URLs are supported",
        ));
    }
    decode_base64_capped(data, max_bytes)
}

/// Forgiving base64 (ASCII whitespace ignored, `=` padding optional) with the size cap checked
/// before allocating: a first pass counts the symbols, which fixes the decoded length, then the
/// symbols are decoded in fixed-size chunks straight into a buffer of exactly that length, so
/// nothing else the size of the data is allocated.
fn decode_base64_capped(data: &str, max_bytes: usize) -> Result<Vec<u8>, ImageFetchError> {
    const INVALID: ImageFetchError = ImageFetchError::InvalidDataUrl("invalid base64 data");
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c');
    let (mut symbols, mut padding) = (0usize, 0usize);
    for b in data.as_bytes().iter().filter(|b| !is_space(b)) {
        if *b == b'=' {
            padding += 1;
        } else if padding == 0 {
            symbols += 1;
        } else {
            return Err(INVALID); // `=` anywhere but at the end
        }
    }
    // Padding, when present, completes the last 4-symbol group; a lone symbol in the last group
    // encodes no whole byte.
    if padding > 2 || (padding > 0 && (symbols + padding) % 4 != 0) || symbols % 4 == 1 {
        return Err(INVALID);
    }
    let decoded_len = symbols / 4 * 3 + [0, 0, 1, 2][symbols % 4];
    if decoded_len > max_bytes {
        return Err(ImageFetchError::TooLarge(max_bytes));
    }
    let mut out = vec![0; decoded_len];
    let mut written = 0;
    let mut chunk = [0u8; 4096]; // a multiple of 4: every chunk but the last is whole groups
    let mut filled = 0;
    let mut symbols = data
        .as_bytes()
        .iter()
        .filter(|b| !is_space(b) && **b != b'=');
    loop {
        let next = symbols.next();
        if let Some(&b) = next {
            chunk[filled] = b;
            filled += 1;
        }
        if filled == chunk.len() || (next.is_none() && filled > 0) {
            written += STANDARD_NO_PAD
                .decode_slice(&chunk[..filled], &mut out[written..])
                .map_err(|_| INVALID)?;
            filled = 0;
        }
        if next.is_none() {
            break;
        }
    }
    debug_assert_eq!(written, decoded_len);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{ImageFetchConfig, ImageFetchError};
    use base64::Engine as _;

    #[tokio::test]
    async fn images_data_url_valid() {
        let f = fetcher(ImageFetchConfig::default());
        let url = format!("data:image/png;base64,{PNG_BASE64}");
        assert_eq!(f.fetch(&url).await.unwrap(), PNG);
        // No media type, parameters, upper case, surrounding blanks.
        let url = format!("  DATA:;charset=x;BASE64,{PNG_BASE64}\n");
        assert_eq!(f.fetch(&url).await.unwrap(), PNG);
        // Line-wrapped base64, as many encoders emit it.
        let wrapped: String = PNG_BASE64
            .as_bytes()
            .chunks(20)
            .map(|line| format!("{}\r\n", std::str::from_utf8(line).unwrap()))
            .collect();
        let url = format!("data:image/png;base64,{wrapped}");
        assert_eq!(f.fetch(&url).await.unwrap(), PNG);
        // Padding optional; tails of one and two bytes; empty data.
        for (data, bytes) in [
            ("aGk=", &b"hi"[..]),
            ("aGk", b"hi"),
            ("aA==", b"h"),
            ("aA", b"h"),
            ("aGV5", b"hey"),
            ("", b""),
        ] {
            let url = format!("data:image/webp;base64,{data}");
            assert_eq!(f.fetch(&url).await.unwrap(), bytes, "{data}");
        }
        // Longer than one decoding chunk, with whitespace across chunk boundaries.
        let big: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(&big);
        let spaced: String = encoded
            .as_bytes()
            .chunks(77)
            .map(|line| format!("{} ", std::str::from_utf8(line).unwrap()))
            .collect();
        let url = format!("data:image/jpeg;base64,{spaced}");
        assert_eq!(f.fetch(&url).await.unwrap(), big);
    }

    #[tokio::test]
    async fn images_data_url_bad() {
        let f = fetcher(ImageFetchConfig::default());
        let invalid = ImageFetchError::InvalidDataUrl("invalid base64 data").to_string();
        for data in [
            "@@@@",
            "aGk=aGk=",
            "aG=k",
            "a",
            "aGk==",
            "aGVsbG8===",
            "aGk-",
            "aR==",
        ] {
            let err = f
                .fetch(&format!("data:image/png;base64,{data}"))
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), invalid, "{data}");
        }
        let err = f.fetch("data:image/png,%89PNG").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid image data URL: only base64-encoded data URLs are supported"
        );
        let err = f.fetch("data:text/plain;base64,aGk=").await.unwrap_err();
        assert!(matches!(err, ImageFetchError::InvalidDataUrl(_)), "{err}");
        let err = f.fetch("data:image/png;base64").await.unwrap_err();
        assert!(matches!(err, ImageFetchError::InvalidDataUrl(_)), "{err}");
    }

    #[tokio::test]
    async fn images_data_url_over_cap() {
        let f = fetcher(ImageFetchConfig {
            max_bytes: 3,
            ..ImageFetchConfig::default()
        });
        assert_eq!(f.fetch("data:;base64,aGV5").await.unwrap(), b"hey");
        for data in ["aGV5aA==", "aGV5aA", "aGV5 aGV5"] {
            let err = f.fetch(&format!("data:;base64,{data}")).await.unwrap_err();
            assert_eq!(err.to_string(), "image exceeds 3 bytes");
        }
        // Refused from the length alone, before the (invalid) symbols are looked at.
        let err = f.fetch("data:;base64,!!!!!!!!").await.unwrap_err();
        assert!(matches!(err, ImageFetchError::TooLarge(3)), "{err}");
    }
}
