"""What `ragrt serve` is told: its settings, and the API key it reads from a file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragrt.errors import UserInputError
from ragrt.options import PASSAGE_KV_CACHE_MB


@dataclass(frozen=True)
class ServerConfig:
    bundle: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    api_key_file: str | None = None
    max_batch: int = 8             # rows decoding together; 1 turns micro-batching off
    max_queue: int = 64            # requests waiting beyond the batch; more get 429
    timeout_s: float = 120.0       # every request's deadline; also the graceful-shutdown limit
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    device: str = "auto"
    threads: int = 0
    passage_kv_cache_mb: int = PASSAGE_KV_CACHE_MB   # passage KV kept for reuse across requests
    web: bool = True               # the web page at /
    log_level: str = "warning"


def read_api_key(path: str) -> str:
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--api-key-file {path}: cannot read it ({e})") from None
    if not key or any(c.isspace() for c in key):
        raise UserInputError(f"--api-key-file {path}: must hold one key without spaces")
    return key
