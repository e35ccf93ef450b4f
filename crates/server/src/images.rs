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

use std::fs::OpenOptions;
use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine as _;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::LOCATION;
use reqwest::{Client, Url};

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
    /// 10 s, 20 MiB, 5 redirects, public addresses only, no local files.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_bytes: 20 << 20,
            max_redirects: 5,
            allow_private_networks: false,
            allowed_local_dir: None,
        }
    }
}

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

/// Says why an address must not be connected to (its class, for the error message), or `None`
/// for an address that may be.
type Classifier = fn(IpAddr) -> Option<&'static str>;

/// Resolves image URLs to bytes. Cloning shares the HTTP connection pool.
#[derive(Clone)]
pub struct ImageFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    classify: Classifier,
    timeout: Duration,
    max_bytes: usize,
    max_redirects: usize,
    local_dir: Option<LocalDir>,
}

/// The allowed directory as configured and with symlinks resolved: URL paths are checked
/// against both lexically, and the canonicalized file against the latter.
struct LocalDir {
    configured: PathBuf,
    canonical: PathBuf,
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
        let local_dir = match config.allowed_local_dir {
            None => None,
            Some(configured) => {
                let canonical = configured.canonicalize().map_err(|e| {
                    ImageFetchError::Config(format!(
                        "allowed_local_dir `{}`: {e}",
                        configured.display()
                    ))
                })?;
                if !canonical.is_dir() {
                    return Err(ImageFetchError::Config(format!(
                        "allowed_local_dir `{}` is not a directory",
                        configured.display()
                    )));
                }
                Some(LocalDir {
                    configured,
                    canonical,
                })
            }
        };
        let client = Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { classify }))
            .user_agent(concat!("internvl-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ImageFetchError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                classify,
                timeout: config.timeout,
                max_bytes: config.max_bytes,
                max_redirects: config.max_redirects,
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
            "http" | "https" => tokio::time::timeout(timeout, self.fetch_http(parsed))
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

    /// GET `url`, following redirects by hand so that each target is checked like the first.
    async fn fetch_http(&self, mut url: Url) -> Result<Vec<u8>, ImageFetchError> {
        let mut redirects = 0;
        loop {
            if !matches!(url.scheme(), "http" | "https") {
                // A redirect to file:, data:, ftp:, ...: never followed.
                return Err(ImageFetchError::UnsupportedScheme(url.scheme().to_owned()));
            }
            self.check_ip_literal(&url)?;
            let mut response = self
                .inner
                .client
                .get(url.clone())
                .send()
                .await
                .map_err(request_error)?;
            let status = response.status();
            if matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                let location = response
                    .headers()
                    .get(LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .ok_or(ImageFetchError::BadRedirect)?;
                if redirects == self.inner.max_redirects {
                    return Err(ImageFetchError::TooManyRedirects(self.inner.max_redirects));
                }
                redirects += 1;
                url = url
                    .join(location)
                    .map_err(|_| ImageFetchError::BadRedirect)?;
                continue;
            }
            if !status.is_success() {
                // The body is never read, let alone echoed: it may be an internal page.
                return Err(ImageFetchError::HttpStatus(status.as_u16()));
            }
            let max = self.inner.max_bytes;
            let declared = response.content_length();
            if declared.is_some_and(|len| len > max as u64) {
                return Err(ImageFetchError::TooLarge(max));
            }
            // The declared length (already capped) is only a capacity hint; the cap is enforced
            // on the bytes that actually arrive, chunk by chunk.
            let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
            while let Some(chunk) = response.chunk().await.map_err(request_error)? {
                if chunk.len() > max - body.len() {
                    return Err(ImageFetchError::TooLarge(max));
                }
                body.extend_from_slice(&chunk);
            }
            return Ok(body);
        }
    }

    /// Host names are checked by [`GuardedResolver`]; hosts written as IP addresses never reach
    /// a resolver, so they are checked here.
    fn check_ip_literal(&self, url: &Url) -> Result<(), ImageFetchError> {
        let host = url
            .host_str()
            .ok_or_else(|| ImageFetchError::InvalidUrl("missing host".to_owned()))?;
        // `Url` has already normalized every IPv4 spelling (octal, hex, `127.1`) to dotted
        // decimal and IPv6 to its bracketed compressed form, both of which parse here.
        let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        else {
            return Ok(());
        };
        match (self.inner.classify)(ip) {
            Some(class) => Err(ImageFetchError::BlockedAddress { ip, class }),
            None => Ok(()),
        }
    }
}

/// The DNS resolver of the HTTP client: resolves once and hands hyper only the addresses the
/// classifier allows, so the addresses checked are the addresses connected to. A name with no
/// allowed address fails with [`ImageFetchError::BlockedAddress`], found again by
/// [`request_error`] in the error's source chain.
struct GuardedResolver {
    classify: Classifier,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let classify = self.classify;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let mut allowed = Vec::new();
            let mut refused = None;
            for addr in tokio::net::lookup_host((host.as_str(), 0)).await? {
                match classify(addr.ip()) {
                    None => allowed.push(addr),
                    Some(class) => {
                        refused.get_or_insert(ImageFetchError::BlockedAddress {
                            ip: addr.ip(),
                            class,
                        });
                    }
                }
            }
            match refused {
                Some(err) if allowed.is_empty() => Err(err.into()),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// Maps a reqwest error to a client-facing one: the resolver's refusal if it is in the source
/// chain, otherwise the innermost cause (e.g. "Connection refused (os error 111)", a TLS
/// certificate error), which says what went wrong without the wrapping.
fn request_error(err: reqwest::Error) -> ImageFetchError {
    let mut cause: &(dyn std::error::Error + 'static) = &err;
    loop {
        if let Some(ours) = cause.downcast_ref::<ImageFetchError>() {
            return ours.clone();
        }
        // `io::Error::source` skips the error it wraps, so look inside explicitly.
        if let Some(ours) = cause
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<ImageFetchError>())
        {
            return ours.clone();
        }
        match cause.source() {
            Some(next) => cause = next,
            None => return ImageFetchError::Request(cause.to_string()),
        }
    }
}

/// Why `ip` must not be fetched from, as the class named in the error, or `None` for a
/// public address. Pure, so it is tested on a table rather than by connecting anywhere.
fn blocked_address_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => blocked_v4_class(ip),
        IpAddr::V6(ip) => blocked_v6_class(ip),
    }
}

fn blocked_v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() {
        Some("loopback") // 127/8
    } else if ip.is_private() {
        Some("private") // 10/8, 172.16/12, 192.168/16
    } else if ip.is_link_local() {
        Some("link-local") // 169.254/16, including the cloud metadata address
    } else if a == 0 {
        Some("unspecified") // 0/8 "this network"; connecting to 0.0.0.0 reaches localhost
    } else if a == 100 && b & 0xc0 == 64 {
        Some("shared (CGNAT)") // 100.64/10
    } else if (a, b, c) == (192, 0, 0) {
        Some("IETF protocol assignment") // 192.0.0/24: NAT64 discovery, DS-Lite, ...
    } else if a == 198 && b & 0xfe == 18 {
        Some("benchmarking") // 198.18/15, lab networks
    } else if matches!((a, b, c), (192, 0, 2) | (198, 51, 100) | (203, 0, 113)) {
        Some("documentation") // TEST-NET-1, -2 and -3: never routed, so only ever local
    } else if ip.is_multicast() {
        Some("multicast") // 224/4
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if a >= 240 {
        Some("reserved") // 240/4
    } else {
        None
    }
}

fn blocked_v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    // Forms that carry an IPv4 address and reach it: IPv4-mapped ::ffff:a.b.c.d, the
    // deprecated IPv4-compatible ::a.b.c.d, NAT64's 64:ff9b::a.b.c.d, and 6to4's
    // 2002:aabb:ccdd::/48, which a 6to4 router delivers to a.b.c.d over IPv4. Each is as
    // allowed as the address it carries.
    let segments = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4_class(v4);
    }
    if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return blocked_v4_class(Ipv4Addr::from_bits(ip.to_bits() as u32));
    }
    if segments[0] == 0x2002 {
        return blocked_v4_class(Ipv4Addr::from_bits((ip.to_bits() >> 80) as u32));
    }
    // Teredo (2001::/32) carries two IPv4 addresses (its server's, and the client's in
    // obfuscated bits) and is reached through whichever relay routes it: refused outright.
    if segments[..2] == [0x2001, 0] {
        return Some("Teredo");
    }
    if segments[..4] == [0x100, 0, 0, 0] {
        return Some("discard-only"); // 100::/64
    }
    if segments[..2] == [0x2001, 0xdb8] {
        return Some("documentation"); // 2001:db8::/32
    }
    if segments[..3] == [0x2001, 2, 0] {
        return Some("benchmarking"); // 2001:2::/48
    }
    match segments[0] {
        s if s & 0xfe00 == 0xfc00 => Some("private"), // fc00::/7 unique local
        s if s & 0xffc0 == 0xfe80 => Some("link-local"), // fe80::/10
        s if s & 0xffc0 == 0xfec0 => Some("private"), // fec0::/10, deprecated site-local
        s if s & 0xff00 == 0xff00 => Some("multicast"), // ff00::/8
        _ => None,
    }
}

