"""Huge pages for session memory: the regions mapped while a session was built get advised."""
import mmap
import sys

import pytest

from ragrt.runtime import hugepages


def vm_flags(address: int) -> set[str]:
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux") or hugepages._thp_mode() == "never",
                    reason="needs Linux with transparent huge pages not set to never")
def test_memory_mapped_after_the_snapshot_is_advised():
    import ctypes
    before = hugepages.anonymous_regions()
    # Private and anonymous, as malloc maps a big block.
    later = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    later.write(b"y" * (16 << 20))                     # populated, as a session's weights are
    advised = hugepages.advise_new_regions(before)
    assert advised >= 8 << 20
    address = ctypes.addressof(ctypes.c_char.from_buffer(later)) + (8 << 20)
    assert "hg" in vm_flags(address)                  # MADV_HUGEPAGE took
    assert later[:1] == b"y" and later[-1:] == b"y"    # collapsing keeps the contents


def test_nothing_is_advised_when_no_region_is_new():
    assert hugepages.advise_new_regions(hugepages.anonymous_regions()) == 0
