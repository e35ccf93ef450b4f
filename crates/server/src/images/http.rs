//! `http(s)://` image URLs: fetched under a total timeout and a byte cap, redirects followed
//! by hand (each target checked again, at most `max_redirects`), and every address connected
//! to passed through the address policy, by a resolver that hands hyper only allowed
//! addresses and a check of IP literals.

use super::address_policy::Classifier;
use super::error::ImageFetchError;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::LOCATION;
use reqwest::{Client, Url};
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

/// The HTTP client behind the address policy, with the byte cap and the redirect limit.
pub(super) struct HttpFetcher {
    client: Client,
    classify: Classifier,
    max_bytes: usize,
    max_redirects: usize,
}

impl HttpFetcher {
    /// A client with no proxy (a proxy would resolve and connect past the guard), its own
    /// redirect following off and its resolver guarded by `classify`.
    pub(super) fn new(
        classify: Classifier,
        max_bytes: usize,
        max_redirects: usize,
    ) -> Result<HttpFetcher, ImageFetchError> {
        let client = Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { classify }))
            .user_agent(concat!("internvl-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ImageFetchError::Config(format!("HTTP client: {e}")))?;
        Ok(HttpFetcher {
            client,
            classify,
            max_bytes,
            max_redirects,
        })
    }

    /// GET `url`, following redirects by hand so that each target is checked like the first.
    pub(super) async fn fetch(&self, mut url: Url) -> Result<Vec<u8>, ImageFetchError> {
        let mut redirects = 0;
        loop {
            if !matches!(url.scheme(), "http" | "https") {
                // A redirect to file:, data:, ftp:, ...: never followed.
                return Err(ImageFetchError::UnsupportedScheme(url.scheme().to_owned()));
            }
            self.check_ip_literal(&url)?;
            let mut response = self
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
                if redirects == self.max_redirects {
                    return Err(ImageFetchError::TooManyRedirects(self.max_redirects));
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
            let max = self.max_bytes;
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
        match (self.classify)(ip) {
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{ImageFetchConfig, ImageFetcher};
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

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
        // The timeout's own message: the fetch ended by the deadline, not by the peer.
        for path in ["/silent", "/half-body"] {
            let err = f
                .fetch(&format!("http://127.0.0.1:{}{path}", addr.port()))
                .await
                .unwrap_err();
            assert_eq!(err.to_string(), "fetching the image timed out after 300 ms");
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
        // The cap's message, not the 4 s timeout's: the fetch stopped as the cap was passed.
        for path in ["/declared", "/streamed"] {
            let err = f.fetch(&url(path)).await.unwrap_err();
            assert_eq!(err.to_string(), "image exceeds 100 bytes", "{path}");
        }
    }
}
