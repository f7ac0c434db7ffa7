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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_mapped_file_is_found_by_its_whole_path(tmp_path):
    from ragrt.runtime.madvise import file_regions
    path = tmp_path / "a name with spaces.bin"
    path.write_bytes(b"x" * mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        regions = file_regions(path)
        assert [end - start for start, end in regions] == [mmap.PAGESIZE] and mapped[:1] == b"x"
        assert not hugepages.anonymous_regions() & set(regions)          # a file is not anonymous memory
    assert file_regions(path) == []
