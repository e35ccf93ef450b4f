#!/usr/bin/env python3
"""Soak and chaos run of `internvl serve` on the demo checkpoint (loopback only, bounded in time).

Starts the server (target/debug/internvl, or $INTERNVL_BIN, or --bin) on a free port of
127.0.0.1 with a small KV-cache pool, so that sequences get preempted, and sends mixed traffic
from concurrent clients for --minutes (default 10):

  image chats (data URLs of tests/fixtures/images/*.png), streamed and not; streams the script
  cancels at a random point; bad inputs (bad JSON, bad parameters, an oversize image, an image
  whose header claims too many pixels, an unknown model, max_tokens of 2^64-1); slow readers
  (a byte a second for a while, with a 4 KiB receive buffer); n > 1 with logprobs; long text
  answers that fill the KV pool.

It samples the server's RSS (VmRSS of /proc/PID/status) every few seconds. When the traffic
stops it reads /metrics, then opens a burst of streams, sends SIGTERM while they run and reads
them to their end.

Every request is classified:
  completed     a 200 with a whole answer: JSON with every choice, or a stream ending in
                [DONE] with a finish_reason for every choice and no error event;
  refused_4xx   an answer with a 4xx status (expected for the bad inputs; for a good request
                only 429 "queue full" is acceptable);
  server_5xx    an answer with a 5xx status, or an error event inside a 200 stream;
  cancelled     a stream the script closed itself on purpose;
  lost          everything else, for a request the script did not cancel: connection refused
                or reset, a read timing out (--read-timeout), a response cut before its headers
                or its body's end, a stream ending without [DONE] and without an error event.

The promises (each failure makes the exit status 1): 0 server_5xx; 0 lost; every bad input
refused with a 4xx; no good request refused except with 429; at least one request completed;
the KV cache empty once the traffic stops (internvl:kv_cache_usage_perc 0 and no request
running or waiting); RSS on a plateau (the mean of the last 10 % of samples at most 1.25 times
the mean of the second quarter's, plus 32 MiB; judged for runs of 3 minutes or more, shorter
ones being mostly warm-up); after SIGTERM every in-flight stream
either completed or got a clean end (an error event then [DONE]), and the server exits 0 within
--shutdown-timeout plus 30 s. Preemptions are counted and reported (a run with none did not
exercise preemption, which is reported as a failure too unless --allow-no-preemption).

Writes everything to --report (default target/soak/report.json) and prints a summary.
Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODEL_NAME = "demo-internvl"


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client over a raw socket: reads can be made one byte at a time, closing
# mid-stream is a real disconnect, and a reset or a truncated body is seen as what it is.
# ---------------------------------------------------------------------------------------------


class Lost(Exception):
    """The connection failed or the response was cut short."""


class Conn:
    def __init__(self, port: int, timeout: float, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.buf = b""
        try:
            self.sock.connect((HOST, port))
        except OSError as e:
            self.sock.close()
            raise Lost(f"connect: {e}") from e

    def send(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
        if body or method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        try:
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        except OSError as e:
            raise Lost(f"send: {e}") from e

    def _fill(self, limit: int = 65536) -> bool:
        try:
            data = self.sock.recv(limit)
        except socket.timeout as e:
            raise Lost("read timed out") from e
        except OSError as e:
            raise Lost(f"read: {e}") from e
        self.buf += data
        return bool(data)

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise Lost(f"connection closed {n - len(self.buf)} bytes early")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise Lost("connection closed mid-line")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_slowly(self, seconds: float):
        """Reads one byte a second for `seconds`, keeping what it read."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self._fill(1):
                return
            time.sleep(1.0)

    def read_head(self) -> tuple[int, dict]:
        status_line = self.read_line().decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise Lost(f"bad status line {status_line!r}")
        headers = {}
        while line := self.read_line():
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(parts[1]), headers

    def body_chunks(self, headers: dict):
        """Yields the body in pieces; raises Lost when it ends early."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = self.read_line().split(b";")[0].strip()
                try:
                    size = int(size_line, 16)
                except ValueError as e:
                    raise Lost(f"bad chunk size {size_line!r}") from e
                if size == 0:
                    while self.read_line():
                        pass
                    return
                yield self.read_exact(size)
                self.read_exact(2)
        elif "content-length" in headers:
            yield self.read_exact(int(headers["content-length"]))
        else:
            while self.buf or self._fill():
                out, self.buf = self.buf, b""
                yield out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    result: str  # completed | refused_4xx | server_5xx | cancelled | lost
    status: int | None = None
    detail: str = ""
    expected_refusal: bool = False
    seconds: float = 0.0


def chat_body(images: list[str], text: str, **params) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": text})
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], **params}


def parse_sse(events: list[str], n: int) -> tuple[str, str]:
    """(result, detail) of a finished stream's `data:` payloads."""
    if not events or events[-1] != "[DONE]":
        return "lost", f"stream ended without [DONE] after {len(events)} events"
    finished = set()
    for data in events[:-1]:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return "lost", f"unparsable event {data[:200]!r}"
        if "error" in chunk:
            return "server_5xx", f"error event: {json.dumps(chunk['error'])[:300]}"
        for choice in chunk.get("choices", []):
            if choice.get("finish_reason"):
                finished.add(choice["index"])
    if len(finished) != n:
        return "lost", f"[DONE] with {len(finished)} of {n} choices finished"
    return "completed", ""


