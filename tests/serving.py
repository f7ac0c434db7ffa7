"""Starting the real server (uvicorn on a loopback socket) inside a test process."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx


@contextmanager
def running_server(app, *, headers: dict | None = None) -> Iterator[str]:
    """Serves `app` on a free loopback port until the block ends; yields the base URL once ready."""
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))      # bound before uvicorn starts, so no other process can take the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_ready(base, headers=headers)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def wait_ready(base: str, *, headers: dict | None = None, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{base}/readyz", headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} was not ready within {timeout} s")
