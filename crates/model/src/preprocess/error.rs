use super::ImageFormat;

/// Why an image could not be preprocessed. Every variant is the client's doing (bad or hostile
/// input), so a server can map them all to a 4xx answer.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("image data is empty")]
    Empty,
    #[error("image data is {len} bytes, more than the limit of {max}")]
    TooManyBytes { len: usize, max: usize },
    #[error("unsupported image format ({0}); send PNG, JPEG, GIF, BMP or WebP")]
    UnsupportedFormat(&'static str),
    #[error("{format} image has no pixels ({width}x{height})")]
    ZeroSize {
        format: ImageFormat,
        width: u64,
        height: u64,
    },
    /// Raised from the header alone, before anything the size of the image is allocated.
    #[error("{format} image is {width}x{height} pixels, more than the limit of {max}")]
    TooManyPixels {
        format: ImageFormat,
        width: u64,
        height: u64,
        max: u64,
    },
    /// Raised from the header alone: resizing costs time and memory in proportion to the
    /// image with each side raised to at least the output side (`padded`), so an image that is
    /// small in pixels but extremely narrow or flat is as costly as a huge one.
    #[error(
        "{format} image is {width}x{height} pixels, too narrow or flat to resize to \
         {size}x{size}: that costs as much as {padded} pixels, more than the limit of {max}"
    )]
    TooCostlyToResize {
        format: ImageFormat,
        width: u64,
        height: u64,
        size: u32,
        padded: u64,
        max: u64,
    },
    #[error("{format} data is corrupt or truncated: {reason}")]
    Corrupt { format: ImageFormat, reason: String },
}
