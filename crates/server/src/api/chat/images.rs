//! A chat's images: fetched, then decoded and resized on the blocking pool a bounded number
//! at a time, with image memory reserved for the worst case before the first byte arrives.

use super::super::error::ApiError;
use crate::service::request::PreparedImage;
use crate::service::Service;
use crate::state::{AppState, ImageReservation};
use internvl_model::preprocess::preprocess;
use std::sync::Arc;
use std::time::Instant;

/// Bytes of one image's pixels as the model takes them: 3 channels of f32.
pub(super) fn pixel_bytes(ready: &Service) -> usize {
    let side = ready.loaded.preprocess.image_size as usize;
    side.saturating_mul(side)
        .saturating_mul(3 * std::mem::size_of::<f32>())
}

/// The most bytes the file behind `url` may have: a data URL's decoded size is known from its
/// length (4 base64 characters per 3 bytes), any other URL may bring up to `max_bytes`.
fn file_bound(url: &str, max_bytes: usize) -> usize {
    let url = url.trim();
    if url
        .get(..5)
        .is_some_and(|s| s.eq_ignore_ascii_case("data:"))
    {
        (url.len() / 4 * 3 + 3).min(max_bytes)
    } else {
        max_bytes
    }
}

/// Fetches every image and preprocesses it on the blocking pool, a bounded number at a time,
/// with the image memory of the worst case reserved before the first byte arrives; returned
/// with the reservation cut to what the files and pixels take.
pub(super) async fn load_images(
    state: &Arc<AppState>,
    ready: &Service,
    urls: &[String],
) -> Result<(Vec<PreparedImage>, ImageReservation), ApiError> {
    let pixels = pixel_bytes(ready);
    let max_file = ready.loaded.preprocess.limits.max_bytes;
    let worst = urls
        .iter()
        .map(|u| file_bound(u, max_file).saturating_add(pixels))
        .fold(0, usize::saturating_add);
    let mut reservation = state.reserve_image_memory(worst)?;
    let fetched = futures_util::future::try_join_all(urls.iter().map(|u| state.fetcher.fetch(u)))
        .await
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let file_bytes = fetched.iter().map(Vec::len).fold(0, usize::saturating_add);
    let max_request = state.limits.max_request_image_bytes;
    if file_bytes > max_request {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "The images of this request take {file_bytes} bytes; at most {max_request} \
                 are allowed in one request"
            ),
        ));
    }
    reservation.shrink_to(file_bytes.saturating_add(pixels.saturating_mul(urls.len())));
    let jobs = fetched.into_iter().enumerate().map(|(i, bytes)| {
        let config = ready.loaded.preprocess.clone();
        let slots = state.preprocess_slots.clone();
        let state = state.clone();
        async move {
            let slot = slots
                .acquire_owned()
                .await
                .map_err(|_| ApiError::unavailable("The server is shutting down"))?;
            let started = Instant::now();
            // The slot goes with the decode: a client that leaves cannot free it while it runs.
            // Hashed there too, after the decode is timed: SHA-256 of a large file is
            // milliseconds of CPU.
            let (result, decoded) = tokio::task::spawn_blocking(move || {
                let _slot = slot;
                let result = preprocess(&bytes, &config);
                let decoded = started.elapsed();
                (
                    result.map(|pixels| PreparedImage::new(&bytes, pixels)),
                    decoded,
                )
            })
            .await
            .map_err(|e| ApiError::internal(format!("image preprocessing crashed: {e}")))?;
            state.metrics.observe_preprocess(decoded);
            result.map_err(|e| ApiError::invalid("messages", format!("image {i}: {e}")))
        }
    });
    let images = futures_util::future::try_join_all(jobs).await?;
    Ok((images, reservation))
}
