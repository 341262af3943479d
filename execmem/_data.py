"""Data regions: :class:`JitData`, read+write memory that is never executable.

A JIT keeps constants, jump tables and inline-cache slots next to its code, where
PC-relative loads reach them (x86-64 RIP-relative, arm64 ADR/ADRP/LDR literal).
They do not belong in executable memory: writing them would need the publish
recipe, and code pages that are also data invite W^X exceptions.  A data region
comes instead from ``Backend.reserve_data``: anonymous read+write pages, never
mapped executable by anything, placed in the reach of the allocator's packs (every
pack's whole slot, ``_placement``; an empty first pack is reserved if there is none,
unless ``keep_empty=0`` forbids an empty pack) or of ``near``.

The pages are carved like packs: ``DATA_PACK`` bytes in ``DATA_GRANULARITY``-byte
chunks (a ``ChunkMap``); a region larger than half a data pack, or aligned beyond
a page, gets its own pages.  A region is zero-filled when it is handed out.  A free
needs no synchronization and no quarantine (no CPU fetches instructions from data):
its chunks are free at once, and an empty data pack beyond the first goes back to
the system.  Allocation and free run under the allocator's lock with an undo like
the text verbs (``_interrupts``): the chunk map is restored, the handle made
unusable (or usable again).  A write is one backend call (one ``memmove`` natively).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from execmem import _checks
from execmem._backend import Backend, Reservation
from execmem._chunks import ChunkMap
from execmem._errors import ExecmemError, OutOfBoundsError, OutOfMemoryError, UseAfterFreeError
from execmem._interrupts import uninterrupted
from execmem._placement import Window, inside, intersect, reach_window, window_near

if TYPE_CHECKING:
    from execmem._allocator import Allocator

#: Bytes of one data pack, and of its chunks.
DATA_PACK = 64 << 10
DATA_GRANULARITY = 16


@dataclass(eq=False)
class DataPack:
    reservation: Reservation
    chunks: ChunkMap
    dedicated: bool


class JitData:
    """Read+write memory that is never executable, in reach of the code (see ``_data``)."""

    __slots__ = ("_allocator", "_chunk", "_freed", "_pack", "address", "size")

    def __init__(self, allocator: Allocator, pack: DataPack, chunk: int, address: int, size: int) -> None:
        self._allocator = allocator
        self._pack = pack
        self._chunk = chunk
        self._freed = False
        #: Where the region starts (fixed; read+write, never executable).
        self.address = address
        #: The size asked for.
        self.size = size

    def _live(self, verb: str) -> None:
        if self._freed:
            raise UseAfterFreeError(f"{verb}: the data region at {self.address:#x} has been freed")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` (a plain store: no synchronization is needed)."""
        payload = _checks.data(data)
        off = _checks.integer("offset", offset)
        if off < 0 or off + len(payload) > self.size:
            raise OutOfBoundsError(
                f"[{off:#x}, {off + len(payload):#x}) is outside the data region of {self.size:#x} bytes at {self.address:#x}"
            )
        with self._allocator._lock:
            self._allocator._begin()
            self._live("write")
            if payload:
                self._allocator.backend.write(self._pack.reservation, self._offset + off, payload)

    def read(self) -> bytes:
        """The region's current bytes (code may have stored into it)."""
        with self._allocator._lock:
            self._allocator._begin()
            self._live("read")
            return self._allocator.backend.read_data(self._pack.reservation, self._offset, self.size)

    def free(self) -> None:
        """Give the region back (at once: no epoch, no instruction synchronization)."""
        a = self._allocator
        with a._lock:
            a._begin()
            self._live("free")
            pool = a._data
            a._undo = [partial(pool.unfree, self, self._pack.chunks.snapshot())]
            try:
                self._pack.chunks.release(self._chunk)
                pool.regions.discard(self)
                self._freed = True
            except BaseException:
                a._rollback()
                raise
            a._undo = ()
            pool.trim(self._pack)

    @property
    def _offset(self) -> int:
        return self.address - self._pack.reservation.address

    def __enter__(self) -> JitData:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._freed:
            self.free()

    def __repr__(self) -> str:
        state = "freed" if self._freed else "live"
        return f"<JitData {state} at {self.address:#x}, {self.size} bytes>"


