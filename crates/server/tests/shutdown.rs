//! SIGTERM: the server stops accepting, finishes the requests in flight, and exits 0.

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_internvl"))
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--kv-cache-memory",
            "16MiB",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = async {
        for _ in 0..400 {
            if let Ok(r) = client.get(format!("{base}/health")).send().await {
                if r.status() == 200 {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    };
    assert!(ready.await, "server did not start");
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

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = match client.get(format!("{base}/health")).send().await {
        Err(_) => true,
        Ok(r) => r.status() == 503,
    };
    assert!(refused, "new requests are refused while draining");

    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the in-flight request completed"
    );
    assert_eq!(text.matches("\"finish_reason\":\"length\"").count(), 1);

    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
