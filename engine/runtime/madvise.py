"""madvise(2) from Python: the kernel's advice calls, and random-access advice for index files.

A memory-mapped USearch index is read at random: a query walks graph nodes scattered over the
whole file. By default the kernel reads ahead around every page fault, which costs nothing
while the file sits in the page cache, but when memory is short (a small edge machine, or a
container's memory limit below the index size) each fault drags in neighbouring pages no query
asked for, and they push out the pages that were wanted. MADV_RANDOM turns readahead off for
the mapping. On the development machine, a 1M-vector index (874 MiB, expansion_search 512)
queried one at a time in a 256 MiB memory cgroup answered 7.4 queries/s with it and 0.1
without (3 queries in 30 s), the cold file read from disk each time; with memory to spare
and the file in the page cache, speed was the same either way (799-871 against 746-889
queries/s, three alternating pairs of processes).

Anywhere else (another OS, no libc) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

from ragrt.runtime.mappings import mappings

MADV_RANDOM = 1


@functools.cache
def libc_madvise():
    """libc's madvise(addr, length, advice) -> 0 or -1, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def file_regions(path) -> list[tuple[int, int]]:
    """This process's mappings of `path`, as (start, end) addresses."""
    target = os.path.realpath(path)
    return [(m.start, m.end) for m in mappings() if m.path == target]


def advise_random(path) -> int:
    """Turns off readahead on this process's mappings of `path`; returns the bytes advised."""
    madvise = libc_madvise()
    if madvise is None:
        return 0
    return sum(end - start for start, end in file_regions(path) if madvise(start, end - start, MADV_RANDOM) == 0)
