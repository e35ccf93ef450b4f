//! SIGTERM: the server answers 503 to new requests, finishes the requests in flight, closes
//! idle connections at once, and exits 0 as soon as nothing is in flight.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `internvl serve` on a free port, logging JSON lines to stderr, once its model has loaded;
/// the process, its base URL, and its log (all its lines, once it has exited).
async fn start() -> (Child, String, JoinHandle<Vec<String>>) {
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
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read all along, so that the server never blocks on a full pipe.
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect()
    });
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                return (child, base, log);
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

/// Waits for the process to exit, which it must, with status 0. `limit` only keeps a hung
/// server from hanging the test: it is twice the --shutdown-timeout, so a server that waited
/// for that deadline still exits within it and is caught by [`Drain::check`] instead.
async fn exits_zero(child: &mut Child) {
    let limit = Duration::from_secs(60);
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(started.elapsed() < limit, "the server did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the server's log says of its shutdown.
#[derive(Debug)]
struct Drain {
    /// Requests being answered when the signal arrived, and chat requests admitted then.
    in_flight: u64,
    admitted: u64,
    /// "drained": the drain ended because nothing was left in flight, not at the deadline.
    drained: bool,
    deadline_passed: bool,
}

impl Drain {
    /// Reads the log of an exited server.
    fn of(log: JoinHandle<Vec<String>>) -> Drain {
        let lines = log.join().expect("the log reader");
        let events: Vec<Value> = lines
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .map(|line| line["fields"].clone())
            .collect();
        let message = |m: &str| events.iter().find(|fields| fields["message"] == m);
        let draining = message("shutting down: draining")
            .unwrap_or_else(|| panic!("no drain in the log:\n{}", lines.join("\n")));
        Drain {
            in_flight: draining["in_flight"].as_u64().expect("in_flight"),
            admitted: draining["admitted"].as_u64().expect("admitted"),
            drained: message("drained").is_some(),
            deadline_passed: message("shutdown deadline passed with requests in flight").is_some(),
        }
    }

    /// The drain ended because nothing was left in flight, not because the deadline passed.
    fn check(&self) {
        assert!(self.drained && !self.deadline_passed, "{self:?}");
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let (mut child, base, log) = start().await;
    let client = reqwest::Client::new();
    let body = json!({
        "model": "demo-internvl",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": 1500, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}
    });
    let mut response = client
        .post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    // The first chunk has arrived: the request is being answered.
    let mut text = String::from_utf8_lossy(&response.chunk().await.unwrap().unwrap()).into_owned();

    sigterm(&child);
    // Until the signal is handled /health says 200; from then on, while draining, the port
    // stays open and probes hear 503, not a refused connection.
    let probe = reqwest::Client::new();
    let health = loop {
        let status = probe
            .get(format!("{base}/health"))
            .send()
            .await
            .expect("the listener stays open while draining")
            .status();
        if status != 200 {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(health, 503, "new requests are refused while draining");
    assert!(child.try_wait().unwrap().is_none(), "still running");

    let tokens_after_sigterm = common::read_rest(&mut response, &mut text).await;
    assert!(tokens_after_sigterm > 0, "tokens came after SIGTERM");
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight request completed"
    );
    assert_eq!(text.matches("\"finish_reason\":\"length\"").count(), 1);
    assert!(
        text.contains("\"completion_tokens\":1500"),
        "all 1500 tokens were generated: {}",
        &text[text.len().saturating_sub(400)..]
    );
    exits_zero(&mut child).await;

    let drain = Drain::of(log);
    assert_eq!(
        drain.admitted, 1,
        "the request was still in flight at SIGTERM: {drain:?}"
    );
    assert!(drain.in_flight >= 1, "{drain:?}");
    drain.check();
}

#[tokio::test]
async fn idle_and_half_open_connections_do_not_delay_exit() {
    let (mut child, base, log) = start().await;
    let addr = base.trim_start_matches("http://");
    let _idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half_open = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_open
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The last connection asks for `100 Continue`, which the server sends once the request
    // has reached the API and its body is being read: then this connection, and the two
    // connected before it, have been accepted, and a request is in flight.
    let mut half_body = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_body
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_head(&mut half_body).await;
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
    half_body.write_all(b"{").await.unwrap();
    sigterm(&child);
    // Nothing is in flight but a request whose body is not coming: it is cut off (503) and
    // the exit waits neither for the 30 s --shutdown-timeout nor the 60 s body timeout.
    exits_zero(&mut child).await;
    let mut answer = Vec::new();
    let _ = half_body.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let drain = Drain::of(log);
    assert_eq!(drain.in_flight, 1, "the half-sent request: {drain:?}");
    drain.check();
}

/// Reads one response head (up to its blank line) from `stream`.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = stream.read_u8().await.expect("a response head");
        head.push(byte);
    }
    String::from_utf8_lossy(&head).into_owned()
}
