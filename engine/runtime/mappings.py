"""This process's memory mappings, read from /proc/self/maps (Linux; elsewhere there are none).

Parsed by hand: psutil, the well-kept reader of it, is not a runtime dependency, and its
`memory_maps` leaves out the inode that tells anonymous memory from a file.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    start: int                     # address
    end: int                       # address, exclusive
    perms: str                     # "rw-p", "r--s", ...
    inode: int                     # 0 for anonymous memory
    path: str                      # a file, "[heap]", "[stack]", ... or "" for anonymous memory


def mappings() -> list[Mapping]:
    """Every mapping of this process, in address order; [] where /proc/self/maps cannot be read."""
    if not sys.platform.startswith("linux"):     # another OS's /proc, if any, is laid out otherwise
        return []
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                # address perms offset dev inode [path]; a path may hold spaces
                fields = line.rstrip("\n").split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append(Mapping(start, end, fields[1], int(fields[4]), fields[5] if len(fields) == 6 else ""))
    except OSError:
        return []
    return found
