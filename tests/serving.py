"""Starting the real server (uvicorn on a free loopback port) inside a test process, and a
decoder the tests can hold back."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

from ragrt.serve.app import background


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


class GatedDecoder:
    """The real decoder, whose prefill waits for a gate: the test decides when decoding starts."""

    def __init__(self, decoder):
        self.decoder, self.gate = decoder, threading.Event()

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def prefill(self, prompts):
        self.gate.wait(60)
        return self.decoder.prefill(prompts)
