"""`ragrt serve` as users run it: a process, SIGTERM, one-line errors."""
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from serving import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_lets_in_flight_requests_finish(tiny_bundle):
    port = free_port()
    # One row at a time, so the requests below are still queued or decoding when SIGTERM lands.
    server = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--bundle", str(tiny_bundle),
                               "--port", str(port), "--max-batch", "1", "--threads", "1"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        server.kill()
        server.communicate()


def test_serve_errors_are_one_line(tmp_path, tiny_bundle):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "engine.cli", "serve", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    for out, words in [(serve("--bundle", tmp_path / "nope"), "no such bundle directory"),
                       (serve("--bundle", tiny_bundle, "--api-key-file", tmp_path / "missing"), "cannot read it"),
                       (serve("--bundle", tiny_bundle, "--max-batch", "0"), "--max-batch must be at least 1")]:
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert words in out.stderr
