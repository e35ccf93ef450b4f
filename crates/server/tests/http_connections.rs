//! Connections over real TCP: headers and bodies must arrive in time, idle connections are
//! closed, connections past the cap are refused while the server goes on serving, a streamed
//! answer outlasts every timeout, and a drain answers 503 until what is in flight is done.

mod common;

use common::{Server, Wait};
use internvl_server::settings::ServeArgs;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a test waits for something the server must do after a one-second timeout; old
/// code never does it at all.
const PATIENCE: Duration = Duration::from_secs(15);

impl Server {
    /// `internvl serve` in this process, with one-second header and body timeouts, `edit`ed;
    /// returns at once, the model still loading.
    async fn start(edit: impl FnOnce(&mut ServeArgs)) -> Server {
        let mut args = ServeArgs {
            header_read_timeout: Some(1),
            body_read_timeout: Some(1),
            idle_timeout: Some(3),
            ..common::demo_args()
        };
        edit(&mut args);
        // The tests here make their own clients; this one is never used.
        Server::spawn(args, reqwest::Client::new()).await
    }

    /// Waits until the model has loaded, asking with a client of its own (dropped after, with
    /// its connections).
    async fn ready(&self) {
        self.wait_for_health(&reqwest::Client::new(), Wait::Healthy)
            .await;
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }
}

/// Reads until the server closes the connection; what it sent, or `None` if it did not close
/// within `PATIENCE`.
async fn until_closed(stream: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1).and_then(|s| s.parse().ok())
}

#[tokio::test]
async fn unfinished_headers_are_cut_off_after_the_header_timeout() {
    let s = Server::start(|_| {}).await;
    // Never finished.
    let mut stalled = s.connect().await;
    stalled
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Trickled: a header line every 300 ms, each well within any per-read timeout.
    let mut trickling = s.connect().await;
    trickling
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        let started = Instant::now();
        for i in 0.. {
            let line = format!("X-Slow-{i}: y\r\n");
            if trickling.write_all(line.as_bytes()).await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if started.elapsed() > PATIENCE {
                return None;
            }
        }
        None
    });
    assert!(
        until_closed(&mut stalled).await.is_some(),
        "a head never finished must be closed"
    );
    assert!(
        trickle.await.unwrap().is_some(),
        "a head trickled in line by line must be closed"
    );
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let s = Server::start(|a| a.max_header_bytes = Some(16 << 10)).await;
    let mut stream = s.connect().await;
    let mut head = String::from("GET /health HTTP/1.1\r\nHost: x\r\n");
    while head.len() < 64 << 10 {
        head.push_str("X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    // The server may close before it has read all of it.
    let _ = stream.write_all(head.as_bytes()).await;
    let answer = until_closed(&mut stream).await.expect("closed");
    assert!(
        answer.is_empty() || status_of(&answer) == Some(431),
        "{answer}"
    );
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout_not_the_header_timeout() {
    let s = Server::start(|_| {}).await;
    // Connected, nothing ever sent.
    let mut silent = s.connect().await;
    let started = Instant::now();
    assert!(until_closed(&mut silent).await.is_some(), "never closed");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "closed after {:?}: the 3 s idle limit, not the 1 s header limit",
        started.elapsed()
    );

    // A kept-alive connection may wait between requests longer than the header timeout.
    let mut kept = s.connect().await;
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    kept.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let n = kept.read(&mut buf).await.unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), Some(200));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kept.write_all(request).await.unwrap();
    let n = kept.read(&mut buf).await.unwrap();
    assert!(n > 0, "the kept-alive connection was closed after 1.5 s");
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..n])), Some(200));
}

