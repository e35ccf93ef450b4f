//! Hostile images over real HTTP on the demo checkpoint: each is refused with a 400 naming the
//! problem, promptly, and the server goes on answering. Before the resize budget, the
//! 1×50,000,000 PNG made the resize allocate a 67 GB intermediate (the process aborted) and
//! the 50,000,000×1 one an 800 MB tap table per image; before non-blocking opens, a FIFO under
//! `--local-image-dir` held its request (and a blocking thread) forever.

mod common;

use common::{data_url, fixture_data_url, Server, Wait, MODEL};
use internvl_server::settings::ServeArgs;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// An 8-bit grey PNG of zeros, small whatever its size: the image data (a zero filter byte
/// and `width` zero pixels per row) is one fixed-Huffman deflate block of a literal zero and
/// then back-references of 258 bytes at distance 1, 13 bits each.
fn zero_png(width: u32, height: u32) -> Vec<u8> {
    let raw = (u64::from(width) + 1) * u64::from(height);
    let mut bits = BitWriter::default();
    bits.put(1, 1); // last block
    bits.put(1, 2); // fixed Huffman codes
    bits.code(0b0011_0000, 8); // literal 0
    let mut left = raw - 1;
    while left >= 258 {
        bits.code(0b1100_0101, 8); // length 258 (code 285, no extra bits)
        bits.code(0, 5); // distance 1
        left -= 258;
    }
    for _ in 0..left {
        bits.code(0b0011_0000, 8);
    }
    bits.code(0, 7); // end of block
    let mut zlib = vec![0x78, 0x01];
    zlib.extend(bits.finish());
    // Adler-32 of zeros: the first sum stays 1, the second counts the bytes.
    let adler = ((raw % 65_521) << 16 | 1) as u32;
    zlib.extend(adler.to_be_bytes());

    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8-bit grey, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &zlib), (b"IEND", &[])] {
        png.extend((data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend(kind);
        png.extend(data);
        let crc = crc32(&png[start..]);
        png.extend(crc.to_be_bytes());
    }
    png
}

/// Deflate's bit order: fields least significant bit first, Huffman codes most significant
/// bit first.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    len: u32,
}

impl BitWriter {
    fn put(&mut self, value: u64, bits: u32) {
        self.acc |= value << self.len;
        self.len += bits;
        while self.len >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.len -= 8;
        }
    }

    fn code(&mut self, code: u64, bits: u32) {
        let reversed = (0..bits).fold(0, |r, i| r << 1 | (code >> i & 1));
        self.put(reversed, bits);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.len > 0 {
            self.bytes.push(self.acc as u8);
        }
        self.bytes
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

impl Server {
    /// A server on 127.0.0.1 with a small KV cache, `edit`ed, once its model has loaded;
    /// dropped, it shuts down.
    async fn start(edit: impl FnOnce(&mut ServeArgs)) -> Server {
        let mut args = common::demo_args();
        edit(&mut args);
        // Generous, so that only a request that never ends fails on it.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Server::spawn_and_wait(args, client, Wait::Healthy).await
    }

    async fn chat(&self, image_url: &str) -> (u16, Value) {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": "describe"}
            ]}],
            "max_tokens": 4,
            "temperature": 0
        });
        let r = self
            .client
            .post(self.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the server answers");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A normal image chat still succeeds.
    async fn still_answers(&self) {
        let url = fixture_data_url("model-a.png", "image/png");
        let (status, body) = self.chat(&url).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    }
}

fn assert_invalid_messages(status: u16, body: &Value, needle: &str) {
    assert_eq!(status, 400, "{body}");
    let error = &body["error"];
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["param"], "messages", "{body}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message}");
}

#[tokio::test]
async fn one_pixel_wide_or_high_pngs_are_a_400_and_the_server_lives_on() {
    let s = Server::start(|_| {}).await;
    // The same construction at an ordinary size is a valid image the server answers about.
    let (status, body) = s.chat(&data_url("image/png", &zero_png(300, 200))).await;
    assert_eq!(status, 200, "{body}");
    for (width, height) in [(1u32, 50_000_000u32), (50_000_000, 1)] {
        let url = data_url("image/png", &zero_png(width, height));
        let (status, body) = s.chat(&url).await;
        assert_invalid_messages(
            status,
            &body,
            &format!("PNG image is {width}x{height} pixels, too narrow or flat to resize"),
        );
        s.still_answers().await;
    }
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_fifo_under_the_local_image_dir_is_a_400_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    mkfifo(&fifo);
    let s = Server::start(|a| {
        a.local_image_dir = Some(dir.path().to_owned());
        a.image_fetch_timeout = Some(5);
    })
    .await;
    let url = reqwest::Url::from_file_path(&fifo).unwrap().to_string();
    let (status, body) = s.chat(&url).await;
    assert_invalid_messages(status, &body, "not a regular file");
    s.still_answers().await;
}
