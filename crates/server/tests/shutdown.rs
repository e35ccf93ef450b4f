//! SIGTERM: the server answers 503 to new requests, finishes the requests in flight, closes
//! idle connections at once, and exits 0 as soon as nothing is in flight.

mod common;

use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `internvl serve` on a free port, once its model has loaded; its base URL.
async fn start() -> (Child, String) {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_internvl"))
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--kv-cache-memory",
            "16MiB",
            "--shutdown-timeout",
            "30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                return (child, base);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not start");
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// How long the process took to exit (it must, with status 0), up to `limit`.
async fn exited_within(child: &mut Child, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "the server did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let (mut child, base) = start().await;
    let client = reqwest::Client::new();
    let body = json!({
        "model": "demo-internvl",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": 1500, "ignore_eos": true, "stream": true
    });
    let mut response = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let mut text = String::from_utf8_lossy(&response.chunk().await.unwrap().unwrap()).into_owned();

    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The port stays open while draining, so probes hear 503, not a refused connection.
    let health = reqwest::Client::new()
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("the listener stays open while draining");
    assert_eq!(
        health.status(),
        503,
        "new requests are refused while draining"
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");

    let tokens_after_sigterm = common::read_rest(&mut response, &mut text).await;
    assert!(
        tokens_after_sigterm > 0,
        "the request was still in flight at SIGTERM"
    );
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight request completed"
    );
    assert_eq!(text.matches("\"finish_reason\":\"length\"").count(), 1);
    exited_within(&mut child, Duration::from_secs(20)).await;
}

#[tokio::test]
async fn idle_and_half_open_connections_do_not_delay_exit() {
    let (mut child, base) = start().await;
    let addr = base.trim_start_matches("http://");
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half_open = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_open
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut half_body = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_body
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    sigterm(&child);
    // Nothing is in flight but a request whose body is not coming: it is cut off (503) and
    // the exit waits neither for the 30 s --shutdown-timeout nor the 60 s body timeout.
    let took = exited_within(&mut child, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(10), "{took:?}");
    let mut answer = Vec::new();
    let _ = half_body.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}
