"""Starting the real server (uvicorn on a free loopback port) inside a test process."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import httpx

from engine.server import background


@contextmanager
def running_server(app, *, headers: dict | None = None) -> Iterator[str]:
    """Yields the base URL once /readyz answers 200."""
    with background(app) as base:
        wait_ready(base, headers=headers)
        yield base


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
