//! Resolving the `url` of an OpenAI chat `image_url` content part into the image file's bytes.
//!
//! Decoding the bytes into pixels happens elsewhere; this module only answers "which bytes did
//! the client mean", safely. Three kinds of URL are accepted:
//!
//! * `data:` URLs (`data:image/png;base64,...`), decoded here. The data must be base64 (standard
//!   alphabet) and the media type, when given, an `image/*` type. As in browsers (WHATWG
//!   "forgiving base64"), ASCII whitespace anywhere in the data is ignored (clients wrap long
//!   base64 at 76 columns) and the `=` padding is optional; anything else malformed is refused,
//!   including percent-escapes (clients send plain base64) and non-base64 data URLs.
//!   The decoded size is computed from the encoded length and checked against the byte cap
//!   before anything is allocated.
//! * `http://` and `https://` URLs, fetched with a total timeout, a byte cap, a redirect limit
//!   and an SSRF guard: the server must not become a proxy into its own network (loopback,
//!   private ranges, the cloud metadata address 169.254.169.254, ...). The guard checks the
//!   addresses actually connected to: IP literals in every URL (the first and each redirect
//!   target) are checked directly, and host names go through a resolver that drops disallowed
//!   addresses, so hyper connects only to addresses that passed the check. There is no second
//!   lookup between check and connect, hence no DNS-rebinding window. Proxies are disabled,
//!   since a proxy would resolve and connect on our behalf, past the guard.
//! * `file://` URLs, only under an operator-configured directory.
//!
//! Every error message is meant to be shown to API clients as is (an OpenAI 400 error on
//! `messages`): none contains a response body, and file errors reveal nothing about paths
//! outside the configured directory.
//!
//! Why reqwest rather than hyper directly: reqwest's `dns_resolver` hook is exactly the
//! "filter the resolved addresses, then connect to those" point we need, and it brings TLS,
//! connection pooling and happy-eyeballs connecting that we would otherwise re-assemble from
//! hyper-util, hyper-rustls and root-certificate crates. Its own redirect following is turned
//! off: redirects are followed here, so that each target goes through the same checks and
//! the limit and errors are ours.
//!
//! Each kind of URL has its file: [`data_url`], [`http`] (whose SSRF guard asks
//! [`address_policy`]) and [`local_file`], and the errors theirs ([`error`]); this one holds
//! the entry point ([`ImageFetcher::fetch`]) and its configuration.

mod address_policy;
mod data_url;
mod error;
mod http;
mod local_file;
#[cfg(test)]
mod test_support;

use crate::settings::defaults;
use address_policy::{blocked_address_class, Classifier};
use data_url::decode_data_url;
pub use error::ImageFetchError;
use http::HttpFetcher;
use local_file::{read_local_file, LocalDir};
use reqwest::Url;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Limits and permissions for [`ImageFetcher`].
#[derive(Debug, Clone)]
pub struct ImageFetchConfig {
    /// Wall-clock limit for one HTTP(S) fetch: connecting, every redirect and the whole body.
    pub timeout: Duration,
    /// Largest accepted image, in bytes, for every kind of URL.
    pub max_bytes: usize,
    /// How many redirects an HTTP(S) fetch may follow.
    pub max_redirects: usize,
    /// Lets HTTP(S) URLs reach loopback, private, link-local and other non-public addresses.
    /// Only for deployments where every client is trusted with the server's network position.
    pub allow_private_networks: bool,
    /// The directory `file://` URLs may read from (symlinks resolved); `None` refuses them.
    pub allowed_local_dir: Option<PathBuf>,
}

impl Default for ImageFetchConfig {
    /// `serve`'s defaults (10 s, 20 MiB), 5 redirects, public addresses only, no local files.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(defaults::IMAGE_FETCH_TIMEOUT),
            max_bytes: defaults::MAX_IMAGE_BYTES.0,
            max_redirects: 5,
            allow_private_networks: false,
            allowed_local_dir: None,
        }
    }
}

/// Resolves image URLs to bytes. Cloning shares the HTTP connection pool.
#[derive(Clone)]
pub struct ImageFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    http: HttpFetcher,
    timeout: Duration,
    max_bytes: usize,
    local_dir: Option<LocalDir>,
}

impl ImageFetcher {
    /// Builds the HTTP client. Fails when `allowed_local_dir` is not an existing directory, so
    /// that a misconfiguration shows at startup rather than as client errors.
    pub fn new(config: ImageFetchConfig) -> Result<Self, ImageFetchError> {
        let classify: Classifier = if config.allow_private_networks {
            |_| None
        } else {
            blocked_address_class
        };
        Self::with_classifier(config, classify)
    }

