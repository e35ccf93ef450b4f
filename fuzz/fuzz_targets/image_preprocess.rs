//! Image decoding and resizing (`internvl_model::preprocess::preprocess`) on arbitrary bytes,
//! with a counting allocator measuring the most memory one image holds at once.
//!
//! Scaled down for speed, on the same code paths: the pixel limit is 4 megapixels rather than
//! the server's 50, so that the largest images an input can declare decode in milliseconds; and
//! the output side is V1.1's 448 for one input in eight (by length) and 32 otherwise, since
//! resizing and normalising into 448 × 448 cost more than most inputs take to decode.
//!
//! Asserts: nothing panics; an accepted image comes out as 3 × size × size finite values; and
//! the peak live bytes of the call stay within `peak_bytes_bound`, the bound the model crate
//! states for its limits. The allocator sees Rust's allocations only: libjpeg-turbo's C heap
//! is capped inside libjpeg-turbo (TurboJPEG's memory limit), not measured here.

#![no_main]

use internvl_fuzz::counting_alloc::{is_counting, peak_during, CountingAlloc};
use internvl_model::preprocess::{peak_bytes_bound, preprocess, DecodeLimits, PreprocessConfig};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn config(input_len: usize) -> PreprocessConfig {
    PreprocessConfig {
        image_size: if input_len.is_multiple_of(8) { 448 } else { 32 },
        limits: DecodeLimits {
            max_pixels: 4_000_000,
            ..DecodeLimits::default()
        },
        ..PreprocessConfig::default()
    }
}

fuzz_target!(|data: &[u8]| {
    assert!(is_counting(), "the counting allocator is not installed");
    let config = config(data.len());
    let (result, peak) = peak_during(|| preprocess(data, &config));
    if let Ok(pixels) = &result {
        let size = config.image_size;
        assert_eq!((pixels.width, pixels.height), (size, size));
        assert_eq!(pixels.data.len(), 3 * size as usize * size as usize);
        assert!(pixels.data.iter().all(|v| v.is_finite()));
    }
    let bound = peak_bytes_bound(&config.limits);
    assert!(
        peak as u64 <= bound,
        "{peak} bytes at the peak, over the bound of {bound}"
    );
});
