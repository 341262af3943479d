"""What the kernel says this process has mapped: ``/proc/self/maps`` and ``smaps``.

The native backend reports what it *obtained*, never what it asked for, and the
tests audit W^X against the kernel's own view:

* :func:`read_maps` / :func:`count_vmas` - virtual memory areas (VMAs);
* :func:`wx_violations` - mappings that are writable *and* executable;
* :func:`smaps_totals` - per-field sums (``AnonHugePages``, ``ShmemPmdMapped``,
  ``FilePmdMapped``, ``*_Hugetlb``, ``Rss``...) over the VMAs that overlap given
  ranges: how much of the executable memory is really mapped by large pages.

Reading these files is not a system call we count: it is ordinary file I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: smaps fields whose pages are mapped at PMD level or from hugetlbfs.
HUGE_FIELDS = ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb")

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+ *(.*)$")


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/<pid>/maps``."""

    start: int
    end: int
    perms: str  # e.g. "r-xs"
    offset: int
    path: str

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    def overlaps(self, start: int, size: int) -> bool:
        return self.start < start + size and start < self.end


def parse_maps(text: str) -> list[Vma]:
    """Parse the text of a ``maps`` file (pure; tested with fixed samples)."""
    vmas = []
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            start, end, perms, offset, path = match.groups()
            vmas.append(Vma(int(start, 16), int(end, 16), perms, int(offset, 16), path.strip()))
    return vmas


def read_maps(pid: int | str = "self") -> list[Vma]:
    with open(f"/proc/{pid}/maps") as f:
        return parse_maps(f.read())


def count_vmas(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def _overlapping(vma: Vma, ranges: Sequence[tuple[int, int]] | None) -> bool:
    return ranges is None or any(vma.overlaps(start, size) for start, size in ranges)


def wx_violations(
    ranges: Sequence[tuple[int, int]] | None = None, vmas: Iterable[Vma] | None = None
) -> list[Vma]:
    """Mappings that are writable and executable at once (only those overlapping
    ``ranges`` when given: other libraries of the process may map RWX themselves)."""
    return [
        v
        for v in (read_maps() if vmas is None else vmas)
        if v.writable and v.executable and _overlapping(v, ranges)
    ]


def covered(vmas: Iterable[Vma], start: int, size: int, perm: str = "r") -> bool:
    """Whether ``[start, start+size)`` lies in VMAs that all have ``perm`` (pure)."""
    at, end = start, start + size
    for vma in sorted((v for v in vmas if v.overlaps(start, size)), key=lambda v: v.start):
        if vma.start > at or perm not in vma.perms:
            return False
        at = max(at, vma.end)
        if at >= end:
            return True
    return at >= end


def parse_smaps(text: str, ranges: Sequence[tuple[int, int]] | None = None) -> dict[str, int]:
    """Sum every ``kB`` field of the VMAs overlapping ``ranges``, in bytes (pure).

    A VMA is counted once even if several ranges overlap it; ``vmas`` says how many
    VMAs were summed.
    """
    totals: dict[str, int] = {"vmas": 0}
    counting = False
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            vma = Vma(start, end, match.group(3), int(match.group(4), 16), match.group(5))
            counting = _overlapping(vma, ranges)
            if counting:
                totals["vmas"] += 1
            continue
        if counting and line.endswith(" kB"):
            key, _, value = line.partition(":")
            totals[key] = totals.get(key, 0) + int(value.split()[0]) * 1024
    return totals


def smaps_totals(ranges: Sequence[tuple[int, int]] | None, pid: int | str = "self") -> dict[str, int]:
    """:func:`parse_smaps` of this process (nothing when ``ranges`` is empty)."""
    if ranges is not None and not ranges:
        return {"vmas": 0}
    with open(f"/proc/{pid}/smaps") as f:
        return parse_smaps(f.read(), ranges)


def huge_bytes(totals: dict[str, int]) -> int:
    """Bytes mapped by large pages according to :func:`smaps_totals`."""
    return sum(totals.get(name, 0) for name in HUGE_FIELDS)


__all__ = [
    "HUGE_FIELDS",
    "Vma",
    "count_vmas",
    "covered",
    "huge_bytes",
    "parse_maps",
    "parse_smaps",
    "read_maps",
    "smaps_totals",
    "wx_violations",
]