class SseReader:
    """The `data:` payloads of an SSE body, read as far as asked."""

    def __init__(self, conn: Conn, headers: dict):
        self.chunks = conn.body_chunks(headers)
        self.pending = b""
        self.events: list[str] = []

    def read(self, stop_after: int | None = None) -> bool:
        """Reads until the body ends (True) or `stop_after` events in all were read (False)."""
        for chunk in self.chunks:
            self.pending += chunk
            while b"\n\n" in self.pending:
                block, self.pending = self.pending.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if line.startswith(b"data:"):
                        self.events.append(line[5:].strip().decode())
                if stop_after is not None and len(self.events) >= stop_after:
                    return False
        return True


class Client:
    def __init__(self, port: int, timeout: float):
        self.port = port
        self.timeout = timeout

    def post(self, kind: str, body: bytes, *, expect_refusal=False, stream=False, n=1,
             cancel_after: int | None = None, slow_seconds: float = 0.0) -> Outcome:
        start = time.monotonic()
        outcome = self._post(kind, body, expect_refusal, stream, n, cancel_after, slow_seconds)
        outcome.seconds = time.monotonic() - start
        outcome.expected_refusal = expect_refusal
        return outcome

    def _post(self, kind, body, expect_refusal, stream, n, cancel_after, slow_seconds):
        conn = None
        try:
            conn = Conn(self.port, self.timeout, rcvbuf=4096 if slow_seconds else None)
            conn.send("POST", "/v1/chat/completions", body)
            if slow_seconds:
                conn.read_slowly(slow_seconds)
            status, headers = conn.read_head()
            if status >= 500:
                text = b"".join(conn.body_chunks(headers))[:300].decode(errors="replace")
                return Outcome(kind, "server_5xx", status, text)
            if status >= 400:
                b"".join(conn.body_chunks(headers))
                return Outcome(kind, "refused_4xx", status)
            if expect_refusal:
                return Outcome(kind, "completed", status, "a bad input was accepted")
            if not stream:
                reply = json.loads(b"".join(conn.body_chunks(headers)))
                choices = reply.get("choices", [])
                if len(choices) != n or not all(c.get("finish_reason") for c in choices):
                    return Outcome(kind, "lost", status, f"incomplete reply {str(reply)[:200]}")
                return Outcome(kind, "completed", status)
            sse = SseReader(conn, headers)
            if not sse.read(cancel_after):
                return Outcome(kind, "cancelled", status, f"closed after {cancel_after} events")
            result, detail = parse_sse(sse.events, n)
            return Outcome(kind, result, status, detail)
        except Lost as e:
            return Outcome(kind, "lost", None, str(e))
        except json.JSONDecodeError as e:
            return Outcome(kind, "lost", None, f"unparsable JSON body: {e}")
        finally:
            if conn:
                conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        conn = Conn(self.port, self.timeout)
        try:
            conn.send("GET", path)
            status, headers = conn.read_head()
            return status, b"".join(conn.body_chunks(headers))
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------
# Traffic
# ---------------------------------------------------------------------------------------------


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def huge_png_header() -> bytes:
    """A PNG claiming 100,000 × 100,000 pixels: refused from its header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


class Traffic:
    """Draws one request of the mix at a time."""

    def __init__(self, rng: random.Random, image_urls: list[str], oversize_url: str):
        self.rng = rng
        self.images = image_urls
        self.oversize = oversize_url
        self.bomb = "data:image/png;base64," + base64.b64encode(huge_png_header()).decode()

    def image(self) -> str:
        return self.rng.choice(self.images)

    def next(self, client: Client) -> Outcome:
        r = self.rng
        kinds = [
            ("image_chat_stream", 20), ("image_chat", 15), ("cancelled_stream", 15),
            ("bad_input", 20), ("slow_reader", 5), ("n_logprobs", 10), ("long_text", 15),
        ]
        kind = r.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        if kind == "image_chat_stream":
            body = chat_body([self.image()], "请描述这张图片", max_tokens=r.randint(4, 48),
                             stream=True, stream_options={"include_usage": True},
                             temperature=r.choice([0, 0.8]))
            return client.post(kind, json.dumps(body).encode(), stream=True)
        if kind == "image_chat":
            images = [self.image() for _ in range(r.randint(1, 2))]
            body = chat_body(images, "What is in the picture?", max_tokens=r.randint(4, 48),
                             temperature=0)
            return client.post(kind, json.dumps(body).encode())
        if kind == "cancelled_stream":
            body = chat_body([self.image()], "Describe it.", max_tokens=200, stream=True,
                             ignore_eos=True)
            return client.post(kind, json.dumps(body).encode(), stream=True,
                               cancel_after=r.randint(0, 6))
        if kind == "slow_reader":
            body = chat_body([], "Tell me a story.", max_tokens=24, stream=True)
            return client.post(kind, json.dumps(body).encode(), stream=True,
                               slow_seconds=r.uniform(5, 15))
        if kind == "n_logprobs":
            n = r.randint(2, 4)
            body = chat_body([self.image()], "Name it.", max_tokens=r.randint(4, 24), n=n,
                             logprobs=True, top_logprobs=r.randint(1, 5), temperature=1.0,
                             seed=r.randint(0, 1000), stream=r.random() < 0.5)
            return client.post(kind, json.dumps(body).encode(), stream=body["stream"], n=n)
        if kind == "long_text":
            body = chat_body([], "Write a long essay. " * r.randint(1, 40),
                             max_tokens=r.randint(200, 1200), ignore_eos=True,
                             stream=True)
            return client.post(kind, json.dumps(body).encode(), stream=True)
        return self.bad_input(client)

    def bad_input(self, client: Client) -> Outcome:
        r = self.rng
        good = chat_body([], "hi", max_tokens=8)
        variants = {
            "bad_json": b'{"model": "demo-internvl", "messages": [',
            "not_an_object": b'[1, 2, 3]',
            "temperature": {**good, "temperature": -1},
            "top_p": {**good, "top_p": 2},
            "n_zero": {**good, "n": 0},
            "logit_bias_id": {**good, "logit_bias": {"1000000000": 5}},
            "min_over_max": {**good, "min_tokens": 50, "max_tokens": 5},
            "top_logprobs": {**good, "logprobs": True, "top_logprobs": 50},
            "max_tokens_2_64": {**good, "max_tokens": 2**64 - 1},
            "min_tokens_2_64": {**good, "min_tokens": 2**64 - 1},
            "unknown_model": {**good, "model": "x" * r.randint(1, 100_000)},
            "oversize_image": chat_body([self.oversize], "hi", max_tokens=8),
            "pixel_bomb": chat_body([self.bomb], "hi", max_tokens=8),
            "not_an_image": chat_body(["data:image/png;base64,aGVsbG8="], "hi", max_tokens=8),
            "empty_messages": {**good, "messages": []},
            "tools": {**good, "tools": [{"type": "function"}]},
        }
        name = r.choice(list(variants))
        body = variants[name]
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return client.post(f"bad_input:{name}", raw, expect_refusal=True)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def metric(text: str, name: str) -> float | None:
    """Sum of a metric's samples (all label sets) in Prometheus text."""
    values = [float(m.group(1)) for m in re.finditer(
        rf"^internvl:{name}(?:{{[^}}]*}})? ([^ \n]+)", text, re.M)]
    return sum(values) if values else None


