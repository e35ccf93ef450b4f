//! Why an image URL could not be resolved, in messages written for API clients.

use std::net::IpAddr;
use std::time::Duration;

/// Why an image URL could not be resolved. The messages are written for API clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageFetchError {
    #[error("invalid image URL: {0}")]
    InvalidUrl(String),
    #[error("image URL scheme `{0}` is not supported")]
    UnsupportedScheme(String),
    #[error("invalid image data URL: {0}")]
    InvalidDataUrl(&'static str),
    #[error("image URL host resolves to {ip} ({class} address), which is not allowed")]
    BlockedAddress { ip: IpAddr, class: &'static str },
    #[error("image exceeds {0} bytes")]
    TooLarge(usize),
    #[error("fetching the image timed out after {}", format_duration(*.0))]
    Timeout(Duration),
    #[error("image URL returned HTTP {0}")]
    HttpStatus(u16),
    #[error("too many redirects (more than {0})")]
    TooManyRedirects(usize),
    #[error("image URL returned a redirect without a valid Location header")]
    BadRedirect,
    #[error("could not fetch the image: {0}")]
    Request(String),
    #[error("file URLs are not enabled on this server")]
    LocalFilesDisabled,
    #[error("image file is outside the allowed directory")]
    OutsideLocalDir,
    #[error("image file not found")]
    LocalFileNotFound,
    #[error("could not read the image file: {0}")]
    LocalFile(String),
    /// From [`ImageFetcher::new`] only: an operator error, not a client one.
    #[error("invalid image fetch configuration: {0}")]
    Config(String),
}

/// "10 s" for whole seconds (the usual configuration), "250 ms" otherwise.
fn format_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
