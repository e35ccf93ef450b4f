//! Compressed request bodies: `Content-Encoding: gzip` (or `x-gzip`) and `deflate` (zlib, as
//! HTTP means it), inflated before any extractor sees the body.
//!
//! The compressed bytes are read under the body limit, then inflated on the blocking pool, a
//! bounded number at a time, with the output refused as soon as it passes the same limit: a
//! bomb of 64 KiB that would inflate to gigabytes costs at most the limit in memory and a
//! fifth of a second of one blocking thread, never an async worker.

use super::error::{echoed, ApiError};
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flate2::read::{MultiGzDecoder, ZlibDecoder};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use std::io::Read;
use std::sync::Arc;

/// What `Accept-Encoding` names in a 415: the encodings a body may come in, besides none.
const ACCEPTED: &str = "gzip, deflate";

/// Bytes inflated per read: the output grows by at most this past what is kept.
const CHUNK: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Encoding {
    Gzip,
    Deflate,
}

impl Encoding {
    /// The encoding a header names: `Ok(None)` for none (`identity`), `Err` for one we do not
    /// take, a list of several included. Case and surrounding spaces do not matter.
    fn parse(value: &HeaderValue) -> Result<Option<Encoding>, String> {
        let given = String::from_utf8_lossy(value.as_bytes())
            .trim()
            .to_ascii_lowercase();
        match given.as_str() {
            "gzip" | "x-gzip" => Ok(Some(Encoding::Gzip)),
            "deflate" => Ok(Some(Encoding::Deflate)),
            "identity" | "" => Ok(None),
            _ => Err(given),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
        }
    }
}

/// Why a compressed body was refused.
#[derive(Debug, PartialEq)]
enum Inflate {
    TooLarge,
    Corrupt(String),
}

/// Replaces a compressed body by its inflated bytes (413 past the body limit, 400 for a stream
/// that is not what its header says), answers an encoding we do not take with a 415 naming
/// those we do, and passes any other request on untouched.
pub async fn decompress(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(value) = request.headers().get(header::CONTENT_ENCODING) else {
        return next.run(request).await;
    };
    let encoding = match Encoding::parse(value) {
        Ok(Some(encoding)) => encoding,
        Ok(None) => return next.run(without_encoding(request)).await,
        Err(given) => {
            let mut response = ApiError::unsupported_encoding(&given).into_response();
            response
                .headers_mut()
                .insert(header::ACCEPT_ENCODING, HeaderValue::from_static(ACCEPTED));
            return response;
        }
    };
    let limit = state.limits.max_body_bytes;
    let (parts, body) = request.into_parts();
    let compressed = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => return ApiError::too_large(limit).into_response(),
        // The connection failed or its deadline passed: `body_limits`, outside, answers that.
        Err(e) => {
            return ApiError::bad_request(format!("The request body could not be read: {e}"))
                .into_response()
        }
    };
    let Ok(slot) = state.inflate_slots.clone().acquire_owned().await else {
        return ApiError::unavailable("The server is shutting down").into_response();
    };
    let inflated = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        inflate(encoding, &compressed, limit)
    })
    .await;
    let bytes = match inflated {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(Inflate::TooLarge)) => {
            return ApiError {
                message: format!(
                    "The request body exceeds {limit} bytes once decompressed (it was sent as {})",
                    encoding.name()
                ),
                ..ApiError::too_large(limit)
            }
            .into_response()
        }
        Ok(Err(Inflate::Corrupt(detail))) => {
            return ApiError::bad_request(format!(
                "The request body is not valid {}-compressed data, as its `Content-Encoding` \
                 says: {}",
                encoding.name(),
                echoed(&detail, 200)
            ))
            .into_response()
        }
        Err(e) => {
            return ApiError::internal(format!("inflating a body crashed: {e}")).into_response()
        }
    };
    let length = HeaderValue::from(bytes.len());
    let mut request = without_encoding(Request::from_parts(parts, Body::from(bytes)));
    request.headers_mut().insert(header::CONTENT_LENGTH, length);
    next.run(request).await
}

/// The request as its handler should see a plain body: no `Content-Encoding`, and no
/// `Content-Length` of the compressed bytes.
fn without_encoding(mut request: Request) -> Request {
    let headers = request.headers_mut();
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    request
}

/// Inflates `compressed`, refusing output past `limit` bytes before it is kept; the buffer
/// grows by doubling but never past the limit.
fn inflate(encoding: Encoding, compressed: &[u8], limit: usize) -> Result<Bytes, Inflate> {
    let mut reader: Box<dyn Read> = match encoding {
        // Several gzip members one after another are one body (RFC 1952 §2.2).
        Encoding::Gzip => Box::new(MultiGzDecoder::new(compressed)),
        Encoding::Deflate => Box::new(ZlibDecoder::new(compressed)),
    };
    // A first guess of four times the compressed size, at least a chunk, at most the limit
    // (which may be smaller than a chunk).
    let mut out = Vec::with_capacity(compressed.len().saturating_mul(4).max(CHUNK).min(limit));
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = reader
            .read(&mut chunk)
            .map_err(|e| Inflate::Corrupt(e.to_string()))?;
        if n == 0 {
            return Ok(Bytes::from(out));
        }
        let len = out.len() + n;
        if len > limit {
            return Err(Inflate::TooLarge);
        }
        if len > out.capacity() {
            out.reserve_exact(out.capacity().saturating_mul(2).clamp(len, limit) - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn encodings_are_read_as_clients_spell_them() {
        let parse = |s: &str| Encoding::parse(&HeaderValue::from_str(s).unwrap());
        assert_eq!(parse("gzip"), Ok(Some(Encoding::Gzip)));
        assert_eq!(parse(" X-GZIP "), Ok(Some(Encoding::Gzip)));
        assert_eq!(parse("Deflate"), Ok(Some(Encoding::Deflate)));
        assert_eq!(parse("identity"), Ok(None));
        for other in ["br", "zstd", "gzip, deflate", "gzip;q=1", "compress"] {
            assert!(parse(other).is_err(), "{other}");
        }
    }

    #[test]
    fn output_is_bounded_and_capacity_never_passes_the_limit() {
        let limit = 1 << 20;
        let body = vec![b' '; limit];
        let out = inflate(Encoding::Gzip, &gzip(&body), limit).unwrap();
        assert_eq!(out.len(), limit);
        assert_eq!(
            inflate(Encoding::Gzip, &gzip(&vec![b' '; limit + 1]), limit),
            Err(Inflate::TooLarge)
        );
        // Two members are one body.
        let mut two = gzip(b"{\"a\": ");
        two.extend(gzip(b"1}"));
        assert_eq!(
            &inflate(Encoding::Gzip, &two, limit).unwrap()[..],
            b"{\"a\": 1}"
        );
        let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
        e.write_all(b"zlib").unwrap();
        let zlib = e.finish().unwrap();
        assert_eq!(
            &inflate(Encoding::Deflate, &zlib, limit).unwrap()[..],
            b"zlib"
        );
        assert!(matches!(
            inflate(Encoding::Deflate, &gzip(b"zlib"), limit),
            Err(Inflate::Corrupt(_))
        ));
        // A limit below one chunk (--max-body-bytes 1000) bounds the first guess too.
        assert_eq!(
            &inflate(Encoding::Gzip, &gzip(b"{}"), 1000).unwrap()[..],
            b"{}"
        );
        assert_eq!(
            inflate(Encoding::Gzip, &gzip(&[b' '; 1001]), 1000),
            Err(Inflate::TooLarge)
        );
    }
}