class DataPool:
    """The data packs of one allocator."""

    def __init__(self, backend: Backend, pack_size: int) -> None:
        self.backend = backend
        #: ``DATA_PACK``, or the allocator's pack size when smaller (the modeled machine).
        self.pack_size = max(min(DATA_PACK, pack_size), backend.page_size)
        self.packs: list[DataPack] = []
        self.regions: set[JitData] = set()

    def place(self, size: int, align: int, window: Window | None) -> tuple[DataPack, int]:
        """A data pack and first chunk for ``size`` bytes at ``align`` (nothing taken)."""
        count = -(-size // DATA_GRANULARITY)
        if size > self.pack_size // 2 or align > self.backend.page_size:
            return uninterrupted(self._new, count * DATA_GRANULARITY, align, window, True), 0
        step = max(1, align // DATA_GRANULARITY)
        for pack in self.packs:
            res = pack.reservation
            if pack.dedicated or not inside(window, res.address, res.size):
                continue
            index = pack.chunks.find(count, step)
            if index is not None:
                return pack, index
        pack = uninterrupted(self._new, self.pack_size, self.backend.page_size, window, False)
        return pack, 0

    def _new(self, size: int, align: int, window: Window | None, dedicated: bool) -> DataPack:
        res = self.backend.reserve_data(size, align, window)
        if not inside(window, res.address, res.size):
            self.backend.release(res)
            raise OutOfMemoryError(f"the {self.backend.mode} backend placed a data region outside the window")
        pack = DataPack(res, ChunkMap(res.size // DATA_GRANULARITY), dedicated)
        self.packs.append(pack)
        return pack

    def unfree(self, data: JitData, snapshot: tuple[object, ...]) -> None:
        """Undo of a free: the chunks taken again, the handle usable."""
        data._pack.chunks.restore(snapshot)
        data._freed = False
        self.regions.add(data)

    def untake(self, data: list[JitData], pack: DataPack, snapshot: tuple[object, ...]) -> None:
        """Undo of an allocation: the chunk map back, the handle unusable."""
        pack.chunks.restore(snapshot)
        for region in data:
            region._freed = True
            self.regions.discard(region)

    def trim(self, pack: DataPack) -> None:
        """Return an empty data pack to the system unless it is the last one (hysteresis)."""
        if not pack.chunks.empty or (not pack.dedicated and sum(not p.dedicated for p in self.packs) <= 1):
            return
        with contextlib.suppress(ExecmemError):  # kept: released at close instead
            uninterrupted(self._release, pack)

    def _release(self, pack: DataPack) -> None:
        self.packs.remove(pack)
        self.backend.release(pack.reservation)

    def close(self) -> ExecmemError | None:
        first: ExecmemError | None = None
        for region in self.regions:
            region._freed = True
        self.regions.clear()
        for pack in self.packs:
            try:
                self.backend.release(pack.reservation)
            except ExecmemError as exc:
                first = first or exc
        self.packs.clear()
        return first

    def totals(self) -> dict[str, int]:
        return {
            "packs": len(self.packs),
            "reserved_bytes": sum(p.reservation.size for p in self.packs),
            "regions": len(self.regions),
            "live_bytes": sum(r.size for r in self.regions),
        }


def code_window(allocator: Allocator) -> Window | None:
    """Where every byte is in reach of every pack's whole slot (a first pack is
    reserved if there is none: the texts to come go next to it)."""
    reach = allocator.arch.branch_reach
    allocator._pool.anchor()
    window: Window | None = None
    for pack in allocator._pool.packs:
        res = pack.reservation
        here = intersect(reach_window(res.address, reach), reach_window(res.address + res.capacity - 1, reach))
        window = here if window is None or here is None else intersect(window, here)
        if window is None:
            raise OutOfMemoryError(
                "the allocator's packs lie further apart than one branch reach: no data region reaches them all; "
                "pass near= to say which code it serves"
            )
    return window


def jit_data_alloc(allocator: Allocator, size: object, near: object, align: object) -> JitData:
    """See :meth:`execmem.Allocator.jit_data_alloc`."""
    nbytes = _checks.positive_size(size)
    alignment = _checks.alignment(align)
    spec = allocator.arch
    window = window_near(near, spec.branch_reach, spec.name)
    with allocator._lock:
        allocator._begin()
        if window is None and spec.branch_reach:
            window = code_window(allocator)
        pool = allocator._data
        pack, chunk = pool.place(nbytes, max(alignment, DATA_GRANULARITY), window)  # housekeeping only
        res = pack.reservation
        data = JitData(allocator, pack, chunk, res.address + chunk * DATA_GRANULARITY, nbytes)
        count = -(-nbytes // DATA_GRANULARITY)
        allocator._undo = [partial(pool.untake, [data], pack, pack.chunks.snapshot())]
        try:
            allocator.backend.write(res, chunk * DATA_GRANULARITY, bytes(count * DATA_GRANULARITY))
            pack.chunks.take(chunk, count)
            pool.regions.add(data)
        except BaseException:
            allocator._rollback()
            raise
        allocator._undo = ()
        return data


__all__ = ["DATA_GRANULARITY", "DATA_PACK", "DataPool", "JitData", "code_window", "jit_data_alloc"]
