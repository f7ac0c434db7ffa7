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
