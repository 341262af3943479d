"""``NativeBackend``: the Backend contract over real memory of this process.

Documentation of the behaviour lives in the package docstring (``execmem.native``);
the modes in ``_mapping``, the host synchronization in ``_sync``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from execmem import _forks
from execmem._backend import Range, Reservation
from execmem._errors import (
    AlignmentError,
    BadStateError,
    ExecmemError,
    ForkedProcessError,
    OutOfBoundsError,
    OutOfMemoryError,
    SystemCallError,
    UnsupportedError,
)
from execmem._locks import OwnedLock
from execmem._placement import intersect
from execmem.arch import ArchSpec, get, host
from execmem.native import _fork, _libc, _procmaps
from execmem.native._mapping import MAPPERS, DualMapper, Mapper, Region
from execmem.native._probe import PROBE, ProbeResult
from execmem.native._routines import host_routines
from execmem.native._sync import Synchronizer, uses_membarrier

#: Bits of user address space the kernel hands out without an address hint (x86-64
#: 4-level paging, arm64 48-bit VA, riscv64 Sv39 - the smallest of its modes).
ADDRESS_SPACE_BITS = {"x86_64": 47, "arm64": 48, "riscv64": 38}


def physical_memory() -> int | None:
    """Total RAM of this machine in bytes (``os.sysconf``), or None if unknown."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return pages * page if pages > 0 and page > 0 else None


