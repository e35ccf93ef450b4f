//! `data:` image URLs through `ImageFetcher::fetch`, as a chat request's `image_url` reaches
//! it. Inputs that do not start with `data:` get it prepended, so every input is decoded and
//! none makes a network request.
//!
//! Asserts: nothing panics; a decoded image is never above the byte cap and is exactly what the
//! URL's base64 symbols encode (re-encoding gives them back: no symbol dropped or invented);
//! an oversize URL is refused as too large only when its symbols do encode more than the cap;
//! and, through a counting allocator, the call never holds more than the cap plus a small
//! fixed allowance, whatever the URL's length (the size is checked before the buffer exists).

#![no_main]

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use internvl_fuzz::counting_alloc::{is_counting, peak_during, CountingAlloc};
use internvl_server::images::{ImageFetchConfig, ImageFetchError, ImageFetcher};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The byte cap: small, so that inputs of a few kilobytes cross it.
const MAX_BYTES: usize = 1024;
/// What one decode may hold besides the decoded image: its fixed-size chunk buffer and the
/// runtime's bookkeeping for one future.
const ALLOWANCE: usize = 16 << 10;

fn fetcher() -> &'static (tokio::runtime::Runtime, ImageFetcher) {
    static FETCHER: OnceLock<(tokio::runtime::Runtime, ImageFetcher)> = OnceLock::new();
    FETCHER.get_or_init(|| {
        assert!(is_counting(), "the counting allocator is not installed");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        let config = ImageFetchConfig {
            max_bytes: MAX_BYTES,
            ..ImageFetchConfig::default()
        };
        (
            runtime,
            ImageFetcher::new(config).expect("the fetcher builds"),
        )
    })
}

/// The base64 symbols of a data URL as the decoder reads them: after the first `,`, without
/// ASCII whitespace and `=` padding.
fn symbols(url: &str) -> String {
    let data = url.split_once(',').map_or("", |(_, data)| data);
    data.chars()
        .filter(|c| !matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c' | '='))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (runtime, fetcher) = fetcher();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let is_data = text
        .trim()
        .get(..5)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"));
    let url = if is_data {
        text.to_owned()
    } else {
        format!("data:{text}")
    };
    let (result, peak) = peak_during(|| runtime.block_on(fetcher.fetch(&url)));
    let symbols = symbols(url.trim());
    match &result {
        Ok(bytes) => {
            assert!(bytes.len() <= MAX_BYTES, "{} bytes decoded", bytes.len());
            assert_eq!(STANDARD_NO_PAD.encode(bytes), symbols, "decoded {bytes:?}");
        }
        Err(ImageFetchError::TooLarge(max)) => {
            assert_eq!(*max, MAX_BYTES);
            assert!(
                symbols.len() * 3 / 4 > MAX_BYTES,
                "{} symbols",
                symbols.len()
            );
        }
        Err(_) => {}
    }
    let decoded = result.as_ref().map_or(0, Vec::len);
    assert!(
        peak <= decoded + ALLOWANCE,
        "decoding {} bytes of URL held {peak} bytes at once ({decoded} decoded)",
        url.len()
    );
});
