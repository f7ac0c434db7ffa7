"""A short run of benchmarks/load.py: concurrent clients against the real server, with and without batching."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("max_batch", [8, 1], ids=["batched", "unbatched"])
def test_short_load_has_no_errors(tiny_bundle, max_batch):
    from load import measure
    r = measure(str(tiny_bundle), max_batch=max_batch, clients=6, duration_s=3, max_new_tokens=16, threads=1)
    assert r.errors == 0
    assert r.requests >= 6 and r.answers_per_s > 0
    assert 0 < r.p50_ms <= r.p99_ms
