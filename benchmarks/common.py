"""Shared by the benchmark scripts: memory readings, one engine per subprocess, the cache, the machine."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]

# Questions a user of the Python docs might ask; load.py and ask.py send them in turn.
QUESTIONS = [
    "How do I remove duplicates from a list while keeping the order?",
    "How do I copy a list?",
    "What is the difference between a list and a tuple?",
    "How do I read a file line by line?",
    "How can I sort a dictionary by value?",
    "What does the global interpreter lock do?",
    "How do I convert a string to a number?",
    "Why are default argument values shared between calls?",
    "How do I make a class iterable?",
    "How do I check whether a key is in a dictionary?",
    "What is a generator?",
    "How do I format a float with two decimals?",
    "How do I create a virtual environment?",
    "What is the difference between is and ==?",
    "How do I catch several exceptions in one except clause?",
    "How do I parse JSON?",
]

CACHE = Path(os.environ.get("RAGRT_BENCH_CACHE", Path.home() / ".cache" / "ragrt" / "bench"))


def memory() -> dict[str, float]:
    """This process's memory in MiB, from /proc/self/status: resident now (all, anonymous, file-backed
    pages such as memory-mapped files) and the peak (VmHWM, which is also `ru_maxrss`); and, from
    /proc/self/io, the MiB it has had read from storage (page faults on a memory map included)."""
    fields = {"VmRSS": "rss_mib", "RssAnon": "rss_anon_mib", "RssFile": "rss_file_mib", "VmHWM": "peak_rss_mib"}
    out: dict[str, float] = {}
    try:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        out["disk_read_mib"] = round(int(io["read_bytes"]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = round(int(value.split()[0]) / 1024, 1)      # kB
    except OSError:                # not Linux: the peak is all getrusage gives
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def mapped_mib(path) -> float:
    """MiB of `path` resident in this process through its memory maps (/proc/self/smaps; 0 elsewhere)."""
    target, kib, inside = str(Path(path).resolve()), 0, False
    try:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if len(head) > 1 and "-" in head[0] and ":" not in head[0]:      # a mapping's header line
                inside = len(head) == 6 and head[5] == target
            elif inside and head[0] == "Rss:":
                kib += int(head[1])
    except OSError:
        pass
    return round(kib / 1024, 1)


def in_subprocess(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh interpreter (spawned, not forked), so its peak RSS is its own.

    `fn` must be importable (a module-level function) and its arguments and result picklable.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()


class CgroupError(RuntimeError):
    pass


@contextmanager
def memory_cgroup(cap_mib: int) -> Iterator[Path]:
    """A fresh memory cgroup whose processes may hold at most `cap_mib` MiB (page cache they bring
    in included, swap excluded), removed afterwards. cgroup v2 where its memory controller is on,
    else v1; needs a writable cgroup filesystem (root, or a delegated subtree)."""
    name = f"ragrt-bench-{os.getpid()}"
    v2 = [Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")]
    root = next((r for r in v2 if "memory" in _read(r / "cgroup.controllers").split()), None)
    limits = ["memory.max", "memory.swap.max"] if root else ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    root = root or Path("/sys/fs/cgroup/memory")
    group = root / name
    try:
        group.mkdir()
    except OSError as e:
        raise CgroupError(f"cannot create a memory cgroup under {root} ({e.strerror}); "
                          "--memory-cap needs root or a delegated cgroup") from None
    try:
        (group / limits[0]).write_text(str(cap_mib * 2**20))
        if (group / limits[1]).exists():               # no swapping past the cap
            (group / limits[1]).write_text("0" if limits[1] == "memory.swap.max" else str(cap_mib * 2**20))
        yield group
    finally:
        for _ in range(50):                            # the worker may still be exiting
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def oom_kills(group: Path) -> int:
    """How many processes the kernel killed in `group` for going over its cap."""
    for f in ("memory.events", "memory.oom_control"):
        for line in _read(group / f).splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def in_cgroup(group: str, fn, *args):
    """Runs in the worker: joins `group`, then returns `fn(*args)`."""
    Path(group, "cgroup.procs").write_text(str(os.getpid()))
    return fn(*args)


def drop_page_cache(path: Path) -> None:
    """Evicts `path`'s pages from the page cache, so whoever reads them next is charged for them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)                                   # dirty pages are not evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def limit_threads(threads: int) -> None:
    """Before numpy is imported: BLAS and OpenMP use `threads` threads."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temp path beside `path` (same directory, so the rename is atomic) for the block to
    write; it replaces `path` only if the block ends without error, and is removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, array) -> None:
    import numpy as np
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def save_json(path: Path, obj) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def machine() -> dict:
    """CPU model, cores, flags that matter for the kernels, clock and memory."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        first = cpuinfo.split("\n\n")[0]
        kv = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in first.splitlines()))
        flags = set(kv.get("flags", "").split())
        info.update(cpu=kv.get("model name"), family=kv.get("cpu family"), model=kv.get("model"),
                    mhz=float(kv.get("cpu MHz", "nan")),
                    simd=[f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni")
                          if f in flags])
        mem = Path("/proc/meminfo").read_text().split("\n")[0]
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except OSError:
        info["cpu"] = platform.processor() or platform.machine()
    try:
        info["lscpu_max_mhz"] = next((float(line.split(":")[1]) for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
            if line.startswith("CPU max MHz")), None)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def wait_ready(base: str, timeout_s: float = 300) -> None:
    """Polls a ragrt server's /readyz until it answers 200 (a slow answer, on a busy machine, is polled again)."""
    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=30).status_code == 200:
                return
        except httpx.TimeoutException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not become ready")
        time.sleep(0.1)


def report(res: dict, markdown, json_path: str | None) -> int:
    """A step's command-line ending: its table on stdout, its numbers in --json."""
    print(markdown(res))
    if json_path:
        save_json(Path(json_path), res)
    return 0
