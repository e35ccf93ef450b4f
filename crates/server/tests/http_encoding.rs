//! Compressed request bodies (`Content-Encoding`): gzip and deflate bodies are answered as
//! their plain twins; the body limit bounds the decompressed bytes, so a bomb of a few hundred
//! kilobytes that inflates to hundreds of megabytes is a quick 413 and the server serves on; a
//! corrupt stream is a 400; an encoding we do not take is a 415 naming those we do.

mod common;

use common::{json_body, Server, Wait, MODEL};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

/// The server's body limit here: small, so that a bomb past it is cheap to build.
const LIMIT: usize = 1 << 20;

async fn start() -> Server {
    let mut args = common::demo_args();
    args.max_body_bytes = Some(LIMIT);
    Server::spawn_and_wait(args, reqwest::Client::new(), Wait::Healthy).await
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2), which is what clients send.
fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// POSTs `body` as JSON to `path` with `Content-Encoding: encoding`.
async fn post(s: &Server, path: &str, encoding: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut request = s
        .client
        .post(s.url(path))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(60))
        .body(body);
    if let Some(encoding) = encoding {
        request = request.header("content-encoding", encoding);
    }
    request.send().await.unwrap()
}

fn tokenize_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Read the numbers on the sign, please"}]
    }))
    .unwrap()
}

/// An OpenAI error body with `status`; its message.
async fn error(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status().as_u16(), status);
    let body: Value = json_body(r).await;
    let e = &body["error"];
    assert_eq!(e["type"], "invalid_request_error", "{body}");
    e["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn compressed_bodies_are_answered_as_plain_ones() {
    let s = start().await;
    let plain = json_body(post(&s, "/tokenize", None, tokenize_body()).await).await;
    assert!(plain["count"].as_u64().unwrap() > 0, "{plain}");
    let cases = [
        ("gzip", gzip(&tokenize_body())),
        ("x-gzip", gzip(&tokenize_body())),
        (" GZip ", gzip(&tokenize_body())),
        ("deflate", zlib(&tokenize_body())),
        ("identity", tokenize_body()),
    ];
    for (encoding, body) in cases {
        let r = post(&s, "/tokenize", Some(encoding), body).await;
        assert_eq!(r.status(), 200, "{encoding}");
        assert_eq!(json_body(r).await, plain, "{encoding}");
    }

    // A chat, gzipped, is a chat.
    let chat = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
        "temperature": 0
    });
    let chat = serde_json::to_vec(&chat).unwrap();
    let plain = json_body(post(&s, "/v1/chat/completions", None, chat.clone()).await).await;
    let r = post(&s, "/v1/chat/completions", Some("gzip"), gzip(&chat)).await;
    assert_eq!(r.status(), 200);
    let zipped = json_body(r).await;
    assert_eq!(
        zipped["choices"][0]["message"], plain["choices"][0]["message"],
        "{zipped}"
    );
    assert_eq!(zipped["usage"], plain["usage"]);
}

/// A body within the limit compressed, past it decompressed: 413, quickly, whether it inflates
/// to just past the limit or to 256 times it; and the server answers the next request.
#[tokio::test]
async fn the_limit_bounds_the_decompressed_body() {
    let s = start().await;
    // Valid JSON whatever its size, so only the size can be refused: a short request
    // followed by whitespace.
    let bomb = |size: usize| {
        let mut body = br#"{"model": "demo-internvl", "prompt": "hi"}"#.to_vec();
        body.resize(size, b' ');
        body
    };
    let at_limit = bomb(LIMIT - 64);
    let r = post(&s, "/tokenize", Some("gzip"), gzip(&at_limit)).await;
    assert_eq!(r.status(), 200, "a body just under the limit is taken");
    for (encoding, size) in [
        ("gzip", LIMIT + 1),
        ("gzip", 256 * LIMIT),
        ("deflate", 256 * LIMIT),
    ] {
        let plain = bomb(size);
        let body = if encoding == "gzip" {
            gzip(&plain)
        } else {
            zlib(&plain)
        };
        assert!(
            body.len() < LIMIT / 2,
            "the bomb itself is small: {}",
            body.len()
        );
        let started = Instant::now();
        let message = error(post(&s, "/tokenize", Some(encoding), body).await, 413).await;
        assert!(
            message.contains(&format!("exceeds {LIMIT} bytes once decompressed")),
            "{message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{encoding} bomb of {size} bytes took {:?}",
            started.elapsed()
        );
    }
    let r = post(&s, "/tokenize", None, tokenize_body()).await;
    assert_eq!(r.status(), 200, "the server serves on after the bombs");
}

#[tokio::test]
async fn corrupt_streams_are_400s() {
    let s = start().await;
    let mut flipped = gzip(&tokenize_body());
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    let truncated = {
        let full = gzip(&tokenize_body());
        full[..full.len() / 2].to_vec()
    };
    let cases = [
        ("gzip", b"this is not gzip".to_vec()),
        ("gzip", flipped),
        ("gzip", truncated),
        ("deflate", b"nor is this deflate".to_vec()),
        // gzip sent as deflate: the wrong container.
        ("deflate", gzip(&tokenize_body())),
    ];
    for (encoding, body) in cases {
        let message = error(post(&s, "/tokenize", Some(encoding), body).await, 400).await;
        assert!(
            message.contains(&format!("not valid {encoding}-compressed data")),
            "{encoding}: {message}"
        );
    }
    let r = post(&s, "/tokenize", None, tokenize_body()).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn other_encodings_are_415s_naming_the_accepted() {
    let s = start().await;
    for encoding in ["br", "zstd", "compress", "gzip, deflate", "gzip;q=1"] {
        let r = post(&s, "/tokenize", Some(encoding), gzip(&tokenize_body())).await;
        assert_eq!(
            r.headers()["accept-encoding"].to_str().unwrap(),
            "gzip, deflate",
            "{encoding}"
        );
        let message = error(r, 415).await;
        assert!(message.contains("gzip or deflate"), "{encoding}: {message}");
    }
}
