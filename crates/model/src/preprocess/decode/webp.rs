//! WebP through `image` (image-webp), whose lossy and lossless decoding equal libwebp's, the
//! library Pillow uses.

use std::io::Cursor;

use image::codecs::webp::WebPDecoder;
use image::{RgbImage, Rgba};

use super::{corrupt, decode_with_image, ImageFormat, SizeCheck};
use crate::preprocess::PreprocessError;

pub(super) fn decode(bytes: &[u8], check: SizeCheck<'_>) -> Result<RgbImage, PreprocessError> {
    let format = ImageFormat::WebP;
    let mut decoder = WebPDecoder::new(Cursor::new(bytes)).map_err(|e| corrupt(format, e))?;
    if decoder.has_animation() {
        // Pillow reads animations through libwebp's WebPAnimDecoder, which starts from a
        // transparent black canvas whatever background colour the file asks for.
        decoder
            .set_background_color(Rgba([0, 0, 0, 0]))
            .map_err(|e| corrupt(format, e))?;
    }
    decode_with_image(format, decoder, check)
}