class NativeBackend:
    """Executable memory in this process; see ``execmem.native``.

    ``mode``: ``"dual"`` (default, W^X by a read+execute view of a file written with
    ``pwrite``), ``"mprotect"``
    (W^X by toggling page protections) or ``"rwx"`` (writable and executable at once;
    only when asked for by name).  ``arch`` must be the host's (``None``), or the
    host's ``ArchSpec`` itself: a copy with recipes replaced
    (``ArchSpec.with_recipes``) makes the allocator on this backend run those (the
    tests that show a recipe step is necessary).
    ``huge_pages`` aligns reservations of 2 MiB or more to 2 MiB and asks for large
    pages (``MFD_HUGETLB``, else ``MADV_HUGEPAGE``); :meth:`stats` says what the kernel
    actually gave.  ``directories`` pins the file fallbacks of dual mapping (tests);
    ``probe`` replaces the process's membarrier probe (``_probe.PROBE``, started in
    the background by the first backend that may use membarrier; tests).

    ``max_reservation`` bounds one reservation, checked before any system call:
    a larger request is an ``OutOfMemoryError`` rather than an out-of-memory kill
    later (every reserved page is populated with trap filler).  Default: the machine's total RAM
    (``os.sysconf``), which makes ``jit_text_alloc(1 << 40)`` a clear error; an
    explicit value may be larger but never beyond the user address space
    (``ADDRESS_SPACE_BITS``).  It is a per-request sanity bound, not a budget: many
    smaller reservations can still exhaust memory (then the kernel refuses with
    ENOMEM, or the OOM killer acts).

    ``reserve`` rounds the size up to whole pages (``Reservation.size`` is the rounded
    size) and aligns to at least a page; with a ``capacity`` it maps that much at most
    later, through :meth:`grow`.  Costs on Linux x86-64, in system calls: a
    dual-mapping reservation 8 (VA and its trimming, memfd, ftruncate, trap fill,
    seal, read-only reopen; once per backend also the backing probe and a hugetlb
    attempt), ``grow`` 2 (trap fill, mapping), ``map`` 1, ``unmap`` 1, ``release``
    3; a write 1 (``pwrite``, however many texts a run holds), an atomic store 2 (its
    window); ``remote_cse`` 1 (3 the first time: query and register).  In mprotect
    mode a write to mapped memory costs 2 (``mprotect`` there and back) and none to
    an unmapped one.
    """

    def __init__(
        self,
        mode: str = "dual",
        arch: str | ArchSpec | None = None,
        *,
        huge_pages: bool = True,
        directories: Sequence[str] | None = None,
        probe: Callable[[], ProbeResult] | None = None,
        max_reservation: int | None = None,
    ) -> None:
        key = mode.strip().lower() if isinstance(mode, str) else mode
        if key not in MAPPERS:
            raise UnsupportedError(f"unknown native mode {mode!r}; choose dual, mprotect or rwx")
        spec = host() if arch is None else arch if isinstance(arch, ArchSpec) else get(arch)
        if spec.name != host().name:
            raise UnsupportedError(
                f"the native backend runs {host().name} code only, not {spec.name}; "
                "use execmem.emu.Machine for other architectures"
            )
        self.arch: ArchSpec = spec
        self.page_size = mmap.PAGESIZE
        address_space = 1 << ADDRESS_SPACE_BITS.get(spec.name, 47)
        if max_reservation is None:
            ram = physical_memory()
            self.max_reservation = min(ram, address_space) if ram is not None else address_space
            self._limit_source = "the machine's RAM" if ram is not None else "the address space"
        else:
            if isinstance(max_reservation, bool) or not isinstance(max_reservation, int):
                raise TypeError(f"max_reservation must be an int or None, not {type(max_reservation).__name__}")
            if max_reservation <= 0:
                raise ValueError(f"max_reservation must be positive, not {max_reservation}")
            self.max_reservation = min(max_reservation, address_space)
            self._limit_source = "max_reservation" if max_reservation <= address_space else "the address space"
        self._address_space = address_space
        self._sys = _libc.Syscalls()
        mapper: Mapper
        if MAPPERS[key] is DualMapper:
            dirs = None if directories is None else tuple(directories)
            mapper = DualMapper(spec, self._sys, self.page_size, huge_pages=huge_pages, directories=dirs)
        else:
            mapper = MAPPERS[key](spec, self._sys, self.page_size, huge_pages=huge_pages)
        self._mapper = mapper
        self.mode: str = mapper.mode
        self.write_unit: int = mapper.write_unit
        self._probe = probe if probe is not None else PROBE
        if self._probe is PROBE and uses_membarrier(spec):
            # In the background now, so that the first publish finds the verdict ready
            # (and never waits for it under the allocator's lock): see _probe.
            with contextlib.suppress(RuntimeError):  # no thread now: asked again on first use
                PROBE.start()
        self._sync: Synchronizer | None = None
        # An OwnedLock (_locks): a signal handler calling into this backend while the
        # interrupted code holds it gets BadStateError instead of a deadlock; reset in
        # a forked child, where this backend only closes.
        self._lock = OwnedLock("a native backend's region table")
        self._regions: dict[int, Region] = {}  # by address
        #: Regions whose release failed part way (a system call refused): still
        #: mapped, owned for audits, and released again by ``close``.
        self._unreleased: list[Region] = []
        self._steps: Counter[str] = Counter()
        self._generation = _forks.generation
        self._closed = False
        self._sync_closed = False
        self._peak_reserved = 0
        #: Held by everything that changes what a view shows or where it is (writes,
        #: atomic stores, map, unmap, growth, release) and by fork while it copies the
        #: views (``_fork``).  Re-entrant: a signal handler of the holding thread may
        #: fork.  Replaced in a forked child.
        self._gate = threading.RLock()
        #: What the last fork did to this backend's views (set in the child).
        self._fork_report: _fork.ForkReport | None = None
        #: Fork snapshots the parent could not unmap (unmapped again by ``close``).
        self._fork_leaks: list[tuple[int, int]] = []
        _fork.register(self)

    # -- properties ------------------------------------------------------------------------

    @property
    def cache_features(self) -> frozenset[str]:
        return (self._sync or self._synchronizer()).features

    @property
    def forked(self) -> bool:
        """True in a child forked after this backend was created (it may only close)."""
        return self._generation != _forks.generation

    #: Published code runs in this process (``JitText.function``).
    callable_in_process = True

    @property
    def concurrent_patch_safe(self) -> bool:
        """Whether ``atomic_store`` is safe while other threads execute the same page
        (not in mprotect mode, where the page is briefly not executable)."""
        return self.write_unit == 1

    # -- helpers ---------------------------------------------------------------------------

    def _synchronizer(self) -> Synchronizer:
        if self._sync is None:
            with self._lock:
                if self._sync is None:
                    self._sync = Synchronizer(
                        self.arch, self._sys, host_routines(), page_size=self.page_size, probe=self._probe
                    )
        return self._sync

    def _usable(self) -> None:
        if self._closed:
            raise BadStateError("the native backend is closed")
        if self.forked:
            raise ForkedProcessError(
                "this native backend belongs to the parent process; a forked child keeps the "
                "read+execute views of the parent's texts but cannot write or map them"
            )

    def _region(self, reservation: Reservation) -> Region:
        if self._closed or self._generation != _forks.generation:
            self._usable()  # raises
        region = reservation.token
        if not isinstance(region, Region) or self._regions.get(region.address) is not region:
            raise BadStateError(f"reservation at {reservation.address:#x} is not live in this backend")
        return region

    @staticmethod
    def _bounds(reservation: Reservation, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > reservation.size:
            raise OutOfBoundsError(
                f"[{offset:#x}, {offset + size:#x}) is outside the reservation of {reservation.size:#x} bytes"
            )

    # -- the Backend contract --------------------------------------------------------------

    def _not_reentered(self) -> None:
        """Refuse before any system call what would re-enter ``self._lock``."""
        if self._lock.held_here():
            with self._lock:  # raises BadStateError (the message is the lock's)
                pass

    def _pages(self, size: int) -> int:
        return -(-size // self.page_size) * self.page_size

    def reserve(self, size: int, align: int, capacity: int | None = None, *, window: Range | None = None) -> Reservation:
        self._usable()
        self._not_reentered()
        if size <= 0:
            raise AlignmentError(f"reservation size must be positive, not {size}")
        if align <= 0 or align & (align - 1):
            raise AlignmentError(f"alignment must be a power of two, not {align}")
        size = self._pages(size)
        capacity = max(size, self._pages(capacity or 0))
        if capacity > self.max_reservation:
            raise OutOfMemoryError(
                f"a reservation of {capacity:#x} bytes is larger than this backend allows "
                f"({self.max_reservation:#x} bytes: {self._limit_source}); nothing was reserved"
            )
        align = self._mapper.alignment(capacity, align)
        if window is not None and intersect(window, (0, self._address_space)) is None:
            raise OutOfMemoryError(f"[{window[0]:#x}, {window[1]:#x}) lies outside the user address space")
        if capacity + align > self._address_space:
            raise OutOfMemoryError(f"{capacity:#x} bytes aligned to {align:#x} cannot fit in the address space")
        with self._gate:  # a fork meanwhile sees the region with its descriptors, or nothing
            region = self._mapper.reserve(size, align, capacity, window)
            try:
                with self._lock:
                    self._regions[region.address] = region
                    self._note_peak()
            except BaseException:
                with contextlib.suppress(ExecmemError):  # the original error is the one to report
                    self._mapper.release(region, forked=False)
                raise
        return Reservation(region.address, region.size, mapped=False, token=region, capacity=region.capacity)

    def reserve_data(self, size: int, align: int, window: Range | None = None) -> Reservation:
        """Zero-filled read+write anonymous memory, never executable (``jit_data_alloc``),
        in ``window`` if given; whole pages."""
        self._usable()
        self._not_reentered()
        size = self._pages(max(size, 1))
        align = max(align, self.page_size)
        if size > self.max_reservation:
            raise OutOfMemoryError(f"a data region of {size:#x} bytes is larger than this backend allows ({self.max_reservation:#x})")
        if window is not None and intersect(window, (0, self._address_space)) is None:
            raise OutOfMemoryError(f"[{window[0]:#x}, {window[1]:#x}) lies outside the user address space")
        with self._gate:
            region = self._mapper.reserve_data(size, align, window)
            try:
                with self._lock:
                    self._regions[region.address] = region
            except BaseException:
                with contextlib.suppress(ExecmemError):
                    self._mapper.release_data(region)
                raise
        return Reservation(region.address, region.size, mapped=False, token=region)

    def read_data(self, reservation: Reservation, offset: int, size: int) -> bytes:
        region = self._region(reservation)
        self._bounds(reservation, offset, size)
        if not region.data:
            raise BadStateError(f"reservation at {reservation.address:#x} is not a data region")
        return ctypes.string_at(region.address + offset, size)

    def _release_region(self, region: Region) -> None:
        if region.data:
            self._mapper.release_data(region)
        else:
            self._mapper.release(region, forked=self.forked)

    def _note_peak(self) -> None:
        self._peak_reserved = max(self._peak_reserved, sum(r.size for r in self._regions.values()))

    def grow(self, reservation: Reservation, size: int) -> bool:
        region = self._region(reservation)
        self._not_reentered()
        size = self._pages(size)
        with self._gate:
            if not self._mapper.grow(region, size):
                return False
        reservation.size = region.size
        with self._lock:
            self._note_peak()
        return True

    def map(self, reservation: Reservation) -> None:
        region = self._region(reservation)
        if region.data:
            raise BadStateError(f"the data region at {reservation.address:#x} is never made executable")
        if region.mapped:
            raise BadStateError(f"reservation at {reservation.address:#x} is already mapped")
        with self._gate:
            self._mapper.map(region)
            region.mapped = reservation.mapped = True

    def unmap(self, reservation: Reservation) -> None:
        region = self._region(reservation)
        if not region.mapped:
            raise BadStateError(f"reservation at {reservation.address:#x} is not mapped")
        with self._gate:
            self._mapper.unmap(region)
            region.mapped = reservation.mapped = False

    def release(self, reservation: Reservation) -> None:
        if self._closed:
            raise BadStateError("the native backend is closed")
        region = reservation.token
        if not isinstance(region, Region) or self._regions.get(region.address) is not region:
            raise BadStateError(f"reservation at {reservation.address:#x} is not live in this backend")
        with self._gate:
            with self._lock:
                del self._regions[region.address]
            region.released, region.mapped, reservation.mapped = True, False, False
            try:
                self._release_region(region)
            except ExecmemError:
                with self._lock:
                    self._unreleased.append(region)
                raise

    def write(self, reservation: Reservation, offset: int, data: bytes) -> None:
        region = reservation.token
        if (
            self._closed
            or self._generation != _forks.generation
            or type(region) is not Region
            or self._regions.get(region.address) is not region
        ):
            region = self._region(reservation)  # the full check: raises unless it is live
        payload = data if type(data) is bytes else bytes(data)
        if offset < 0 or offset + len(payload) > reservation.size:
            self._bounds(reservation, offset, len(payload))  # raises
        if payload and region.data:
            ctypes.memmove(region.address + offset, payload, len(payload))
        elif payload:
            with self._gate:
                self._mapper.write(region, offset, payload)

    def atomic_store(self, reservation: Reservation, offset: int, data: bytes) -> None:
        region = self._region(reservation)
        size = len(data)
        if size not in (1, 2, 4, 8):
            raise AlignmentError(f"an atomic store is 1, 2, 4 or 8 bytes, not {size}")
        if (reservation.address + offset) % size:
            raise AlignmentError(f"an atomic store of {size} bytes needs a {size}-byte aligned offset, not {offset:#x}")
        self._bounds(reservation, offset, size)
        routine = host_routines()[f"store{size}"]
        value = int.from_bytes(bytes(data), sys.byteorder)
        with self._gate:  # no fork while a write window is mapped
            self._mapper.store(region, offset, size, lambda address: routine(address, value))

    def begin_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        region = self._region(reservation)
        self._bounds(reservation, offset, size)
        with self._gate:
            self._mapper.begin_inplace(region, offset, size)

    def end_inplace(self, reservation: Reservation, offset: int, size: int) -> None:
        region = self._region(reservation)
        self._bounds(reservation, offset, size)
        with self._gate:
            self._mapper.end_inplace(region, offset, size)

    def readable(self, address: int, size: int) -> bool:
        """Asks ``/proc/self/maps`` (read after the check: a range unmapped meanwhile
        by another thread is the caller's race, as with any pointer)."""
        try:
            vmas = _procmaps.read_maps()
        except OSError as exc:
            raise SystemCallError(f"cannot read /proc/self/maps to check [{address:#x}, {address + size:#x}): {exc}") from None
        return _procmaps.covered(vmas, address, size)

    def run_step(self, step: str, ranges: Sequence[Range]) -> None:
        if self._closed:
            raise BadStateError("the native backend is closed")
        sync = self._sync or self._synchronizer()
        (sync.actions.get(step) or sync.action(step))(ranges)  # a dict lookup, one call: the hot path
        steps = self._steps  # dict.get/setitem: a Counter's += costs twice as much
        steps[step] = steps.get(step, 0) + 1

    # -- reporting -------------------------------------------------------------------------

    def _fork_regions(self) -> list[Region]:
        """Every region still holding a view or a descriptor (for ``_fork``; one
        C-level copy each, atomic under the GIL, so no lock a fork could find held)."""
        return [*list(self._regions.values()), *list(self._unreleased)]

    def owned_ranges(self) -> list[Range]:
        """Every range this backend maps (views, aliases, reservations) - for W^X audits."""
        with self._lock:
            regions = [*self._regions.values(), *self._unreleased]
        return [r for region in regions for r in self._mapper.owned_ranges(region)] + list(self._fork_leaks)

    def executable_ranges(self) -> list[Range]:
        with self._lock:
            return [(r.address, r.size) for r in self._regions.values() if r.mapped]

    def stats(self) -> Mapping[str, object]:
        """What this backend obtained and did; huge pages as the kernel reports them."""
        with self._lock:
            regions = list(self._regions.values())
        executable = [(r.address, r.size) for r in regions if r.mapped]
        huge: dict[str, object] = {
            "requested": self._mapper.huge_pages,
            "executable_bytes": sum(size for _, size in executable),
            "source": "/proc/self/smaps",
        }
        try:
            totals = _procmaps.smaps_totals(executable)
            huge["obtained_bytes"] = _procmaps.huge_bytes(totals)
            huge["by_field"] = {name: totals.get(name, 0) for name in _procmaps.HUGE_FIELDS if totals.get(name)}
        except OSError as exc:
            huge["obtained_bytes"] = None
            huge["error"] = str(exc)
        backing = self._mapper.describe()
        if "hugetlb" in backing:
            huge["hugetlb"] = backing["hugetlb"]
        sync: dict[str, object] = self._sync.describe() if self._sync is not None else {"remote_cse": None}
        if self._probe is PROBE:
            sync["membarrier_probe"] = PROBE.describe()
        syscalls = dict(self._sys.tally)
        return {
            "mode": self.mode,
            "arch": self.arch.name,
            "page_size": self.page_size,
            "write_unit": self.write_unit,
            "max_reservation": self.max_reservation,
            "backing": backing["kind"],
            "backing_detail": backing,
            "huge_pages": huge,
            "sync": sync,
            "steps": dict(self._steps),
            "syscalls": syscalls,
            "syscalls_total": sum(syscalls.values()),
            "reservations": len(regions),
            "release_pending": len(self._unreleased),
            "bytes_reserved": sum(r.size for r in regions),
            "bytes_mapped": sum(size for _, size in executable),
            "peak_bytes_reserved": self._peak_reserved,
            "forked": self.forked,
            "fork": self._fork_report.describe() if self._fork_report is not None else None,
            "closed": self._closed,
        }

    def close(self) -> None:
        """Release every reservation and helper (idempotent; allowed in a forked child).

        What a refused system call kept from being released (here or in an earlier
        ``release``) is tried again by the next ``close``."""
        if self._closed and not self._unreleased and self._sync_closed and not self._fork_leaks:
            return
        self._not_reentered()
        self._closed = True
        first: ExecmemError | None = None
        with self._gate:
            with self._lock:
                regions = [*self._regions.values(), *self._unreleased]
                self._regions.clear()
                self._unreleased.clear()
            for region in regions:
                region.released = True
                try:
                    self._release_region(region)
                except ExecmemError as exc:
                    first = first or exc
                    with self._lock:
                        self._unreleased.append(region)
            for leak in list(self._fork_leaks):
                try:
                    self._sys.munmap(*leak)
                    self._fork_leaks.remove(leak)
                except ExecmemError as exc:
                    first = first or exc
        if self._sync is not None and not self.forked and not self._sync_closed:
            try:
                self._sync.close()
                self._sync_closed = True
            except ExecmemError as exc:
                first = first or exc
        else:
            self._sync_closed = True
        if first is not None:
            raise first

    def __enter__(self) -> NativeBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._regions)} reservations"
        return f"NativeBackend(mode={self.mode!r}, arch={self.arch.name!r}, {state})"


__all__ = ["NativeBackend"]
