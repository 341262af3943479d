"""Address ranges as ``(start, size)`` pairs, the form backends and the model report."""

from __future__ import annotations

from collections.abc import Iterable

Range = tuple[int, int]


def coalesce(ranges: Iterable[Range]) -> list[Range]:
    """Sorted ranges with overlapping or adjacent ones merged."""
    out: list[Range] = []
    for start, size in sorted(ranges):
        if out and start <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], start + size)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((start, size))
    return out


__all__ = ["Range", "coalesce"]
