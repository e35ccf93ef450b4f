#!/usr/bin/env bash
# The quick start: builds the server, serves the bundled demo checkpoint (random weights) and
# asks it about an image, then keeps serving on http://127.0.0.1:$PORT until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8000}"
bash scripts/install-deps.sh
cargo build --release -p internvl-server
./target/release/internvl serve --port "$PORT" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 0.2
done
image=$(base64 -w0 tests/fixtures/images/model-a.png)
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" -d @- <<JSON
{"model": "demo-internvl",
 "messages": [{"role": "user", "content": [
   {"type": "image_url", "image_url": {"url": "data:image/png;base64,$image"}},
   {"type": "text", "text": "请描述这张图片"}]}],
 "max_tokens": 32}
JSON
echo
echo "The server keeps running on http://127.0.0.1:$PORT (Ctrl-C to stop)."
wait "$server"
