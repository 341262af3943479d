"""Resources of the native backend: large pages as the kernel reports them, and
long reserve/write/map/release churn that must keep mappings, fds and RSS bounded."""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Any

import pytest
from programs import RET, needs_programs

from execmem.native import NativeBackend, _procmaps


def S(backend: NativeBackend) -> dict[str, Any]:
    """``backend.stats()`` typed for reading nested values in assertions."""
    return dict(backend.stats())


pytestmark = needs_programs

HUGE_FIELDS = ("AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:", "Shared_Hugetlb:", "Private_Hugetlb:")


def smaps_huge_bytes(start: int, end: int) -> int:
    """Independent reading of /proc/self/smaps: large-page bytes of VMAs in [start, end)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and start < hi
            elif inside and line.startswith(HUGE_FIELDS):
                total += int(line.split()[1]) * 1024
    return total


def obtained(b: NativeBackend) -> int:
    huge = S(b)["huge_pages"]
    assert isinstance(huge, dict)
    value = huge["obtained_bytes"]
    assert isinstance(value, int)
    return value


@pytest.mark.parametrize("mode", ("dual", "mprotect", "rwx"))
def test_huge_page_report_matches_smaps(mode: str) -> None:
    with NativeBackend(mode) as b:
        r = b.reserve(4 << 20, 16)
        assert r.address % (2 << 20) == 0
        b.write(r, 0, RET)
        assert obtained(b) == 0  # nothing is executable yet
        b.map(r)
        got = obtained(b)
        assert got == smaps_huge_bytes(r.address, r.address + r.size)
        assert got % (2 << 20) == 0 and got <= r.size
        huge = S(b)["huge_pages"]
        assert isinstance(huge, dict) and huge["executable_bytes"] == r.size
        print(f"{mode}: {got >> 20} MiB of {r.size >> 20} MiB executable memory in large pages; {huge}")


def test_mprotect_write_to_mapped_page_splits_and_report_follows() -> None:
    with NativeBackend("mprotect") as b:
        r = b.reserve(2 << 20, 16)
        b.write(r, 0, RET)
        b.map(r)
        before = obtained(b)
        b.write(r, 4096, RET)  # toggles one 4 KiB page: the PMD mapping cannot stay
        after = obtained(b)
        assert after == smaps_huge_bytes(r.address, r.address + r.size)
        assert after <= before
        assert ctypes.CFUNCTYPE(None)(r.address + 4096)() is None


def test_without_huge_pages_no_pmd_alignment_is_forced() -> None:
    with NativeBackend("dual", huge_pages=False) as b:
        b.reserve(2 << 20, 16)
        huge = S(b)["huge_pages"]
        assert isinstance(huge, dict) and huge["requested"] is False
        assert "madvise" not in S(b)["syscalls"]  # no MADV_HUGEPAGE (and no alias to advise)


def _footprint() -> tuple[int, int, int]:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return _procmaps.count_vmas(), len(os.listdir("/proc/self/fd")), rss_pages * resource.getpagesize()


def _churn(mode: str, cycles: int, size: int) -> list[tuple[int, int, int]]:
    samples = []
    with NativeBackend(mode) as b:
        keep = [b.reserve(size, 16) for _ in range(4)]  # some long-lived neighbours
        for r in keep:
            b.map(r)
        for i in range(cycles):
            r = b.reserve(size, 16)
            b.write(r, (i * 64) % size, RET)
            b.map(r)
            if i % 3 == 0:
                b.unmap(r)
            b.release(r)
            if i % (cycles // 4) == 0:
                samples.append(_footprint())
        stats = b.stats()
        assert stats["reservations"] == 4
    samples.append(_footprint())
    return samples


def _assert_bounded(samples: list[tuple[int, int, int]]) -> None:
    vmas = [s[0] for s in samples]
    fds = [s[1] for s in samples]
    rss = [s[2] for s in samples]
    assert max(vmas) - min(vmas) < 50, vmas
    assert max(fds) - min(fds) <= 8, fds
    assert rss[-2] - rss[1] < 32 << 20, rss  # no per-cycle growth after warm-up


@pytest.mark.parametrize("mode", ("dual", "mprotect"))
def test_churn_quick(mode: str) -> None:
    _assert_bounded(_churn(mode, 4000, 4096))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ("dual", "mprotect"))
def test_churn_100k(mode: str) -> None:
    _assert_bounded(_churn(mode, 100_000, 4096))


@pytest.mark.slow
def test_churn_large_packs() -> None:
    _assert_bounded(_churn("dual", 2000, 2 << 20))


def _nr_hugepages() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


@pytest.mark.skipif(_nr_hugepages() < 2, reason="no hugetlb pages reserved (vm.nr_hugepages)")
def test_hugetlb_backing_when_the_system_has_huge_pages() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(2 << 20, 16)
        b.write(r, 0, RET)
        b.map(r)
        assert S(b)["huge_pages"]["hugetlb"] == "in use"
        assert obtained(b) == r.size == smaps_huge_bytes(r.address, r.address + r.size)
        ctypes.CFUNCTYPE(None)(r.address)()
