"""benchmarks/retrieval.py --memory-cap: a worker in a capped memory cgroup reads a memory-mapped
file four times the cap and stays under it; a worker that copies the same file into its own
memory is killed and reported. Skipped where no memory cgroup can be created (not root)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import CgroupError, mapped_mib, memory, memory_cgroup  # noqa: E402
from retrieval import query  # noqa: E402

CAP_MIB = 96


def _cgroups_writable() -> bool:
    try:
        with memory_cgroup(CAP_MIB):
            return True
    except CgroupError:
        return False


pytestmark = pytest.mark.skipif(not _cgroups_writable(), reason="no writable memory cgroup here")


def read_mapped(path: str) -> dict:
    data = np.load(path, mmap_mode="r")
    total = most = 0
    for start in range(0, len(data), 2**24):     # every page, noting the most resident at once
        total += int(data[start:start + 2**24].sum(dtype=np.int64))
        most = max(most, mapped_mib(path))
    return {"total": total, "memory": memory(), "mapped_peak_mib": most, "mapped_now_mib": mapped_mib(path)}


def read_private(path: str) -> dict:
    data = np.load(path)
    return {"total": int(data.sum(dtype=np.int64)), "memory": memory()}


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cap") / "data.npy"
    np.save(path, np.random.default_rng(0).integers(0, 255, size=4 * CAP_MIB * 2**20, dtype=np.uint8))
    return path


def test_a_memory_map_four_times_the_cap_is_read_whole_under_it(big_file):
    expected = int(np.load(big_file, mmap_mode="r").sum(dtype=np.int64))
    r = query(read_mapped, big_file, str(big_file), cap_mib=CAP_MIB)
    assert r["total"] == expected and r["memory_cap_mib"] == CAP_MIB
    # The process's RSS also counts shared libraries, charged to whoever loaded them first;
    # the cap bounds what it brought in itself, the file's pages among them.
    assert 0 < r["mapped_peak_mib"] < CAP_MIB
    # Dropped from the page cache first, the file came from storage, not from pages charged elsewhere.
    assert r["memory"]["disk_read_mib"] >= 0.9 * 4 * CAP_MIB


def test_a_private_copy_over_the_cap_is_killed_and_reported(big_file):
    assert query(read_private, big_file, str(big_file), cap_mib=CAP_MIB) == {
        "status": f"killed: over the {CAP_MIB} MiB memory cap"}
