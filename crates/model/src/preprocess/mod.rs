//! Image preprocessing, pixel-for-pixel what upstream InternVL-Chat V1.1 fed its vision encoder.
//!
//! Upstream ran Pillow 12 and torchvision: `Image.open(f).convert("RGB")`, a 448×448 BICUBIC
//! resize that ignores the aspect ratio, ToTensor (/255) and Normalize with the ImageNet
//! mean/std. The model was trained on exactly those pixels, so each step here reproduces
//! Pillow's integer arithmetic rather than approximating it: general-purpose resizers differ by
//! up to 30 levels at hard edges, and zune-jpeg by up to 5 from libjpeg-turbo. The fixtures
//! made by `scripts/reference/make_images.py` hold every step to zero differences.
//!
//! Tensor libraries stay out of this module: the output is a plain CHW `Vec<f32>`.

mod budget;
mod decode;
mod error;
mod normalize;
mod resize;

pub use budget::peak_bytes_bound;
pub use decode::{decode_rgb, DecodeLimits, ImageFormat};
pub use error::PreprocessError;
pub use image::RgbImage;
pub use normalize::normalize_chw;
pub use resize::resize_bicubic;

/// ImageNet statistics, which V1.1's `preprocessor_config.json` uses (not CLIP's).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How to turn encoded image bytes into the vision encoder's input.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Side of the square the image is stretched to; V1.1 uses `force_image_size` = 448.
    pub image_size: u32,
    /// Per-channel mean (R, G, B) subtracted after scaling to 0..=1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B) divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Guards applied before any pixel is decoded.
    pub limits: DecodeLimits,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            image_size: 448,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            limits: DecodeLimits::default(),
        }
    }
}

/// Normalised pixels, channel-major: `data[c * height * width + y * width + x]`, with
/// channels R, G, B.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub data: Vec<f32>,
    pub height: u32,
    pub width: u32,
}

/// Decodes `bytes` (PNG, JPEG, GIF, BMP or WebP) and returns what upstream's transform made of
/// the same file.
///
/// The header is checked against `config.limits` for the decode and for the resize before
/// anything the size of the image is allocated; [`peak_bytes_bound`] states the most memory
/// this takes.
pub fn preprocess(bytes: &[u8], config: &PreprocessConfig) -> Result<PixelValues, PreprocessError> {
    let decoded = decode::decode_for_resize(bytes, &config.limits, config.image_size)?;
    let resized = resize_bicubic(&decoded, config.image_size, config.image_size);
    // The source goes before the normalised copy is made.
    drop(decoded);
    Ok(PixelValues {
        data: normalize_chw(&resized, config.mean, config.std),
        height: resized.height(),
        width: resized.width(),
    })
}
