"""Soak: the real `ragrt serve` process under concurrent clients sending a mix of valid and
invalid requests for a bounded time. No 5xx, no crash, and resident memory settles.

RAGRT_SOAK_SECONDS sets the measured phase (default 120 s); the figures are printed and
written to $RAGRT_SOAK_REPORT when set."""
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from serving import wait_ready

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
WARMUP_S = 20


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VALID = [
    ("POST", "/v1/ask", {"question": "How do I copy a list?", "max_new_tokens": 8}),
    ("POST", "/v1/ask", {"question": "What does the json module do?", "k": 2, "mode": "token", "max_new_tokens": 6}),
    ("POST", "/v1/ask", {"question": "Explain the GIL", "max_new_tokens": 6, "stream": True}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "copy a list"}], "max_tokens": 6}),
    ("POST", "/v1/retrieve", {"query": "json", "k": 3}),
    ("POST", "/v1/embed", {"texts": ["one", "two"]}),
    ("GET", "/healthz", None),
    ("GET", "/metrics", None),
]
INVALID = [
    ("POST", "/v1/ask", b"{not json"),
    ("POST", "/v1/ask", {"question": 42}),
    ("POST", "/v1/ask", {"question": "   "}),
    ("POST", "/v1/ask", {"question": "x", "k": 10_000}),
    ("POST", "/v1/ask", {"question": "x", "max_new_tokens": -1}),
    ("POST", "/v1/ask", {"question": "a\x00b\x07c" * 50, "max_new_tokens": 2}),
    ("POST", "/v1/ask", {"question": "word " * 5000, "max_new_tokens": 2}),
    ("POST", "/v1/retrieve", {"query": ""}),
    ("POST", "/v1/embed", {"texts": "not a list"}),
    ("POST", "/v1/chat/completions", {"messages": []}),
    ("POST", "/v1/ask", b"\xff\xfe invalid utf-8"),
    ("POST", "/v1/ask", b"{" + b" " * (2 << 20) + b"}"),
    ("GET", "/v1/nowhere", None),
]


def client(base: str, stop: float, seed: int, out: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as http:
        while time.monotonic() < stop:
            method, path, body = rng.choice(VALID if rng.random() < 0.6 else INVALID)
            t0 = time.perf_counter()
            try:
                if isinstance(body, bytes):
                    r = http.request(method, path, content=body, headers={"content-type": "application/json"})
                else:
                    r = http.request(method, path, json=body)
                status = r.status_code
            except httpx.TransportError as e:
                status = f"transport:{type(e).__name__}"
            with lock:
                out.append((time.monotonic(), status, (time.perf_counter() - t0) * 1e3))


@pytest.mark.parametrize("server", ["plain", pytest.param("ray", marks=pytest.mark.ray)])
def test_soak(tiny_bundle, tmp_path, server):
    """`ray`: `ragrt serve --ray --replicas 2`, a local Ray cluster; its replicas are Ray's
    worker processes, so the server's RSS is not the one process's and is not checked."""
    if server == "ray":
        pytest.importorskip("ray", reason="the ray extra is not installed")
    seconds = float(os.environ.get("RAGRT_SOAK_SECONDS", "120"))
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    on_ray = ["--ray", "--replicas", "2"] if server == "ray" else []
    proc = subprocess.Popen([sys.executable, "-m", "ragrt", "serve", "--bundle", str(tiny_bundle),
                             "--port", str(port), "--threads", "1", *on_ray], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=300)
        results: list = []
        lock = threading.Lock()
        start = time.monotonic()
        stop = start + WARMUP_S + seconds
        threads = [threading.Thread(target=client, args=(base, stop, i, results, lock)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(WARMUP_S)
        rss_warm = rss_kb(proc.pid)
        for t in threads:
            t.join()
        rss_end = rss_kb(proc.pid)
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    measured = [(s, ms) for t, s, ms in results if t >= start + WARMUP_S]
    classes = Counter(s if isinstance(s, str) else f"{s // 100}xx" for s, _ in measured)
    codes = Counter(s for s, _ in measured)
    latencies = sorted(ms for _, ms in measured)
    report = {"server": server, "seconds": seconds, "clients": CLIENTS, "requests": len(measured),
              "by_class": dict(classes), "by_status": {str(k): v for k, v in codes.items()},
              "p50_ms": round(latencies[len(latencies) // 2], 1),
              "p99_ms": round(latencies[int(len(latencies) * 0.99)], 1),
              "rss_warm_mb": round(rss_warm / 1024, 1), "rss_end_mb": round(rss_end / 1024, 1),
              "rss_growth": round(rss_end / rss_warm - 1, 4), "exit_code": proc.returncode}
    print(json.dumps(report))
    if os.environ.get("RAGRT_SOAK_REPORT"):
        Path(os.environ["RAGRT_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
    server_log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in server_log, server_log[-2000:]
    assert classes.get("5xx", 0) == 0 and not any(k.startswith("transport") for k in classes), report
    assert classes.get("2xx", 0) > 0 and classes.get("4xx", 0) > 0, report
    if server == "plain":
        assert report["rss_growth"] < 0.10, report
