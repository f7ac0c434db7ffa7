"""Reading JSONL with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ragrt.errors import CorpusError


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Yields ("file:line", object) for each non-blank line."""
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{where}: expected a JSON object")
            yield where, obj
