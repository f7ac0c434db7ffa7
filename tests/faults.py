"""Injected I/O failures: the k-th fsync or rename raises, so a test can stop an update at every step."""
import os


def failing_at(monkeypatch, calls: list):
    """Returns set(k): from then on the k-th call to os.fsync or os.replace (counted in `calls`,
    k = 0 for none) raises OSError."""
    real = {"fsync": os.fsync, "replace": os.replace}

    def set_failure(k: int) -> None:
        def wrap(name):
            def call(*args):
                calls.append(name)
                if len(calls) == k:
                    raise OSError(f"injected failure at {name} #{k}")
                return real[name](*args)
            return call
        for name in real:
            monkeypatch.setattr(os, name, wrap(name))
    return set_failure


def failed_updates(monkeypatch, bundle, workdir, update):
    """`update(copy)` on a copy of `bundle` once whole, to count its fsyncs and renames, then
    once per step on a fresh copy with that step failing. Returns the whole run's copy, the
    step count, and an iterator of (k, copy left by the run that failed at step k)."""
    import shutil
    from pathlib import Path

    import pytest
    calls = []
    fail = failing_at(monkeypatch, calls)
    fail(0)
    whole = Path(shutil.copytree(bundle, Path(workdir) / "count"))
    update(whole)
    steps = len(calls)
    monkeypatch.undo()

    def runs():
        for k in range(1, steps + 1):
            calls.clear()
            fail(k)
            copy = Path(shutil.copytree(bundle, Path(workdir) / f"k{k}"))
            with pytest.raises(OSError, match="injected"):
                update(copy)
            monkeypatch.undo()
            yield k, copy
    return whole, steps, runs()
