"""What ``Allocator.stats()`` returns, typed (``PackStats``, one pack, is in ``_packs``)."""

from __future__ import annotations

from typing import TypedDict

from execmem._packs import PackStats


class Totals(TypedDict):
    packs: int
    reserved_bytes: int
    capacity_bytes: int
    live_bytes: int
    free_bytes: int
    quarantined_bytes: int
    unfilled_bytes: int


class Epochs(TypedDict):
    started: int
    completed: int
    forced: int


class AllocatorStats(TypedDict):
    """What ``Allocator.stats()`` returns."""

    arch: str
    mode: str
    granularity: int
    pack_size: int
    write_unit: int
    keep_empty: int
    quarantine: bool
    closed: bool
    packs: list[PackStats]
    totals: Totals
    #: Texts by state name; "FREED" counts frees, the others texts now in that state.
    texts: dict[str, int]
    epochs: Epochs
    steps: dict[str, int]
    recipes: dict[str, int]
    events: dict[str, int]
    #: Data regions (``jit_data_alloc``): packs, reserved_bytes, regions, live_bytes.
    data: dict[str, int]
    backend: dict[str, object]
    #: Per debug sink (``execmem.debuginfo``): where it writes, how much, whether on.
    debuginfo: dict[str, object]


__all__ = ["AllocatorStats", "Epochs", "Totals"]