def wait_healthy(client: Client, proc: subprocess.Popen, seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while starting")
        try:
            if client.get("/health")[0] == 200:
                return
        except (Lost, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not healthy within {seconds:.0f} s")


@dataclass
class Tally:
    outcomes: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome):
        with self.lock:
            self.outcomes.append(outcome)

    def count(self, result: str) -> int:
        return sum(o.result == result for o in self.outcomes)


def rss_summary(samples: list[tuple[float, int]], judge: bool) -> dict:
    """RSS figures; `plateau` compares the last 10 % of the samples with the second quarter
    (past the warm-up of caches and allocator arenas), None when `judge` is false."""
    values = [kib for _, kib in samples]
    if len(values) < 20:
        return {"samples": len(values), "plateau": None, "note": "too few samples to judge"}
    tenth, quarter = len(values) // 10, len(values) // 4
    baseline = values[quarter:2 * quarter]
    last = values[-tenth:]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    limit = 1.25 * mean(baseline) + 32 * 1024
    return {
        "samples": len(values),
        "min_mib": round(min(values) / 1024, 1),
        "max_mib": round(max(values) / 1024, 1),
        "first_10pct_mean_mib": round(mean(values[:tenth]) / 1024, 1),
        "25_to_50pct_mean_mib": round(mean(baseline) / 1024, 1),
        "last_10pct_mean_mib": round(mean(last) / 1024, 1),
        "plateau_limit_mib": round(limit / 1024, 1),
        "plateau": mean(last) <= limit if judge else None,
    }


def sigterm_under_load(client: Client, proc: subprocess.Popen, streams: int,
                       shutdown_timeout: float) -> dict:
    """Opens `streams` long streams, sends SIGTERM once they are under way, reads them out."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    # Released by each stream once it has its first event (or has failed): then SIGTERM.
    under_way = threading.Semaphore(0)

    def one(i: int):
        # Long enough to be running when SIGTERM comes, some past --shutdown-timeout.
        body = chat_body([], f"Count to a thousand, {i}.", max_tokens=150 * (i % 12 + 1),
                         stream=True, ignore_eos=True)
        conn = None
        signalled = False
        try:
            conn = Conn(client.port, client.timeout)
            conn.send("POST", "/v1/chat/completions", json.dumps(body).encode())
            status, headers = conn.read_head()
            if status != 200:
                outcome = Outcome("sigterm_stream", "refused_4xx" if status < 500
                                  else "server_5xx", status)
            else:
                sse = SseReader(conn, headers)
                sse.read(stop_after=1)
                under_way.release()
                signalled = True
                sse.read()
                result, detail = parse_sse(sse.events, 1)
                if result == "server_5xx" and sse.events[-1:] == ["[DONE]"]:
                    result = "clean_end"  # an error event, then [DONE]
                outcome = Outcome("sigterm_stream", result, status, detail)
        except Exception as e:  # noqa: BLE001 - a reset, a timeout or a malformed answer
            outcome = Outcome("sigterm_stream", "lost", None, f"{type(e).__name__}: {e}")
        finally:
            if conn:
                conn.close()
            if not signalled:
                under_way.release()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for _ in threads:
        under_way.acquire(timeout=120)
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # A new connection after SIGTERM must not be accepted into a request that then dies.
    try:
        code, _ = client.get("/health")
        after = f"GET /health answered {code}"
    except (Lost, OSError) as e:
        after = f"GET /health not answered ({e})"
    for t in threads:
        t.join(timeout=shutdown_timeout + 60)
    try:
        exit_code = proc.wait(timeout=shutdown_timeout + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = None
    results = {r: sum(o.result == r for o in outcomes) for r in {o.result for o in outcomes}}
    return {
        "streams": streams,
        "results": results,
        "details": [o.detail for o in outcomes if o.result not in ("completed",)][:10],
        "health_after_sigterm": after,
        "exit_code": exit_code,
        "exit_seconds": round(time.monotonic() - sent_at, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration (10)")
    parser.add_argument("--bin", default=os.environ.get("INTERNVL_BIN",
                        str(ROOT / "target/debug/internvl")), help="server binary")
    parser.add_argument("--model", default=str(ROOT / "models/demo-internvl"))
    parser.add_argument("--kv-cache-memory", default="1MiB",
                        help="the server's KV pool (1MiB: 128 blocks, one full context of the "
                        "demo model, so that concurrent requests preempt each other)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--sigterm-streams", type=int, default=12,
                        help="streams in flight when SIGTERM is sent (12)")
    parser.add_argument("--shutdown-timeout", type=int, default=30,
                        help="the server's --shutdown-timeout, seconds (30)")
    parser.add_argument("--read-timeout", type=float, default=180.0,
                        help="seconds without a byte before a request counts as lost (180)")
    parser.add_argument("--rss-interval", type=float, default=3.0, help="seconds (3)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--allow-no-preemption", action="store_true")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument for `internvl serve` (repeatable)")
    parser.add_argument("--report", default=str(ROOT / "target/soak/report.json"))
    args = parser.parse_args()

    binary = Path(args.bin)
    if not binary.is_file():
        print(f"no server binary at {binary}: build it with `cargo build -p internvl-server` "
              "or set INTERNVL_BIN", file=sys.stderr)
        return 1
    rng = random.Random(args.seed)
    pngs = sorted((ROOT / "tests/fixtures/images").glob("*.png"))
    image_urls = [data_url(p) for p in pngs]
    max_image_bytes = 1 << 20
    oversize = "data:image/png;base64," + base64.b64encode(
        pngs[0].read_bytes() + rng.randbytes(max_image_bytes)).decode()
    port = free_port()
    report_path = Path(args.report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    log_path = report_path.with_name("server.log")
    command = [str(binary), "serve", "--model", args.model, "--host", HOST, "--port", str(port),
               "--kv-cache-memory", args.kv_cache_memory,
               "--shutdown-timeout", str(args.shutdown_timeout),
               "--max-image-bytes", str(max_image_bytes), *args.server_arg]
    print("starting:", " ".join(command), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    client = Client(port, args.read_timeout)
    try:
        wait_healthy(client, proc, 300)
        _, text = client.get("/metrics")
        preemptions_before = metric(text.decode(), "num_preemptions_total") or 0.0

        rss: list[tuple[float, int]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample():
            while not stop.is_set():
                kib = rss_kib(proc.pid)
                if kib is not None:
                    rss.append((round(time.monotonic() - t0, 1), kib))
                stop.wait(args.rss_interval)

        tally = Tally()
        deadline = t0 + args.minutes * 60

        def work(i: int):
            traffic = Traffic(random.Random(args.seed * 1000 + i), image_urls, oversize)
            while time.monotonic() < deadline and proc.poll() is None:
                tally.add(traffic.next(client))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        workers = [threading.Thread(target=work, args=(i,)) for i in range(args.clients)]
        for w in workers:
            w.start()
        last_print = time.monotonic()
        while any(w.is_alive() for w in workers):
            time.sleep(1)
            if time.monotonic() - last_print >= 30:
                last_print = time.monotonic()
                with tally.lock:
                    done = len(tally.outcomes)
                    counts = {r: tally.count(r) for r in
                              ("completed", "refused_4xx", "server_5xx", "cancelled", "lost")}
                print(f"[{last_print - t0:5.0f} s] {done} requests {counts} "
                      f"rss {rss[-1][1] // 1024 if rss else '?'} MiB", flush=True)
        for w in workers:
            w.join()
        traffic_seconds = time.monotonic() - t0
        server_alive = proc.poll() is None

        # Once the traffic stops (cancelled requests are freed at the next engine step).
        kv, running, waiting, preemptions = None, None, None, None
        for _ in range(60):
            if not server_alive:
                break
            try:
                text = client.get("/metrics")[1].decode()
            except (Lost, OSError) as e:
                print(f"/metrics not answered after the traffic: {e}", file=sys.stderr)
                break
            kv = metric(text, "kv_cache_usage_perc")
            running = metric(text, "num_requests_running")
            waiting = metric(text, "num_requests_waiting")
            preemptions = (metric(text, "num_preemptions_total") or 0.0) - preemptions_before
            if kv == 0 and running == 0 and waiting == 0:
                break
            time.sleep(1)
        stop.set()
        sampler.join()

        shutdown = (sigterm_under_load(client, proc, args.sigterm_streams,
                                       args.shutdown_timeout)
                    if server_alive else {"exit_code": proc.returncode, "note": "died early"})
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    outcomes = tally.outcomes
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        kind = o.kind.split(":")[0]
        by_kind.setdefault(kind, {}).setdefault(o.result, 0)
        by_kind[kind][o.result] += 1
    bad_accepted = [o for o in outcomes if o.expected_refusal and o.result != "refused_4xx"
                    and o.result != "server_5xx" and o.result != "lost"]
    good_refused = [o for o in outcomes if not o.expected_refusal and o.result == "refused_4xx"
                    and o.status != 429]
    failures = [o for o in outcomes if o.result in ("server_5xx", "lost")]
    # Shorter runs are mostly warm-up: their RSS is reported, not judged.
    rss_stats = rss_summary(rss, judge=args.minutes >= 3)
    promises = {
        "no 5xx": tally.count("server_5xx") == 0,
        "none lost": tally.count("lost") == 0,
        "bad inputs refused with 4xx": not bad_accepted,
        "good requests refused only with 429": not good_refused,
        "requests completed": tally.count("completed") > 0,
        "server alive through the traffic": server_alive,
        "KV cache empty after the traffic": kv == 0 and running == 0 and waiting == 0,
        "RSS on a plateau": rss_stats.get("plateau") is not False,
        "preemption exercised": args.allow_no_preemption or (preemptions or 0) > 0,
        "SIGTERM: every stream completed or ended cleanly":
            set(shutdown.get("results", {})) <= {"completed", "clean_end"}
            and bool(shutdown.get("results")),
        "SIGTERM: exit code 0": shutdown.get("exit_code") == 0,
    }
    report = {
        "command": command,
        "minutes": args.minutes,
        "traffic_seconds": round(traffic_seconds, 1),
        "clients": args.clients,
        "requests_sent": len(outcomes),
        "completed": tally.count("completed"),
        "refused_4xx": tally.count("refused_4xx"),
        "refused_429": sum(o.status == 429 for o in outcomes),
        "server_5xx": tally.count("server_5xx"),
        "cancelled_by_client": tally.count("cancelled"),
        "lost": tally.count("lost"),
        "by_kind": by_kind,
        "statuses": {str(code): sum(o.status == code for o in outcomes)
                     for code in sorted({o.status for o in outcomes}, key=str)},
        "definitions": {
            "completed": "200 with a whole answer: JSON with every choice finished, or a "
                         "stream ending in [DONE] with every choice finished, no error event",
            "refused_4xx": "an answer with a 4xx status",
            "server_5xx": "a 5xx status, or an error event inside a 200 stream",
            "cancelled_by_client": "a stream this script closed on purpose",
            "lost": "connection refused or reset, no byte for --read-timeout seconds, a "
                    "response cut before its headers or body end, or a stream ending "
                    "without [DONE] and without an error event, for a request not cancelled",
            "clean_end": "after SIGTERM: a stream ending with an error event then [DONE]",
        },
        "failures": [vars(o) for o in failures[:20]],
        "bad_inputs_accepted": [vars(o) for o in bad_accepted[:20]],
        "good_requests_refused": [vars(o) for o in good_refused[:20]],
        "after_traffic": {"kv_cache_usage_perc": kv, "num_requests_running": running,
                          "num_requests_waiting": waiting},
        "preemptions": preemptions,
        "rss": rss_stats,
        "rss_samples_kib": rss,
        "shutdown": shutdown,
        "promises": promises,
        "server_log": str(log_path),
    }
    report_path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items()
                      if k not in ("rss_samples_kib", "command")}, indent=2))
    broken = [name for name, ok in promises.items() if not ok]
    print(f"report: {report_path}")
    print("all promises kept" if not broken else f"BROKEN: {', '.join(broken)}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
