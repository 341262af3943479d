"""``MemoryBackend``: the Backend contract over plain bytes, for tests of the core.

Nothing here is executable.  A fake virtual address space hands out reservations
at the requested alignment (with a guard gap between them), each backed by a
``bytearray`` trap-filled at ``reserve``.  Every call is recorded in :attr:`calls`
(``(verb, address, *details)``) and every recipe step in :attr:`steps`
(``(name, ranges)``), so tests can assert the exact synchronization the allocator
performed.  :meth:`fail` makes the next call of a verb raise, to test rollback.

``write_unit``, ``cache_features`` and ``arch`` are configurable, so one host can
exercise the mprotect-style layout rules and every architecture's recipes and
patch rules.  Mistakes the core must never make (writing outside a reservation,
mapping twice, using a released reservation, misaligned atomic stores) raise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from execmem._backend import Range, Reservation
from execmem._errors import (
    AlignmentError,
    BadStateError,
    ExecmemError,
    OutOfBoundsError,
    OutOfMemoryError,
)
from execmem._placement import find_gap, intersect, middle
from execmem.arch import ArchSpec, get

#: Where the fake address space starts and ends (a 47-bit user space, like Linux x86-64).
BASE = 0x7F00_0000_0000
LIMIT = 0x7FFF_0000_0000


@dataclass
class _Backing:
    data: bytearray
    released: bool = False
    #: A data region (``reserve_data``): never mapped executable.
    is_data: bool = False
    inplace: Counter[int] = field(default_factory=Counter)  # write-unit index -> holds


class MemoryBackend:
    """A pure-Python :class:`~execmem._backend.Backend` (mode ``"memory"``)."""

    mode = "memory"
    #: Nothing here is executable in this process.
    callable_in_process = False

    def __init__(
        self,
        arch: ArchSpec | str | None = None,
        *,
        page_size: int = 4096,
        write_unit: int = 1,
        cache_features: Iterable[str] = (),
        limit: int | None = None,
    ) -> None:
        self.arch: ArchSpec = arch if isinstance(arch, ArchSpec) else get(arch)
        self.page_size = page_size
        self.write_unit = write_unit
        self.cache_features: frozenset[str] = frozenset(cache_features)
        #: Total bytes that may be reserved at once (``None``: no limit).
        self.limit = limit
        self.calls: list[tuple[object, ...]] = []
        self.steps: list[tuple[str, tuple[Range, ...]]] = []
        self.counts: Counter[str] = Counter()
        self._next = BASE
        self._live: dict[int, Reservation] = {}
        self._failures: dict[str, ExecmemError] = {}
        self.closed = False

    @property
    def max_reservation(self) -> int | None:
        return self.limit

    @property
    def concurrent_patch_safe(self) -> bool:
        return self.write_unit == 1

    # -- test helpers ------------------------------------------------------------------------

    def fail(self, verb: str, error: ExecmemError | None = None) -> None:
        """Make the next call of ``verb`` (``reserve``, ``map``, ``write``, ``run_step:<name>``...) raise."""
        self._failures[verb] = error if error is not None else OutOfMemoryError(f"injected failure of {verb}")

    def _maybe_fail(self, verb: str) -> None:
        error = self._failures.pop(verb, None)
        if error is not None:
            raise error

    @property
    def reservations(self) -> list[Reservation]:
        """Live reservations of executable memory in address order (not data regions)."""
        return [r for r in self._sorted() if not self._backing(r).is_data]

    @property
    def data_regions(self) -> list[Reservation]:
        """Live data regions (``reserve_data``) in address order."""
        return [r for r in self._sorted() if self._backing(r).is_data]

    def _sorted(self) -> list[Reservation]:
        return [self._live[a] for a in sorted(self._live)]

    @property
    def remote_cse_count(self) -> int:
        return self.counts["remote_cse"]

    def read(self, address: int, size: int) -> bytes:
        """Bytes at ``[address, address+size)``, which must lie in one live reservation."""
        res = self._find(address, size)
        offset = address - res.address
        return bytes(self._backing(res).data[offset : offset + size])

    def snapshot(self) -> dict[int, tuple[bool, bytes]]:
        """Every live reservation's mapped flag and contents (to assert nothing changed)."""
        return {a: (r.mapped, bytes(self._backing(r).data)) for a, r in sorted(self._live.items())}

    def _find(self, address: int, size: int) -> Reservation:
        for res in self._live.values():
            if res.address <= address and address + size <= res.address + res.size:
                return res
        raise OutOfBoundsError(f"[{address:#x}, {address + size:#x}) is not inside one reservation")

    def _backing(self, res: Reservation) -> _Backing:
        token = res.token
        if not isinstance(token, _Backing) or token.released or self._live.get(res.address) is not res:
            raise BadStateError(f"reservation at {res.address:#x} is not live in this backend")
        return token

    def _usable(self) -> None:
        if self.closed:
            raise BadStateError("the memory backend is closed")

    @staticmethod
    def _bounds(res: Reservation, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > res.size:
            raise OutOfBoundsError(f"[{offset:#x}, {offset + size:#x}) is outside the reservation of {res.size:#x} bytes")

    # -- the Backend contract ------------------------------------------------------------------

    def reserve(self, size: int, align: int, capacity: int | None = None, *, window: Range | None = None) -> Reservation:
        self._usable()
        if size <= 0 or align <= 0 or align & (align - 1):
            raise AlignmentError("reserve needs a positive size and a power-of-two alignment")
        self._maybe_fail("reserve")
        size += -size % self.page_size
        capacity = max(size, capacity or 0)
        capacity += -capacity % self.page_size
        align = max(align, self.page_size)
        self._within_limit(size)
        if window is not None:
            address = self._in_window(capacity, align, window)
            self._next = max(self._next, address + capacity + self.page_size)
        else:
            address = self._next + (-self._next % align)
            if address + capacity > LIMIT:
                raise OutOfMemoryError("the fake address space is exhausted")
            self._next = address + capacity + self.page_size  # room to grow, then a guard gap
        token = _Backing(bytearray(self.arch.trap_bytes(size)))
        res = Reservation(address, size, mapped=False, token=token, capacity=capacity)
        self._live[address] = res
        self.calls.append(("reserve", address, size, align))
        self.counts["reserve"] += 1
        return res

    def reserve_data(self, size: int, align: int, window: Range | None = None) -> Reservation:
        res = self.reserve(size, align, window=window)
        res.token = _Backing(bytearray(res.size), is_data=True)
        self.calls[-1] = ("reserve_data", res.address, res.size, align)
        return res

    def read_data(self, reservation: Reservation, offset: int, size: int) -> bytes:
        backing = self._backing(reservation)
        self._bounds(reservation, offset, size)
        if not backing.is_data:
            raise BadStateError(f"reservation at {reservation.address:#x} is not a data region")
        return bytes(backing.data[offset : offset + size])

    def _in_window(self, capacity: int, align: int, window: Range) -> int:
        """A free place in ``window`` (guard gaps kept around every reservation)."""
        guard = self.page_size
        taken = [(r.address - guard, r.capacity + 2 * guard) for r in self._live.values()]
        bounds = intersect(window, (BASE, LIMIT))
        address = None if bounds is None else find_gap(taken, capacity, align, bounds, toward=middle(window))
        if address is None:
            raise OutOfMemoryError(f"no free {capacity:#x} bytes in [{window[0]:#x}, {window[1]:#x})")
        return address

    def _within_limit(self, more: int) -> None:
        if self.limit is not None and sum(r.size for r in self._live.values()) + more > self.limit:
            raise OutOfMemoryError(f"the memory backend's limit of {self.limit:#x} bytes is reached")

    def grow(self, reservation: Reservation, size: int) -> bool:
        self._usable()
        backing = self._backing(reservation)
        size += -size % self.page_size
        if size <= reservation.size:
            return True
        if size > reservation.capacity:
            return False
        self._maybe_fail("grow")
        self._within_limit(size - reservation.size)
        backing.data += self.arch.trap_bytes(size - reservation.size)
        self.calls.append(("grow", reservation.address, size))
        self.counts["grow"] += 1
        reservation.size = size
        return True

    def map(self, reservation: Reservation) -> None:
        self._usable()
        if self._backing(reservation).is_data:
            raise BadStateError(f"the data region at {reservation.address:#x} is never made executable")
        if reservation.mapped:
            raise BadStateError(f"reservation at {reservation.address:#x} is already mapped")
        self._maybe_fail("map")
        reservation.mapped = True
        self.calls.append(("map", reservation.address))
        self.counts["map"] += 1

    def unmap(self, reservation: Reservation) -> None:
        self._usable()
        self._backing(reservation)
        if not reservation.mapped:
            raise BadStateError(f"reservation at {reservation.address:#x} is not mapped")
        self._maybe_fail("unmap")
        reservation.mapped = False
        self.calls.append(("unmap", reservation.address))
        self.counts["unmap"] += 1

    def release(self, reservation: Reservation) -> None:
        backing = self._backing(reservation)
        self._maybe_fail("release")
        backing.released = True
        reservation.mapped = False
        del self._live[reservation.address]
        self.calls.append(("release", reservation.address))
        self.counts["release"] += 1

    def write(self, reservation: Reservation, offset: int, data: bytes) -> None:
        self._usable()
        backing = self._backing(reservation)
        payload = bytes(data)
        self._bounds(reservation, offset, len(payload))
        self._maybe_fail("write")
        backing.data[offset : offset + len(payload)] = payload
        self.calls.append(("write", reservation.address + offset, len(payload)))
        self.counts["write"] += 1

    def atomic_store(self, reservation: Reservation, offset: int, data: bytes) -> None:
        self._usable()
        backing = self._backing(reservation)
        size = len(data)
        if size not in (1, 2, 4, 8) or (reservation.address + offset) % size:
            raise AlignmentError("atomic_store needs 1, 2, 4 or 8 naturally aligned bytes")
        self._bounds(reservation, offset, size)
        self._maybe_fail("atomic_store")
        backing.data[offset : offset + size] = bytes(data)
        self.calls.append(("atomic_store", reservation.address + offset, size))
        self.counts["atomic_store"] += 1

    def _units(self, offset: int, size: int) -> range:
        return range(offset // self.write_unit, (offset + max(size, 1) - 1) // self.write_unit + 1)

    def begin_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        self._usable()
        backing = self._backing(reservation)
        self._bounds(reservation, offset, size)
        self._maybe_fail("begin_inplace")
        backing.inplace.update(self._units(offset, size))
        self.calls.append(("begin_inplace", reservation.address + offset, size))
        self.counts["begin_inplace"] += 1

    def end_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        self._usable()
        backing = self._backing(reservation)
        self._bounds(reservation, offset, size)
        units = list(self._units(offset, size))
        if any(backing.inplace[u] <= 0 for u in units):
            raise BadStateError("end_inplace without a matching begin_inplace")
        self._maybe_fail("end_inplace")
        backing.inplace.subtract(units)
        backing.inplace += Counter()  # drop zero counts
        self.calls.append(("end_inplace", reservation.address + offset, size))
        self.counts["end_inplace"] += 1

    def inplace_units(self, reservation: Reservation) -> dict[int, int]:
        """Write units of ``reservation`` currently held writable by ``begin_inplace``."""
        return dict(self._backing(reservation).inplace)

    def readable(self, address: int, size: int) -> bool:
        """Inside mapped live reservations (the fake address space has nothing else)."""
        self._usable()
        end = address + size
        while address < end:
            res = next((r for r in self._live.values() if r.mapped and r.address <= address < r.address + r.size), None)
            if res is None:
                return False
            address = res.address + res.size
        return True

    def run_step(self, step: str, ranges: Sequence[Range]) -> None:
        self._usable()
        self._maybe_fail(f"run_step:{step}")
        self.steps.append((step, tuple(ranges)))
        self.calls.append(("run_step", step, tuple(ranges)))
        self.counts[step] += 1

    def stats(self) -> Mapping[str, object]:
        return {
            "mode": self.mode,
            "arch": self.arch.name,
            "write_unit": self.write_unit,
            "reservations": len(self._live),
            "bytes_reserved": sum(r.size for r in self._live.values()),
            "bytes_mapped": sum(r.size for r in self._live.values() if r.mapped),
            "calls": dict(self.counts),
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for res in list(self._live.values()):
            self.release(res)


__all__ = ["MemoryBackend"]