#[tokio::test]
async fn a_body_that_never_arrives_is_answered_after_the_body_timeout() {
    let s = Server::start(|_| {}).await;
    // Declared far past the body limit: refused without waiting for it.
    let mut huge = s.connect().await;
    huge.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000000000000\r\n\r\n{\"mo",
    )
    .await
    .unwrap();
    let answer = until_closed(&mut huge).await.expect("never answered");
    assert_eq!(status_of(&answer), Some(413), "{answer}");

    // Within the limit, but only a few bytes of it ever sent.
    let mut short = s.connect().await;
    short
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"model\"",
        )
        .await
        .unwrap();
    let answer = until_closed(&mut short).await.expect("never answered");
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    assert!(
        answer.contains("\"type\":\"invalid_request_error\""),
        "{answer}"
    );
    assert!(
        answer.contains("did not arrive within 1 seconds"),
        "{answer}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_while_the_server_serves() {
    let s = Server::start(|a| a.max_connections = Some(3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(s.connect().await);
    }
    // Give the accept loop time to take all three.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = s.connect().await;
    assert_eq!(
        until_closed(&mut over).await.as_deref(),
        Some(""),
        "the fourth connection is closed at once, unanswered"
    );
    // One held connection does real work meanwhile.
    let busy = &mut held[0];
    busy.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = busy.read(&mut buf).await.unwrap();
    assert!(status_of(&String::from_utf8_lossy(&buf[..n])).is_some());
    // A freed slot takes a new connection.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = reqwest::get(s.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused = common::sample(&text, "internvl:http_connections_refused_total", "");
    assert_eq!(refused, Some(1.0), "{text}");
}

fn long_stream(max_tokens: usize) -> String {
    json!({
        "model": "demo-internvl",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": true
    })
    .to_string()
}

#[tokio::test]
async fn a_stream_outlasts_every_timeout() {
    let s = Server::start(|a| a.idle_timeout = Some(1)).await;
    s.ready().await;
    let started = Instant::now();
    let mut response = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(long_stream(2000))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let first = response.chunk().await.unwrap().expect("a first chunk");
    text.push_str(&String::from_utf8_lossy(&first));
    // The client pauses longer than every timeout (1 s each) with the response in flight,
    // whatever the speed of the generation: only reading a request and idling between
    // requests are timed, never a response being sent.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    common::read_rest(&mut response, &mut text).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches("\"finish_reason\":\"length\"").count(), 1);
    assert!(started.elapsed() > Duration::from_millis(2500));
}

#[tokio::test]
async fn a_drain_answers_503_closes_what_is_idle_and_ends_when_the_stream_does() {
    // Header and idle timers far off: only the drain may close the idle connections.
    let mut s = Server::start(|a| {
        a.shutdown_timeout = Some(120);
        a.header_read_timeout = Some(60);
        a.idle_timeout = Some(60);
    })
    .await;
    s.ready().await;
    let client = reqwest::Client::new();
    let mut response = client
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(long_stream(1500))
        .send()
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&response.chunk().await.unwrap().unwrap()).into_owned();
    let mut idle = s.connect().await;
    let mut half_open = s.connect().await;
    half_open
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    s.stop.take().unwrap().send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closed_at_once = async {
        tokio::time::timeout(Duration::from_millis(800), until_closed(&mut idle))
            .await
            .is_ok()
            && tokio::time::timeout(Duration::from_millis(800), until_closed(&mut half_open))
                .await
                .is_ok()
    };
    assert!(
        closed_at_once.await,
        "idle and half-sent connections close on drain"
    );
    // The port stays open: probes and new requests hear 503, on a fresh connection.
    let fresh = reqwest::Client::new();
    let health = fresh.get(s.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    let refused = fresh
        .post(s.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(long_stream(1500))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(!s.serving.is_finished(), "a stream is still in flight");

    let tokens_after_drain = common::read_rest(&mut response, &mut text).await;
    assert!(
        tokens_after_drain > 0,
        "the stream was in flight at the drain"
    );
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Nothing left in flight: serve returns long before its 120 s deadline.
    let served = tokio::time::timeout(PATIENCE, &mut s.serving).await;
    assert!(
        matches!(served, Ok(Ok(Ok(())))),
        "serve returned once drained"
    );
}