/// Decodes what follows `data:`: `[<media type>][;<parameter>]*;base64,<data>`.
fn decode_data_url(rest: &str, max_bytes: usize) -> Result<Vec<u8>, ImageFetchError> {
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

/// Reads a `file://` URL's file if it lies under the allowed directory once symlinks are
/// resolved. The URL path is first checked lexically (no `..`, under the directory), so that
/// paths elsewhere are refused without touching the filesystem and clients cannot probe which
/// files exist outside the directory. The directory's own contents are the operator's.
fn read_local_file(
    dir: &LocalDir,
    url: &Url,
    max_bytes: usize,
) -> Result<Vec<u8>, ImageFetchError> {
    let path = url.to_file_path().map_err(|()| {
        ImageFetchError::InvalidUrl("a file URL must be an absolute path on this server".into())
    })?;
    let under = |root: &Path| path.starts_with(root);
    if path.components().any(|c| c == Component::ParentDir)
        || !(under(&dir.configured) || under(&dir.canonical))
    {
        return Err(ImageFetchError::OutsideLocalDir);
    }
    let canonical = path.canonicalize().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ImageFetchError::LocalFileNotFound,
        _ => ImageFetchError::LocalFile(e.to_string()),
    })?;
    if !canonical.starts_with(&dir.canonical) {
        return Err(ImageFetchError::OutsideLocalDir); // a symlink pointing out
    }
    let read_error = |e: io::Error| ImageFetchError::LocalFile(e.to_string());
    let not_regular = || ImageFetchError::LocalFile("not a regular file".into());
    // Opening a FIFO blocks until a writer appears, and a device may never answer: only
    // regular files are opened, and the open itself cannot block (O_NONBLOCK, which reads
    // of regular files ignore). The opened file is checked again, in case the path was
    // replaced between the two.
    if !std::fs::metadata(&canonical).map_err(read_error)?.is_file() {
        return Err(not_regular());
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&canonical)
        .map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    if metadata.len() > max_bytes as u64 {
        return Err(ImageFetchError::TooLarge(max_bytes));
    }
    // The file may grow after `metadata`: read at most one byte past the cap to notice.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > max_bytes {
        return Err(ImageFetchError::TooLarge(max_bytes));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A 1x1 RGB PNG, and the same bytes as a client would send them in a data URL.
    const PNG: [u8; 69] = [
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90,
        0x77, 0x53, 0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8,
        0xcf, 0xc0, 0x00, 0x00, 0x03, 0x01, 0x01, 0x00, 0xc9, 0xfe, 0x92, 0xef, 0x00, 0x00, 0x00,
        0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    const PNG_BASE64: &str =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

    fn fetcher(config: ImageFetchConfig) -> ImageFetcher {
        ImageFetcher::new(config).unwrap()
    }

    fn private_ok() -> ImageFetchConfig {
        ImageFetchConfig {
            allow_private_networks: true,
            ..ImageFetchConfig::default()
        }
    }

    // ---- the address classifier -------------------------------------------------------------

    #[test]
    fn images_classifier_table() {
        let blocked = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.254", "shared (CGNAT)"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::127.0.0.1", "loopback"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("fc00::1", "private"),
            ("fd00::1", "private"),
            ("fec0::1", "private"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("ff02::1", "multicast"),
            ("192.0.0.1", "IETF protocol assignment"),
            ("192.0.0.255", "IETF protocol assignment"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.255", "documentation"),
            ("::ffff:198.18.0.1", "benchmarking"),
            ("64:ff9b::c000:201", "documentation"),
            ("2002:7f00:1::", "loopback"),
            ("2002:a00:1::1", "private"),
            ("2002:a9fe:a9fe:1:2:3:4:5", "link-local"),
            ("2002:c000:0001::", "IETF protocol assignment"),
            ("2002::", "unspecified"),
            ("2001::1", "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", "Teredo"),
            ("100::1", "discard-only"),
            ("100::ffff:ffff:ffff:ffff", "discard-only"),
            ("2001:db8::1", "documentation"),
            ("2001:db8:ffff:ffff::1", "documentation"),
            ("2001:2::1", "benchmarking"),
        ];
        for (ip, class) in blocked {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(blocked_address_class(parsed), Some(class), "{ip}");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "169.253.255.255",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "fe00::1",
            "192.0.1.255",
            "192.0.3.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "198.51.101.0",
            "203.0.112.255",
            "203.0.114.0",
            // 6to4 of 8.8.8.8: a public host behind a public IPv4 address.
            "2002:808:808::1",
            "2001:1::1",
            "2001:3::1",
            "100:0:0:1::1",
            "2001:db9::1",
            "2001:db7:ffff::1",
        ];
        for ip in allowed {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(blocked_address_class(parsed), None, "{ip}");
        }
    }

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

    // ---- data URLs and schemes ----------------------------------------------------------------

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

    // ---- file:// URLs -----------------------------------------------------------------------

    fn file_url(path: &Path) -> String {
        Url::from_file_path(path).unwrap().to_string()
    }

    #[tokio::test]
    async fn images_file_urls() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(allowed.join("sub/cat.png"), PNG).unwrap();
        std::fs::write(outside.join("secret.png"), PNG).unwrap();
        std::fs::write(allowed.join("big.png"), [0u8; 100]).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.png"), allowed.join("escape.png")).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("escape_dir")).unwrap();
        std::os::unix::fs::symlink(allowed.join("sub/cat.png"), allowed.join("alias.png")).unwrap();

        // Not configured: refused even for the file that would be allowed.
        let err = fetcher(ImageFetchConfig::default())
            .fetch(&file_url(&allowed.join("sub/cat.png")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "file URLs are not enabled on this server");

        let f = fetcher(ImageFetchConfig {
            max_bytes: 99,
            allowed_local_dir: Some(allowed.clone()),
            ..ImageFetchConfig::default()
        });
        assert_eq!(
            f.fetch(&file_url(&allowed.join("sub/cat.png")))
                .await
                .unwrap(),
            PNG
        );
        assert_eq!(
            f.fetch(&file_url(&allowed.join("alias.png")))
                .await
                .unwrap(),
            PNG
        );
        let base = file_url(&allowed);
        let outside_urls = [
            file_url(&outside.join("secret.png")),
            file_url(&allowed.join("escape.png")),
            file_url(&allowed.join("escape_dir/secret.png")),
            format!("{base}/../outside/secret.png"),
            format!("{base}/sub/%2E%2E/%2E%2E/outside/secret.png"),
            format!("{base}/..%2F..%2Foutside/secret.png"),
            "file:///etc/passwd".to_owned(),
            "file:///nonexistent/x.png".to_owned(),
        ];
        for url in outside_urls {
            let err = f.fetch(&url).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                "image file is outside the allowed directory",
                "{url}"
            );
        }
        let err = f
            .fetch(&file_url(&allowed.join("none.png")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "image file not found");
        let err = f
            .fetch(&file_url(&allowed.join("big.png")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "image exceeds 99 bytes");
        let err = f.fetch(&file_url(&allowed.join("sub"))).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "could not read the image file: not a regular file"
        );
        let err = f.fetch("file://otherhost/etc/passwd").await.unwrap_err();
        assert!(matches!(err, ImageFetchError::InvalidUrl(_)), "{err}");
    }

    /// Opening a FIFO for reading blocks until a writer comes, which here is never: the
    /// request must fail at once instead of holding a blocking thread (and the client) forever.
    #[tokio::test]
    async fn images_file_fifo_is_refused_without_blocking() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("pipe.png");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink(&fifo, root.path().join("alias.png")).unwrap();
        let f = fetcher(ImageFetchConfig {
            allowed_local_dir: Some(root.path().to_owned()),
            ..ImageFetchConfig::default()
        });
        for name in ["pipe.png", "alias.png"] {
            let url = file_url(&root.path().join(name));
            let err = tokio::time::timeout(Duration::from_secs(5), f.fetch(&url))
                .await
                .unwrap_or_else(|_| panic!("{name}: the read blocked"))
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "could not read the image file: not a regular file",
                "{name}"
            );
        }
    }

    #[test]
    fn images_bad_local_dir_is_a_config_error() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for dir in [root.path().join("missing"), file] {
            let result = ImageFetcher::new(ImageFetchConfig {
                allowed_local_dir: Some(dir),
                ..ImageFetchConfig::default()
            });
            assert!(matches!(result, Err(ImageFetchError::Config(_))));
        }
    }

    // ---- http:// against loopback test servers ------------------------------------------------

    /// What the test server does on one connection: write each part after its delay.
    struct Reply(Vec<(Duration, Vec<u8>)>);

    fn reply(raw: impl Into<Vec<u8>>) -> Reply {
        Reply(vec![(Duration::ZERO, raw.into())])
    }

    // Every reply closes its connection (one request per connection keeps the server trivial),
    // and says so, so that the client never sends a second request on it.
    fn ok(body: &[u8]) -> Reply {
        let head = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        reply([head.as_bytes(), body].concat())
    }

    /// No Content-Length: the body runs until the connection closes.
    fn ok_until_close(body: &[u8]) -> Reply {
        reply([&b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"[..], body].concat())
    }

    fn redirect(location: &str) -> Reply {
        reply(format!(
            "HTTP/1.1 302 Found\r\nConnection: close\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
        ))
    }

    /// Then holds the connection open for a while, longer than the tests wait.
    fn then_stall(mut reply: Reply) -> Reply {
        reply.0.push((Duration::from_secs(5), Vec::new()));
        reply
    }

    /// A tiny HTTP/1.1 server on `ip` (a loopback address), one thread per connection, at most
    /// 32 connections. `handle` gets the request path and the server's port. Returns the address
    /// and a count of accepted connections.
    fn serve(
        ip: &str,
        handle: impl Fn(&str, u16) -> Reply + Send + Sync + 'static,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let handle = Arc::new(handle);
        std::thread::spawn(move || {
            for stream in listener.incoming().take(32) {
                counter.fetch_add(1, Ordering::SeqCst);
                let handle = Arc::clone(&handle);
                std::thread::spawn(move || respond(stream?, addr.port(), &*handle));
            }
            io::Result::Ok(())
        });
        (addr, accepted)
    }

    fn respond(
        mut stream: TcpStream,
        port: u16,
        handle: &(dyn Fn(&str, u16) -> Reply + Send + Sync),
    ) -> io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head);
        let path = head.split(' ').nth(1).unwrap_or("/");
        for (delay, bytes) in handle(path, port).0 {
            std::thread::sleep(delay);
            stream.write_all(&bytes)?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn images_http_loopback_refused_by_default() {
        let (addr, accepted) = serve("127.0.0.1", |_, _| ok(&PNG));
        let f = fetcher(ImageFetchConfig::default());
        let port = addr.port();
        for (url, ip, class) in [
            (
                format!("http://127.0.0.1:{port}/a.png"),
                "127.0.0.1",
                "loopback",
            ),
            (
                format!("http://127.1:{port}/a.png"),
                "127.0.0.1",
                "loopback",
            ),
            (
                format!("http://0x7f000001:{port}/"),
                "127.0.0.1",
                "loopback",
            ),
            (format!("https://[::1]:{port}/"), "::1", "loopback"),
            (
                format!("http://[::ffff:127.0.0.1]:{port}/"),
                "::ffff:127.0.0.1",
                "loopback",
            ),
            (format!("http://0.0.0.0:{port}/"), "0.0.0.0", "unspecified"),
            (
                "http://169.254.169.254/latest/meta-data/".to_owned(),
                "169.254.169.254",
                "link-local",
            ),
            ("http://10.0.0.1/".to_owned(), "10.0.0.1", "private"),
            ("http://[fd00::1]/".to_owned(), "fd00::1", "private"),
        ] {
            let err = f.fetch(&url).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("image URL host resolves to {ip} ({class} address), which is not allowed"),
                "{url}"
            );
        }
        // A host name is checked on the addresses it resolves to.
        let err = f
            .fetch(&format!("http://localhost:{port}/a.png"))
            .await
            .unwrap_err();
        match err {
            ImageFetchError::BlockedAddress { ip, class } => {
                assert!(ip.is_loopback(), "{ip}");
                assert_eq!(class, "loopback");
            }
            other => panic!("{other}"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing may connect");
    }

    #[tokio::test]
    async fn images_http_allowed_with_private_networks() {
        let (addr, _) = serve("127.0.0.1", |path, _| {
            match path {
            "/a.png" => ok(&PNG),
            "/close.png" => ok_until_close(&PNG),
            _ => {
                reply("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 21\r\n\r\nSECRET internal page\n")
            }
        }
        });
        let port = addr.port();
        let f = fetcher(private_ok());
        let shared = f.clone();
        assert_eq!(
            f.fetch(&format!("http://127.0.0.1:{port}/a.png"))
                .await
                .unwrap(),
            PNG
        );
        // Through the resolver: `localhost` resolves to loopback, which is allowed here.
        let url = format!("http://localhost:{port}/close.png");
        assert_eq!(shared.fetch(&url).await.unwrap(), PNG);
        let err = f
            .fetch(&format!("http://127.0.0.1:{port}/missing.png"))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "image URL returned HTTP 404");
        assert!(!format!("{err:?}").contains("SECRET"));
    }

    #[tokio::test]
    async fn images_http_connection_refused() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = fetcher(private_ok())
            .fetch(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(err, ImageFetchError::Request(_)), "{err}");
        assert!(
            err.to_string().starts_with("could not fetch the image: "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn images_http_redirects() {
        let (addr, _) = serve("127.0.0.1", |path, port| {
            match path.strip_prefix("/r/").and_then(|n| n.parse::<u32>().ok()) {
                Some(0) => ok(&PNG),
                // Alternate relative and absolute Location headers.
                Some(n) if n % 2 == 0 => redirect(&format!("/r/{}", n - 1)),
                Some(n) => redirect(&format!("http://localhost:{port}/r/{}", n - 1)),
                None => match path {
                    "/to-file" => redirect("file:///etc/passwd"),
                    "/to-data" => redirect("data:image/png;base64,aGk="),
                    "/no-location" => reply(
                        "HTTP/1.1 302 Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                    ),
                    _ => reply(
                        "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                    ),
                },
            }
        });
        let port = addr.port();
        let root = tempfile::tempdir().unwrap();
        let f = fetcher(ImageFetchConfig {
            max_redirects: 3,
            // Even with local files enabled, a redirect never leads to one.
            allowed_local_dir: Some(root.path().to_owned()),
            ..private_ok()
        });
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
        assert_eq!(f.fetch(&url("/r/3")).await.unwrap(), PNG);
        let err = f.fetch(&url("/r/4")).await.unwrap_err();
        assert_eq!(err.to_string(), "too many redirects (more than 3)");
        let err = f.fetch(&url("/to-file")).await.unwrap_err();
        assert_eq!(err.to_string(), "image URL scheme `file` is not supported");
        let err = f.fetch(&url("/to-data")).await.unwrap_err();
        assert_eq!(err.to_string(), "image URL scheme `data` is not supported");
        let err = f.fetch(&url("/no-location")).await.unwrap_err();
        assert!(matches!(err, ImageFetchError::BadRedirect), "{err}");
        let no_redirects = fetcher(ImageFetchConfig {
            max_redirects: 0,
            ..private_ok()
        });
        assert_eq!(no_redirects.fetch(&url("/r/0")).await.unwrap(), PNG);
        let err = no_redirects.fetch(&url("/r/1")).await.unwrap_err();
        assert!(matches!(err, ImageFetchError::TooManyRedirects(0)), "{err}");
    }

    /// Only loopback servers exist here, so the policy under test allows exactly 127.0.0.2 and
    /// refuses everything else: the first hop reaches the server, and redirects to other
    /// loopback addresses stand in for redirects from a public host into a private network.
    #[tokio::test]
    async fn images_http_redirect_targets_are_checked_again() {
        fn only_127_0_0_2(ip: IpAddr) -> Option<&'static str> {
            (ip != IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).then_some("test-refused")
        }
        let (addr, accepted) = serve("127.0.0.2", |path, port| match path {
            "/a.png" => ok(&PNG),
            "/to-ip" => redirect(&format!("http://127.0.0.1:{port}/a.png")),
            "/to-mapped" => redirect(&format!("http://[::ffff:127.0.0.1]:{port}/a.png")),
            "/to-name" => redirect(&format!("http://localhost:{port}/a.png")),
            _ => reply("HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
        });
        let port = addr.port();
        let f = ImageFetcher::with_classifier(ImageFetchConfig::default(), only_127_0_0_2).unwrap();
        let url = |path: &str| format!("http://127.0.0.2:{port}{path}");
        assert_eq!(f.fetch(&url("/a.png")).await.unwrap(), PNG);
        for (path, ip) in [("/to-ip", "127.0.0.1"), ("/to-mapped", "::ffff:127.0.0.1")] {
            let err = f.fetch(&url(path)).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "image URL host resolves to {ip} (test-refused address), which is not allowed"
                )
            );
        }
        let err = f.fetch(&url("/to-name")).await.unwrap_err();
        assert!(
            matches!(err, ImageFetchError::BlockedAddress { ip, .. } if ip.is_loopback()),
            "{err}"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            4,
            "one connection per first hop"
        );
    }

    #[tokio::test]
    async fn images_http_timeout() {
        let (addr, _) = serve("127.0.0.1", |path, _| match path {
            // Accepts the request, never answers.
            "/silent" => then_stall(Reply(Vec::new())),
            // Headers and half the body, then nothing: the limit covers the body too.
            _ => then_stall(reply(
                "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
            )),
        });
        let timeout = Duration::from_millis(300);
        let f = fetcher(ImageFetchConfig {
            timeout,
            ..private_ok()
        });
        for path in ["/silent", "/half-body"] {
            let start = Instant::now();
            let err = f
                .fetch(&format!("http://127.0.0.1:{}{path}", addr.port()))
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), "fetching the image timed out after 300 ms");
            assert!(start.elapsed() < Duration::from_secs(3), "{path}");
        }
    }

    #[tokio::test]
    async fn images_http_body_cap() {
        let (addr, _) = serve("127.0.0.1", |path, _| match path {
            "/exact" => ok(&[7; 100]),
            "/exact-until-close" => ok_until_close(&[7; 100]),
            // Declares too much and sends nothing: refused on the header alone.
            "/declared" => then_stall(reply("HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")),
            // No length: one byte over the cap, then the connection stays open. Only stopping
            // as soon as the cap is passed ends this before the timeout.
            _ => then_stall(reply([&b"HTTP/1.1 200 OK\r\n\r\n"[..], &[7; 101]].concat())),
        });
        let f = fetcher(ImageFetchConfig {
            max_bytes: 100,
            timeout: Duration::from_secs(4),
            ..private_ok()
        });
        let url = |path: &str| format!("http://127.0.0.1:{}{path}", addr.port());
        assert_eq!(f.fetch(&url("/exact")).await.unwrap(), [7; 100]);
        assert_eq!(f.fetch(&url("/exact-until-close")).await.unwrap(), [7; 100]);
        for path in ["/declared", "/streamed"] {
            let start = Instant::now();
            let err = f.fetch(&url(path)).await.unwrap_err();
            assert_eq!(err.to_string(), "image exceeds 100 bytes", "{path}");
            assert!(start.elapsed() < Duration::from_secs(2), "{path}");
        }
    }
}
