"""`ragrt serve` as users run it: a process, SIGTERM, one-line errors."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from serving import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def start_server(*args, log):
    """`ragrt serve` in its own process group, so cleanup reaches its worker processes too."""
    return subprocess.Popen([sys.executable, "-m", "ragrt", "serve", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def stop_server(server) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_in_flight_requests_finish(tiny_bundle, tmp_path):
    port = free_port()
    # One row at a time, so the requests below are still queued or decoding when SIGTERM lands.
    server = start_server("--bundle", tiny_bundle, "--port", port, "--max-batch", 1, "--threads", 1,
                          log=open(tmp_path / "log", "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base)
        accepted = threading.Semaphore(0)
        results = []

        def ask(i):
            body = {"question": f"question {i} about lists", "max_new_tokens": 256, "stream": True}
            with httpx.stream("POST", f"{base}/v1/ask", json=body, timeout=120) as r:
                accepted.release()                   # headers are sent once the request is queued
                events = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
            results.append((r.status_code, events[-1] if events else None))

        clients = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for c in clients:
            c.start()
        for _ in clients:
            assert accepted.acquire(timeout=60)
        server.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(120)
        assert results == [(200, "answer")] * 12
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly.
        assert server.wait(120) in (0, -signal.SIGTERM)
    finally:
        stop_server(server)


def test_workers_each_open_the_bundle_and_share_the_port(tiny_bundle, tmp_path):
    port = free_port()
    key = tmp_path / "key"
    key.write_text("abc")
    server = start_server("--bundle", tiny_bundle, "--port", port, "--workers", 2, "--threads", 1,
                          "--api-key-file", key, log=open(tmp_path / "log", "w"))
    try:
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer abc"}
        wait_ready(base, headers=auth)
        # Ready means one worker is; the other may still be opening the bundle and say so.
        answered, deadline = 0, time.monotonic() + 120
        while answered < 4 and time.monotonic() < deadline:
            r = httpx.post(f"{base}/v1/ask", json={"question": "What is the GIL?", "max_new_tokens": 3},
                           headers=auth, timeout=60)
            if r.status_code == 503 and r.json()["error"]["type"] == "not_ready":
                time.sleep(0.2)
                continue
            assert r.status_code == 200 and r.json()["sources"]
            answered += 1
        assert answered == 4
        assert httpx.post(f"{base}/v1/ask", json={"question": "q"}, timeout=60).status_code == 401
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) in (0, -signal.SIGTERM)
    finally:
        stop_server(server)


def test_serve_errors_are_one_line(tmp_path, tiny_bundle):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "ragrt", "serve", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    for out, words in [(serve("--bundle", tmp_path / "nope"), "no such bundle directory"),
                       (serve("--bundle", tiny_bundle, "--api-key-file", tmp_path / "missing"), "cannot read it"),
                       (serve("--bundle", tiny_bundle, "--max-batch", "0"), "--max-batch must be at least 1")]:
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert words in out.stderr
