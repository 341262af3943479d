"""Placement near an address (``near=``): windows of reach and free gaps (pure).

A JIT calls into its runtime with direct calls (x86-64 ``call rel32``, arm64 ``BL``,
riscv64 ``AUIPC+JALR``), which reach ``ArchSpec.branch_reach`` bytes either way.
``jit_text_alloc(size, near=ADDRESS)`` must therefore put the whole text inside
:func:`reach_window` of ADDRESS: an existing pack is used when its whole slot lies
in the window (``PackPool``), else a backend reserves a new one there, choosing a
free gap with :func:`find_gap` (natively from ``/proc/self/maps``).  The same holds
for data regions (``jit_data_alloc``), reached by PC-relative loads of the same or
longer reach (x86-64 RIP-relative disp32, arm64 ADRP: the branch reach is the
smaller one, so it is the one used).
"""

from __future__ import annotations

from collections.abc import Iterable

from execmem import _checks
from execmem._backend import Range
from execmem._errors import OutOfBoundsError, UnsupportedError

#: ``[low, high)``: where every byte of a placement must lie.
Window = tuple[int, int]


def reach_window(near: int, reach: int, *, limit: int = 1 << 64) -> Window:
    """Addresses a direct call at ``near`` reaches and that reach ``near`` back."""
    return max(0, near - reach), min(limit, near + reach + 1)


def window_near(near: object, reach: int, arch: str) -> Window | None:
    """The window of ``near=`` (``None`` stays ``None``), checked."""
    if near is None:
        return None
    address = _checks.integer("near", near)
    if not 0 <= address < 1 << 64:
        raise OutOfBoundsError(f"near={address:#x} is not an address")
    if reach <= 0:
        raise UnsupportedError(f"{arch} declares no direct-branch reach: near= cannot be honoured")
    return reach_window(address, reach)


def middle(window: Window) -> int:
    """The address a window was made around (``near``)."""
    return (window[0] + window[1]) // 2


def intersect(a: Window, b: Window) -> Window | None:
    low, high = max(a[0], b[0]), min(a[1], b[1])
    return (low, high) if low < high else None


def inside(window: Window | None, start: int, size: int) -> bool:
    """Whether ``[start, start+size)`` lies in ``window`` (``None``: anywhere)."""
    return window is None or (window[0] <= start and start + size <= window[1])


def gaps(occupied: Iterable[Range], window: Window) -> list[Range]:
    """The free ranges of ``window`` between the ``occupied`` ``(start, size)`` ranges."""
    out: list[Range] = []
    at, high = window
    for start, size in sorted(occupied):
        if start + size <= at:
            continue
        if start >= high:
            break
        if start > at:
            out.append((at, start - at))
        at = max(at, start + size)
    if at < high:
        out.append((at, high - at))
    return out


def find_gap(occupied: Iterable[Range], size: int, align: int, window: Window, *, toward: int | None = None) -> int | None:
    """An ``align``-aligned start of ``size`` free bytes inside ``window``, the one
    closest to ``toward`` (default: the window's middle, the address asked to be near,
    so later placements keep room on both sides); ``None`` if there is none."""
    target = middle(window) if toward is None else toward
    best: int | None = None
    for start, length in gaps(occupied, window):
        first = -(-start // align) * align
        last = (start + length - size) // align * align
        if first > last:
            continue
        candidate = min(max(target - target % align, first), last)
        if best is None or abs(candidate - target) < abs(best - target):
            best = candidate
    return best


__all__ = ["Window", "find_gap", "gaps", "inside", "intersect", "middle", "reach_window", "window_near"]
