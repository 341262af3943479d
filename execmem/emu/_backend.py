"""The execmem backend protocol on a modeled machine.

``execmem.Allocator(backend=Machine(...))`` runs the same allocator core as on real
memory; every backend call becomes host actions of the machine's host CPU, which the
explorer then interleaves with guest code on the other CPUs:

* ``reserve`` takes fresh physical frames (trap-filled before anything can see them),
  a virtual range and one page-table entry per page (invalid: not mapped yet);
* ``write``/``atomic_store`` are stores through the frames' writable alias;
* ``map``/``unmap`` write the page-table entries, with the TLB maintenance of the
  machine's style (``broadcast``: TLBI IS completed by the issuer's DSB; ``ipi``:
  shootdown interrupts that each target acknowledges; ``invlpgb``: broadcast
  completed by TLBSYNC, no interrupt);
* ``run_step`` performs one recipe step: DC/IC by VA over the batch's lines,
  barriers, ISB/serialization, and ``remote_cse`` as a membarrier (an IPI to every
  other CPU, waiting for each to acknowledge).

Which model barrier implements "barrier" or "local_cse" is architecture data
(``STEP_FENCES`` in ``execmem.arch.<name>_isa``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

from execmem._backend import Range, Reservation
from execmem._errors import (
    AlignmentError,
    BadStateError,
    ModelError,
    OutOfMemoryError,
    UnsupportedError,
)
from execmem._placement import find_gap, intersect, middle
from execmem.emu._layout import DYNAMIC_BASE, DYNAMIC_LIMIT, PAGE

if TYPE_CHECKING:
    from execmem.arch import ArchSpec
    from execmem.emu._kernel import HostProgram


class ModeledMachine(Protocol):
    """What the backend adapter needs from the machine it serves (``Machine``)."""

    spec: ArchSpec
    isa: ModuleType
    idc: bool
    dic: bool
    tlb: str
    line_size: int
    #: Statically mapped pages (VA -> (PA, perms)) and every mapped range (``near=``,
    #: ``sync_code``: what is there, where it is free).
    _static: dict[int, tuple[int, str]]
    _regions: list[tuple[int, int]]

    @property
    def cpus(self) -> int: ...

    @property
    def host_actions(self) -> int: ...

    def host(self, cpu: int | None = None) -> HostProgram: ...

    def frames(self, size: int) -> int: ...

    def map_pages(self, size: int, *, align: int = PAGE, at: int | None = None) -> tuple[int, int]: ...

    def poke(self, va: int, data: bytes) -> None: ...


@dataclass
class _Frames:
    """Backend-private part of an emulated reservation."""

    alias: int  # physical address of the first frame == its writable alias VA
    pages: tuple[int, ...]  # virtual pages
    released: bool = False
    data: bool = False  # a data region (``reserve_data``): its entries are never executable


class EmulatedBackend:
    """Mixin giving :class:`~execmem.emu.Machine` the execmem ``Backend`` interface."""

    mode = "emulated"
    page_size = PAGE
    write_unit = 1
    #: Stores are single-copy atomic in the model and pages never lose execute permission.
    concurrent_patch_safe = True
    #: The code runs on the modeled CPUs (``Machine.call``), not in this process.
    callable_in_process = False
    #: One reservation may take the whole dynamic address range.
    max_reservation = DYNAMIC_LIMIT - DYNAMIC_BASE

    def __init__(self, machine: ModeledMachine) -> None:
        self._m = machine
        self._reservations: list[Reservation] = []
        self._counts: Counter[str] = Counter()

    # Backend attributes ------------------------------------------------------
    @property
    def arch(self) -> ArchSpec:
        return self._m.spec

    @property
    def cache_features(self) -> frozenset[str]:
        m = self._m
        return frozenset(name for name, on in (("idc", m.idc or m.dic), ("dic", m.dic)) if on)

    def _host(self) -> HostProgram:
        return self._m.host()

    def _fences(self, what: str) -> None:
        host = self._host()
        for name in self._m.isa.STEP_FENCES[what]:
            host.fence(name, note=f"{what}: {name}")

    # Reservations -------------------------------------------------------------
    def reserve(self, size: int, align: int, capacity: int | None = None, *, window: Range | None = None) -> Reservation:
        """The whole ``capacity`` at once: the model's frames cost nothing, and a
        reservation that never grows keeps the modeled page tables simple.  With a
        ``window``, the free place of the dynamic range nearest its middle."""
        m = self._m
        if size <= 0 or align <= 0 or align & (align - 1):
            raise AlignmentError("reserve needs a positive size and a power-of-two alignment")
        size = max(size, capacity or 0)
        size += -size % PAGE
        at = None if window is None else self._in_window(size, max(align, PAGE), window)
        va, _ = m.map_pages(size, align=align, at=at)
        alias = m.frames(size)
        pages = tuple(range(va, va + size, PAGE))
        # Fresh frames: nothing can observe them before they are mapped, so the trap
        # fill is their initial content (the kernel fills pages while they are private).
        m.poke(alias, self.arch.trap_bytes(size))
        res = Reservation(va, size, mapped=False, token=_Frames(alias, pages))
        self._reservations.append(res)
        self._counts["reserve"] += 1
        return res

    def _in_window(self, size: int, align: int, window: Range) -> int:
        """A free place in ``window`` with a guard page on either side."""
        taken = [(start - PAGE, length + 2 * PAGE) for start, length in self._m._regions]
        bounds = intersect(window, (DYNAMIC_BASE, DYNAMIC_LIMIT))
        va = None if bounds is None else find_gap(taken, size, align, bounds, toward=middle(window))
        if va is None:
            raise OutOfMemoryError(
                f"no free {size:#x} bytes of the modeled machine's dynamic range "
                f"[{DYNAMIC_BASE:#x}, {DYNAMIC_LIMIT:#x}) lie in [{window[0]:#x}, {window[1]:#x})"
            )
        return va

    def reserve_data(self, size: int, align: int, window: Range | None = None) -> Reservation:
        """Frames mapped read+write (never executable) by page-table entries the host
        CPU writes, zero-filled before anything can see them."""
        res = self.reserve(size, align, window=window)
        frames = self._frames(res)
        self._m.poke(frames.alias, bytes(res.size))
        host = self._host()
        for i, page in enumerate(frames.pages):
            host.pte(page, frames.alias + i * PAGE, "rw", note=f"map data {page:#x} rw-")
        self._fences("after_map")
        res.mapped = True  # readable; the allocator never maps a data region
        frames.data = True
        self._counts["reserve_data"] += 1
        return res

    def read_data(self, reservation: Reservation, offset: int, size: int) -> bytes:
        raise UnsupportedError(
            "a modeled data region's bytes depend on the schedule: read them from a state, "
            "machine.read(state, address, size)"
        )

    def grow(self, reservation: Reservation, size: int) -> bool:
        """Reservations get their capacity at once: growing is never needed."""
        self._frames(reservation)
        return size <= reservation.size

    def _frames(self, res: Reservation) -> _Frames:
        token = res.token
        if not isinstance(token, _Frames) or token.released:
            raise BadStateError("reservation is not live on this machine")
        return token

    def map(self, reservation: Reservation) -> None:
        frames = self._frames(reservation)
        if frames.data:
            raise BadStateError(f"the data region at {reservation.address:#x} is never made executable")
        host = self._host()
        for i, page in enumerate(frames.pages):
            host.pte(page, frames.alias + i * PAGE, "rx", note=f"map {page:#x} r-x")
        self._fences("after_map")
        reservation.mapped = True
        self._counts["map"] += 1

    def unmap(self, reservation: Reservation) -> None:
        m = self._m
        frames = self._frames(reservation)
        host = self._host()
        for page in frames.pages:
            host.pte(page, None, note=f"unmap {page:#x}")
        if m.tlb == "ipi":
            for page in frames.pages:
                host.tlbi(page, "local", note=f"invlpg {page:#x}")
            host.ipi(host.others(), "tlb", -1, note="TLB shootdown IPI")
            host.wait(note="wait for shootdown acknowledgements")
        else:
            self._fences("before_tlbi")
            for page in frames.pages:
                host.tlbi(page, "broadcast", note=f"broadcast TLBI {page:#x}")
            self._fences("complete_tlbi")
        reservation.mapped = False
        self._counts["unmap"] += 1

    def release(self, reservation: Reservation) -> None:
        frames = self._frames(reservation)
        frames.released = True
        self._counts["release"] += 1

    # Writes ---------------------------------------------------------------------
    def write(self, reservation: Reservation, offset: int, data: bytes) -> None:
        frames = self._frames(reservation)
        if offset < 0 or offset + len(data) > reservation.size:
            raise ModelError("write outside the reservation")
        host = self._host()
        word = 8
        addr = frames.alias + offset
        end = addr + len(data)
        while addr < end:
            n = min(word - addr % word, end - addr)
            start = addr - frames.alias - offset
            host.store(addr, bytes(data[start : start + n]), n, note=f"write {addr:#x}")
            addr += n
        self._counts["write"] += 1

    def atomic_store(self, reservation: Reservation, offset: int, data: bytes) -> None:
        frames = self._frames(reservation)
        if len(data) not in (1, 2, 4, 8) or offset % len(data):
            raise AlignmentError("atomic_store needs 1, 2, 4 or 8 naturally aligned bytes")
        self._host().store(frames.alias + offset, bytes(data), len(data), note="atomic store")
        self._counts["atomic_store"] += 1

    def begin_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        self._frames(reservation)

    def end_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        self._frames(reservation)

    # Synchronization ------------------------------------------------------------
    def _alias_of(self, va: int) -> int:
        for res in self._reservations:
            if res.address <= va < res.address + res.size:
                return self._frames(res).alias + va - res.address
        static = self._m._static.get(va - va % PAGE)
        if static is not None:  # code the machine was built with (``sync_code``)
            return static[0] + va % PAGE
        raise ModelError(f"{va:#x} is not in any reservation")

    def readable(self, address: int, size: int) -> bool:
        """Statically mapped readable pages, or pages of live mapped reservations."""
        for page in range(address - address % PAGE, address + size, PAGE):
            static = self._m._static.get(page)
            if static is not None and "r" in static[1]:
                continue
            res = next((r for r in self._reservations if r.address <= page < r.address + r.size), None)
            if res is None or self._released(res) or not res.mapped:
                return False
        return True

    def _lines(self, ranges: Sequence[Range]) -> list[int]:
        line = self._m.line_size
        out: list[int] = []
        for start, size in ranges:
            first = start - start % line
            out.extend(range(first, start + size, line))
        return list(dict.fromkeys(out))

    def run_step(self, step: str, ranges: Sequence[Range]) -> None:
        host = self._host()
        if step == "clean_dcache":
            for va in self._lines(ranges):
                host.dc(self._alias_of(va), note=f"DC CVAU {va:#x}")
        elif step == "invalidate_icache":
            for va in self._lines(ranges):
                host.ic(self._alias_of(va), note=f"IC IVAU {va:#x}")
        elif step in ("barrier", "local_cse"):
            self._fences(step)
        elif step == "remote_cse":
            if not host.others():
                # No other thread can hold stale instructions, and a thread created
                # later starts with the context-synchronizing return from clone():
                # the native backend skips membarrier in a single-threaded process too.
                self._counts["remote_cse_skipped"] += 1
                return
            host.ipi(host.others(), "cse", note="membarrier SYNC_CORE: IPI")
            host.wait(note="membarrier: wait for every CPU")
            self._fences("syscall_return")
        else:
            raise UnsupportedError(f"the modeled machine has no recipe step {step!r}")
        self._counts[step] += 1

    def stats(self) -> Mapping[str, object]:
        return {
            "mode": self.mode,
            "arch": self.arch.name,
            "cpus": self._m.cpus,
            "tlb": self._m.tlb,
            "reservations": sum(1 for r in self._reservations if not self._released(r)),
            "calls": dict(self._counts),
            "host_actions": self._m.host_actions,
        }

    def _released(self, res: Reservation) -> bool:
        token = res.token
        return isinstance(token, _Frames) and token.released

    def close(self) -> None:
        for res in self._reservations:
            if isinstance(res.token, _Frames):
                res.token.released = True