    /// [`ImageFetcher::new`] with the address policy passed in, so that tests, which can only
    /// reach loopback servers, can allow one loopback address and check that others are refused.
    fn with_classifier(
        config: ImageFetchConfig,
        classify: Classifier,
    ) -> Result<Self, ImageFetchError> {
        let local_dir = config.allowed_local_dir.map(LocalDir::new).transpose()?;
        let http = HttpFetcher::new(classify, config.max_bytes, config.max_redirects)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                timeout: config.timeout,
                max_bytes: config.max_bytes,
                local_dir,
            }),
        })
    }

    /// The bytes of the image that `url` names: a `data:`, `http(s):` or (when configured)
    /// `file:` URL. Every error is fit to return to the API client.
    ///
    /// Takes the URL by value when the caller can give it up: a data URL can be megabytes,
    /// and it is moved, not copied, to the blocking pool that decodes it.
    pub async fn fetch(&self, url: impl Into<String>) -> Result<Vec<u8>, ImageFetchError> {
        let url = url.into();
        let start = url.len() - url.trim_start().len();
        let end = url.trim_end().len().max(start);
        // Data URLs are decoded straight from the string: parsing one as a `Url` would copy
        // (and percent-encode) megabytes of base64 for nothing. Decoding (up to `max_bytes`,
        // two passes over the text) is CPU work, kept off the async workers.
        if url[start..end]
            .get(..5)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("data:"))
        {
            let max_bytes = self.inner.max_bytes;
            return tokio::task::spawn_blocking(move || {
                decode_data_url(&url[start + 5..end], max_bytes)
            })
            .await
            .map_err(|_| ImageFetchError::InvalidDataUrl("decoding was interrupted"))?;
        }
        let parsed =
            Url::parse(&url[start..end]).map_err(|e| ImageFetchError::InvalidUrl(e.to_string()))?;
        let timeout = self.inner.timeout;
        let timed_out = |_| ImageFetchError::Timeout(timeout);
        match parsed.scheme() {
            "http" | "https" => tokio::time::timeout(timeout, self.inner.http.fetch(parsed))
                .await
                .map_err(timed_out)?,
            "file" => {
                let inner = Arc::clone(&self.inner);
                // Blocking file IO (up to `max_bytes`) stays off the async workers, and is
                // timed like a fetch: a file on a stalled network mount must not hold the
                // request forever (the read itself cannot be cancelled and ends on its own).
                let read = tokio::task::spawn_blocking(move || {
                    let dir = inner
                        .local_dir
                        .as_ref()
                        .ok_or(ImageFetchError::LocalFilesDisabled)?;
                    read_local_file(dir, &parsed, inner.max_bytes)
                });
                tokio::time::timeout(timeout, read)
                    .await
                    .map_err(timed_out)?
                    .map_err(|e| ImageFetchError::LocalFile(e.to_string()))?
            }
            other => Err(ImageFetchError::UnsupportedScheme(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn images_error_messages() {
        let cases = [
            (
                ImageFetchError::UnsupportedScheme("ftp".into()),
                "image URL scheme `ftp` is not supported",
            ),
            (
                ImageFetchError::BlockedAddress {
                    ip: "169.254.169.254".parse().unwrap(),
                    class: "link-local",
                },
                "image URL host resolves to 169.254.169.254 (link-local address), which is not allowed",
            ),
            (ImageFetchError::TooLarge(20971520), "image exceeds 20971520 bytes"),
            (
                ImageFetchError::Timeout(Duration::from_secs(10)),
                "fetching the image timed out after 10 s",
            ),
            (
                ImageFetchError::Timeout(Duration::from_millis(250)),
                "fetching the image timed out after 250 ms",
            ),
            (ImageFetchError::HttpStatus(404), "image URL returned HTTP 404"),
            (ImageFetchError::TooManyRedirects(5), "too many redirects (more than 5)"),
        ];
        for (err, message) in cases {
            assert_eq!(err.to_string(), message);
        }
        let config = ImageFetchConfig::default();
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert_eq!(config.max_bytes, 20 * 1024 * 1024);
        assert_eq!(config.max_redirects, 5);
        assert!(!config.allow_private_networks && config.allowed_local_dir.is_none());
    }

    #[tokio::test]
    async fn images_unsupported_schemes_and_bad_urls() {
        let f = fetcher(private_ok());
        for (url, scheme) in [
            ("ftp://example.com/a.png", "ftp"),
            ("gopher://127.0.0.1/", "gopher"),
            ("javascript:alert(1)", "javascript"),
            ("blob:https://example.com/uuid", "blob"),
        ] {
            let err = f.fetch(url).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("image URL scheme `{scheme}` is not supported")
            );
        }
        for url in ["", "not a url", "/relative/path.png", "http://"] {
            let err = f.fetch(url).await.unwrap_err();
            assert!(
                matches!(err, ImageFetchError::InvalidUrl(_)),
                "{url}: {err}"
            );
        }
    }
}
