//! A client that never reads its stream, over real HTTP on the demo checkpoint: once what its
//! request has generated and not delivered passes `max_buffered_output_bytes`, the request is
//! cancelled (counted in `internvl:request_output_buffer_overflows_total`), its KV blocks
//! come back, and other clients are served meanwhile.

mod common;

use common::{Server, Wait, MODEL};
use internvl_server::settings::ServeArgs;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

const OVERFLOWS: &str = "internvl:request_output_buffer_overflows_total";

impl Server {
    /// A server on 127.0.0.1 that lets a request hold 16 KiB of unread output, once its model
    /// has loaded; dropped, it shuts down.
    async fn start() -> Server {
        let args = ServeArgs {
            max_buffered_output_bytes: Some(16 << 10),
            ..common::demo_args()
        };
        Server::spawn_and_wait(args, reqwest::Client::new(), Wait::Healthy).await
    }

    /// Polls `name` until `done` holds of it, for at most `seconds`.
    async fn wait_for(&self, name: &str, seconds: u64, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let value = self.metric(name).await;
            if done(value) || Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn chat(&self, max_tokens: u64) -> (u16, Value) {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "你好"}],
            "max_tokens": max_tokens,
            "ignore_eos": true,
        });
        let r = self.send("/v1/chat/completions", &body).await;
        let status = r.status().as_u16();
        (status, common::json_body(r).await)
    }
}

/// Sends a streamed request for 16 completions of 1000 tokens with 20 logprobs each (some
/// 25 MB of SSE) on a connection with a small receive buffer, and never reads from it.
async fn never_reading_client(addr: SocketAddr) -> tokio::net::TcpStream {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "你好"}],
        "stream": true,
        "n": 16,
        "logprobs": true,
        "top_logprobs": 20,
        "max_tokens": 1000,
        "ignore_eos": true,
    })
    .to_string();
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    stream
}

#[tokio::test]
async fn a_client_that_never_reads_is_cancelled_at_the_output_bound() {
    let s = Server::start().await;
    assert_eq!(s.metric(OVERFLOWS).await, 0.0);
    let silent = never_reading_client(s.addr).await;

    // Another client is served while the silent one's answer piles up.
    let (status, body) = s.chat(8).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8);

    let overflows = s.wait_for(OVERFLOWS, 120, |v| v >= 1.0).await;
    assert_eq!(
        overflows, 1.0,
        "the silent request is cancelled at the bound"
    );
    let usage = s
        .wait_for("internvl:kv_cache_usage_perc", 10, |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0, "its KV blocks are back");
    let running = s
        .wait_for("internvl:num_requests_running", 10, |v| v == 0.0)
        .await;
    assert_eq!(running, 0.0);
    let aborted = s
        .labelled_metric(
            "internvl:request_success_total",
            "finished_reason=\"abort\"",
        )
        .await;
    assert_eq!(aborted, 16.0, "all 16 completions stopped");

    // And the server still serves, the silent connection still open.
    let (status, body) = s.chat(8).await;
    assert_eq!(status, 200, "{body}");
    drop(silent);
}
