"""The three ways the native backend lays out executable memory.

``dual`` (:class:`DualMapper`, the default)
    A shared-memory file (memfd, else a file in ``/dev/shm``, else in the temp dir,
    unlinked at once; see :class:`Backing`) is mapped read+execute at the
    reservation's fixed address (the *view*), installed by ``map`` and replaced by
    an inaccessible anonymous mapping by ``unmap`` (the kernel shoots the TLBs down;
    the VA stays reserved).  Writes go into the file with ``pwrite``: no mapping of
    the code is ever writable, let alone writable and executable, and a reservation
    costs its view only.  An atomic store (a live patch) needs a real store
    instruction: it goes through a one-page read+write window, unmapped at once.
    The view is mapped from a *read-only* descriptor of the file, so ``mprotect``
    cannot make it writable.  A hugetlbfs file (no ``write(2)``) is instead written
    through a read+write alias, ``MADV_DONTFORK`` and sealed.  Fallbacks and limits
    (no ``/proc``, ptrace) are in ``_backing``.

``mprotect`` (:class:`MprotectMapper`)
    One private anonymous mapping per reservation whose pages change protection:
    read+write while filled, inaccessible while reserved, read+execute while mapped;
    a write to mapped memory makes only the touched pages read+write (never
    executable) and back.  Concurrent execution on a page being written faults, so
    the core keeps in-place texts off pages shared with live text (``write_unit`` is
    the page size).  The first write to a reservation that is *not* mapped makes all
    of it read+write (nothing can execute it) until ``map``/``unmap``: one
    ``mprotect`` for any number of writes, and a large page is not split.

``rwx`` (:class:`RwxMapper`, only when asked for by name)
    One mapping that is read+write while reserved and read+write+execute while
    mapped.  Writes go straight to the executable address.  Provided for comparison
    and for hosts that refuse everything else; it gives up W^X.

Every reservation starts as an over-sized inaccessible mapping trimmed to the
requested alignment (2 MiB - the PMD size - when the size allows and large pages
are wanted), and every failure rolls back what was created before it.  A
reservation with room to grow (a pack) maps only its first part at the bottom of its
slot, below ``GROWTH_ROOM`` of free addresses; ``grow`` extends it with
``MAP_FIXED_NOREPLACE`` in the region's current state, which the kernel merges into
the same VMA, and reports False when something else took the addresses.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from execmem._backend import Range
from execmem._errors import ExecmemError, OutOfMemoryError
from execmem._locks import OwnedLock
from execmem._placement import Window, find_gap, inside, middle
from execmem.arch import ArchSpec
from execmem.native import _libc, _procmaps
from execmem.native._backing import PMD_SIZE, RX, Backing
from execmem.native._backing import close_quietly as _close_quietly
from execmem.native._libc import (
    MADV_DONTFORK,
    MADV_HUGEPAGE,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
)

RW = PROT_READ | PROT_WRITE
#: The lowest address ``near=`` placement picks (Linux's default ``vm.mmap_min_addr``).
MMAP_MIN_ADDR = 0x10000
#: An inaccessible placeholder keeping VA reserved (no memory is committed for it).
PLACEHOLDER = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
#: Free address space left above a growable reservation's slot (``_growable_va``):
#: other mappings of the process fill it before they can reach the slot.
GROWTH_ROOM = 256 << 20


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


#: Slots tried for a ``near=`` reservation before falling back to hint addresses (a
#: refused slot is skipped next time, so this bounds the system calls, not the
#: correctness).  Under QEMU user mode, measured: the 35 slots of 2 MiB nearest below
#: the guest's libc and all those above it were taken by mappings the guest cannot see.
_CLAIM_ATTEMPTS = 256


@dataclass(eq=False)
class Region:
    """Backend-private state of one reservation (``Reservation.token``)."""

    address: int
    #: Bytes mapped now (the view, or the inaccessible placeholder); grows in place.
    size: int
    #: Where writes land: the address itself (mprotect, rwx), the alias (dual mode on
    #: hugetlbfs), or 0 when they go through ``rw_fd`` (dual mode otherwise).
    write_base: int
    #: dual mode: the descriptor views are mapped from - read-only unless the reopen
    #: fell back (``_backing``).
    fd: int = -1
    #: dual mode without an alias: the read+write descriptor ``pwrite`` goes through.
    rw_fd: int = -1
    #: The most ``size`` may grow to (the pack's slot); ``size`` when it cannot grow.
    capacity: int = 0
    hugetlb: bool = False
    #: A data region (``jit_data_alloc``): read+write anonymous memory, never executable.
    data: bool = False
    mapped: bool = False
    released: bool = False
    #: mprotect mode: pages (indices) currently read+write, and in-place nesting counts.
    rw_pages: set[int] = field(default_factory=set)
    inplace: Counter[int] = field(default_factory=Counter)
    #: Parts already returned to the system ("view", "alias", "fd"): a release that
    #: failed half way is retried for the rest only (``NativeBackend.close``).
    released_parts: set[str] = field(default_factory=set)
    #: dual mode: one-page write windows of ``store`` whose unmapping was refused.
    windows: list[int] = field(default_factory=list)
    #: mprotect mode: guards the page protections.  An OwnedLock: a signal handler
    #: writing to this region while the interrupted code toggles its pages gets
    #: BadStateError instead of a deadlock.
    lock: OwnedLock = field(default_factory=lambda: OwnedLock("a region's page protections"), repr=False)

    def __post_init__(self) -> None:
        self.capacity = max(self.capacity, self.size)


def _runs(pages: Iterator[int] | list[int]) -> list[tuple[int, int]]:
    """Consecutive page indices grouped as ``(first, count)``."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _undo_all(undo: list[Callable[[], None]]) -> None:
    for action in reversed(undo):
        # Best effort: the original error is the one to report.
        with contextlib.suppress(ExecmemError):
            action()


class Mapper:
    """Common part of the three modes (see the module docstring)."""

    mode = ""

    def __init__(self, spec: ArchSpec, sys_: _libc.Syscalls, page_size: int, *, huge_pages: bool) -> None:
        self.spec = spec
        self._sys = sys_
        self.page = page_size
        self.huge_pages = huge_pages
        self.write_unit = 1
        self._pattern = b""
        #: Where the next growable reservation is tried first (``_growable_va``).
        self._next_slot: int | None = None

    # -- helpers -------------------------------------------------------------------------

    def alignment(self, size: int, align: int) -> int:
        """The alignment actually used: page at least, the PMD when large pages may fit."""
        align = max(align, self.page)
        if self.huge_pages and size >= PMD_SIZE:
            align = max(align, PMD_SIZE)
        return align

    def reserve_va(
        self, size: int, align: int, prot: int, flags: int, capacity: int = 0, window: Window | None = None
    ) -> int:
        """``size`` bytes at an ``align``-aligned address: over-allocate, trim both ends.

        A ``capacity`` above ``size`` places it where it can grow in place to that many
        bytes (see :meth:`_growable_va`); a ``window`` inside it (:meth:`_va_in_window`)."""
        if window is not None:
            return self._va_in_window(size, align, prot, flags, max(size, capacity), window)
        if capacity > size:
            return self._growable_va(size, align, prot, flags, capacity)
        span = size + align - self.page
        base = self._sys.mmap(0, span, prot, flags)
        return self._trim(base, span, round_up(base, align), size)

    def _trim(self, base: int, span: int, start: int, size: int) -> int:
        """Unmap ``[base, base + span)`` but ``[start, start + size)``; all of it on error."""
        try:
            if start > base:
                self._sys.munmap(base, start - base)
            tail = base + span - (start + size)
            if tail:
                self._sys.munmap(start + size, tail)
        except BaseException:
            _undo_all([lambda: self._sys.munmap(base, span)])
            raise
        return start

    def _va_in_window(self, size: int, align: int, prot: int, flags: int, slot: int, window: Window) -> int:
        """``size`` bytes at the start of a free, ``align``-aligned ``slot`` inside
        ``window`` (``near=``): a gap found in ``/proc/self/maps`` (the one nearest the
        window's middle) claimed with ``MAP_FIXED_NOREPLACE``, looked up again if another
        thread took it meanwhile; without ``/proc``, hint addresses across the window.

        A slot the kernel refuses is left out of the next lookups: it may be taken by
        something ``/proc/self/maps`` does not show (QEMU user mode hides its own
        mappings from the guest's maps, yet they occupy the same addresses)."""
        low = max(window[0], MMAP_MIN_ADDR)
        bounds = (low, window[1])
        refused: list[tuple[int, int]] = []
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                vmas = _procmaps.read_maps()
            except OSError:
                break
            occupied = [(v.start, v.end - v.start) for v in vmas] + refused
            address = find_gap(occupied, slot, align, bounds, toward=middle(window))
            if address is None:
                raise OutOfMemoryError(
                    f"no free {slot:#x} bytes aligned to {align:#x} in [{window[0]:#x}, {window[1]:#x})"
                    + (f" ({len(refused)} free-looking slots refused by the kernel)" if refused else "")
                )
            if self.claim(address, size, prot, flags):
                return address
            refused.append((address, slot))
        for hint in (middle(window), low, window[1] - slot):
            hint = hint // align * align
            got = self._sys.mmap(hint, size, prot, flags)  # a hint: the kernel may move it
            if got % align == 0 and inside(bounds, got, slot):
                return got
            self._sys.munmap(got, size)
        raise OutOfMemoryError(f"could not map {slot:#x} bytes in [{window[0]:#x}, {window[1]:#x})")

    def _growable_va(self, size: int, align: int, prot: int, flags: int, capacity: int) -> int:
        """``size`` bytes at the bottom of a free ``capacity`` slot, below ``GROWTH_ROOM``
        more free bytes.

        Linux hands out addresses top-down (the highest free gap that fits), so the
        mappings made after this one fill the room above from its top and reach the
        slot last.  Later slots go right below the previous one (a code region, which
        also keeps texts within direct-branch range of each other) when that is free.
        """
        if self._next_slot is not None:
            hint, self._next_slot = self._next_slot, None
            if self.claim(hint, size, prot, flags):
                self._next_below(hint, capacity, align)
                return hint
        span = capacity + align - self.page + GROWTH_ROOM
        try:
            base = self._sys.mmap(0, span, PROT_NONE, PLACEHOLDER)
        except OutOfMemoryError:  # RLIMIT_AS, or a crowded address space: no room then
            span -= GROWTH_ROOM
            base = self._sys.mmap(0, span, PROT_NONE, PLACEHOLDER)
        start = round_up(base, align)
        if (prot, flags) != (PROT_NONE, PLACEHOLDER):
            try:
                self._sys.mmap(start, size, prot, flags | MAP_FIXED)
            except BaseException:
                _undo_all([lambda: self._sys.munmap(base, span)])
                raise
        self._trim(base, span, start, size)
        self._next_below(start, capacity, align)
        return start

    def _next_below(self, start: int, capacity: int, align: int) -> None:
        below = (start - capacity) // align * align
        self._next_slot = below if below > capacity else None

    def claim(self, address: int, size: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> bool:
        """Map ``size`` bytes exactly at ``address`` if nothing is there; False if taken.

        ``EEXIST`` is checked once more with the address as a plain hint, which never
        replaces a mapping either: QEMU user mode (10.0) refuses ``MAP_FIXED_NOREPLACE``
        anywhere inside its reservation of the guest's address space, free or not."""
        try:
            got = self._sys.mmap(address, size, prot, flags | MAP_FIXED_NOREPLACE, fd, offset)
        except ExecmemError as exc:
            if _libc.errno_of(exc) != errno.EEXIST:
                raise
            got = self._sys.mmap(address, size, prot, flags, fd, offset)
        if got != address:  # taken; or a kernel before 4.17 took the address as a hint
            self._sys.munmap(got, size)
            return False
        return True

    def grow(self, region: Region, size: int) -> bool:
        """Extend ``region`` in place to ``size`` bytes (see ``Backend.grow``)."""
        if size <= region.size:
            return True
        if size > region.capacity:
            return False
        if not self._extend(region, region.address + region.size, size - region.size):
            return False
        region.size = size
        if size == region.capacity:
            self.advise_huge(region.address, size)
        return True

    def _extend(self, region: Region, end: int, extra: int) -> bool:
        """Map ``extra`` trap-filled bytes at ``end`` in the region's state, or False."""
        raise NotImplementedError

    def fill(self, address: int, size: int) -> None:
        """Trap-fill ``size`` bytes at a writable ``address``."""
        chunk = min(size, PMD_SIZE)
        pattern = self.traps(chunk)
        done = 0
        while done < size:
            n = min(chunk, size - done)
            ctypes.memmove(address + done, pattern, n)
            done += n

    def advise_huge(self, address: int, size: int) -> None:
        """``MADV_HUGEPAGE`` where it may help; a hint, so refusals are ignored."""
        if self.huge_pages and size >= PMD_SIZE:
            try:
                self._sys.madvise(address, size, MADV_HUGEPAGE)
            except ExecmemError as exc:
                if _libc.errno_of(exc) not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                    raise

    # -- the verbs ------------------------------------------------------------------------

    def reserve(self, size: int, align: int, capacity: int, window: Window | None = None) -> Region:
        raise NotImplementedError

    def traps(self, size: int) -> bytes:
        """Trap filler of ``size`` bytes (cached)."""
        if len(self._pattern) < size:
            self._pattern = self.spec.trap_bytes(max(size, PMD_SIZE))
        return self._pattern[:size]

    def map(self, region: Region) -> None:
        raise NotImplementedError

    def unmap(self, region: Region) -> None:
        raise NotImplementedError

    def reserve_data(self, size: int, align: int, window: Window | None) -> Region:
        """Zero-filled read+write memory that is never made executable (a data region)."""
        address = self.reserve_va(size, align, RW, MAP_PRIVATE | MAP_ANONYMOUS, 0, window)
        return Region(address, size, write_base=address, data=True)

    def release_data(self, region: Region) -> None:
        Mapper.release(self, region, forked=False)

    def release(self, region: Region, *, forked: bool) -> None:
        if "view" not in region.released_parts:
            self._sys.munmap(region.address, region.size)
            region.released_parts.add("view")

    def write(self, region: Region, offset: int, data: bytes) -> None:
        ctypes.memmove(region.write_base + offset, data, len(data))

    def store(self, region: Region, offset: int, size: int, action: Callable[[int], object]) -> None:
        """Run ``action(address)`` with ``address`` a writable address of ``offset``."""
        action(region.write_base + offset)

    def begin_inplace(self, region: Region, offset: int, size: int) -> None:
        pass

    def end_inplace(self, region: Region, offset: int, size: int) -> None:
        pass

    def owned_ranges(self, region: Region) -> list[Range]:
        """Every address range this region occupies (for W^X audits)."""
        return [] if "view" in region.released_parts else [(region.address, region.size)]

    def describe(self) -> dict[str, object]:
        """The backing, for ``stats()``."""
        return {"kind": "anonymous"}

    def close(self) -> None:
        pass


class DualMapper(Mapper):
    mode = "dual-mapping"

    def __init__(
        self,
        spec: ArchSpec,
        sys_: _libc.Syscalls,
        page_size: int,
        *,
        huge_pages: bool,
        directories: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(spec, sys_, page_size, huge_pages=huge_pages)
        self.backing = Backing(sys_, page_size, directories=directories)

    def reserve(self, size: int, align: int, capacity: int, window: Window | None = None) -> Region:
        s = self._sys
        # hugetlbfs takes no write(2) and no partial mapping: a whole-capacity file
        # with an alias, tried first when large pages are wanted and may be there.
        try_hugetlb = self.huge_pages and capacity % PMD_SIZE == 0 and self.backing.hugetlb_may(capacity)
        first = capacity if try_hugetlb else size
        if capacity > size and window is None:  # room to grow, even while the whole capacity is tried first
            address = self._growable_va(first, align, PROT_NONE, PLACEHOLDER, capacity)
        else:
            address = self.reserve_va(first, align, PROT_NONE, PLACEHOLDER, capacity, window)
        undo: list[Callable[[], None]] = [lambda: s.munmap(address, first)]
        try:
            if try_hugetlb:
                fd = self.backing.try_hugetlb(capacity, scratch=address)
                if fd >= 0:
                    undo.append(lambda: _close_quietly(s, fd))
                    return self._with_alias(address, capacity, fd, undo)
                if first > size:
                    s.munmap(address + size, first - size)
                undo[0] = lambda: s.munmap(address, size)
            fd = self.backing.create(capacity, scratch=address)
            undo.append(lambda: _close_quietly(s, fd))
            self._pwrite_fill(fd, 0, size)
            # Last step: seal (memfd) and reopen read-only for the views (see _backing).
            view_fd = self.backing.view_fd(fd, keep_writable=True)
        except BaseException:
            _undo_all(undo)
            raise
        return Region(address, size, write_base=0, fd=view_fd, rw_fd=fd, capacity=capacity)

    def _with_alias(self, address: int, size: int, fd: int, undo: list[Callable[[], None]]) -> Region:
        """A hugetlb file: written through a read+write alias (``MADV_DONTFORK``)."""
        s = self._sys
        alias = s.mmap(0, size, RW, MAP_SHARED, fd, 0)
        undo.append(lambda: s.munmap(alias, size))
        # A forked child must never be able to write the parent's code.
        s.madvise(alias, size, MADV_DONTFORK)
        self._populate(alias, fd, size)
        self.fill(alias, size)
        # Seal, and swap the read+write descriptor for a read-only one (closing it
        # unless that is the documented fallback).
        view_fd = self.backing.view_fd(fd, keep_writable=False)
        return Region(address, size, write_base=alias, fd=view_fd, hugetlb=True)

    def _populate(self, alias: int, fd: int, size: int) -> None:
        """Allocate the file's pages now, so a full tmpfs fails here, not with SIGBUS."""
        try:
            self._sys.madvise(alias, size, MADV_POPULATE_WRITE)
            return
        except ExecmemError as exc:
            err = _libc.errno_of(exc)
            if err == errno.EFAULT:  # "a SIGBUS would have been generated"
                raise OutOfMemoryError(f"shared memory for executable text is full: {exc}") from None
            if err != errno.EINVAL:  # EINVAL: kernel < 5.14
                raise
        try:
            self._sys.fallocate(fd, 0, 0, size)
        except ExecmemError as exc:
            if _libc.errno_of(exc) not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise

    def _pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """All of ``data`` at ``offset`` (the file's pages are allocated as it goes, so
        a full tmpfs fails here with ENOSPC, never later with SIGBUS)."""
        done = 0
        while done < len(data):
            n = self._sys.pwrite(fd, data[done:] if done else data, offset + done)
            if n <= 0:
                raise OutOfMemoryError(f"pwrite at {offset + done:#x} of the executable text's file wrote nothing")
            done += n

    def _pwrite_fill(self, fd: int, offset: int, size: int) -> None:
        chunk = min(size, PMD_SIZE)
        for at in range(offset, offset + size, chunk):
            self._pwrite(fd, self.traps(min(chunk, offset + size - at)), at)

    def _extend(self, region: Region, end: int, extra: int) -> bool:
        if region.rw_fd < 0:
            return False  # an alias-backed (hugetlb) file has its whole size already
        # The file first: nothing maps that part yet, so traps are all it ever shows.
        self._pwrite_fill(region.rw_fd, region.size, extra)
        if region.mapped:
            return self.claim(end, extra, RX, MAP_SHARED | MAP_POPULATE, region.fd, region.size)
        return self.claim(end, extra, PROT_NONE, PLACEHOLDER)

    def write(self, region: Region, offset: int, data: bytes) -> None:
        if region.rw_fd < 0:
            super().write(region, offset, data)
        elif self._sys.pwrite(region.rw_fd, data, offset) != len(data):  # one call, all but always
            self._pwrite(region.rw_fd, data, offset)  # the rest (rewrites what was written: harmless)

    def store(self, region: Region, offset: int, size: int, action: Callable[[int], object]) -> None:
        """A single-copy-atomic store needs a real store instruction, not ``pwrite``:
        through a one-page read+write window of the file, unmapped right after."""
        if region.rw_fd < 0:
            super().store(region, offset, size, action)
            return
        base = offset - offset % self.page
        window = self._sys.mmap(0, self.page, RW, MAP_SHARED, region.rw_fd, base)
        try:
            action(window + offset - base)
        finally:
            try:
                self._sys.munmap(window, self.page)
            except ExecmemError:
                # The store is done; the window stays owned and goes with the region.
                region.windows.append(window)

    def map(self, region: Region) -> None:
        # MAP_POPULATE: the page tables are filled now (the pages exist already), so
        # first execution takes no page fault and smaps shows the page sizes obtained.
        self._sys.mmap(region.address, region.size, RX, MAP_SHARED | MAP_FIXED | MAP_POPULATE, region.fd, 0)

    def unmap(self, region: Region) -> None:
        self._sys.mmap(region.address, region.size, PROT_NONE, PLACEHOLDER | MAP_FIXED)

    def release(self, region: Region, *, forked: bool) -> None:
        s = self._sys
        errors: list[ExecmemError] = []
        actions: list[tuple[str, Callable[[], None]]] = [("view", lambda: s.munmap(region.address, region.size))]
        if region.write_base and not forked:  # a child has no alias (MADV_DONTFORK): that VA may be someone else's
            actions.append(("alias", lambda: s.munmap(region.write_base, region.size)))
        actions.append(("fd", lambda: s.close(region.fd)))
        for window in region.windows:
            actions.append((f"window {window:#x}", functools.partial(s.munmap, window, self.page)))
        if region.rw_fd >= 0 and region.rw_fd != region.fd:
            actions.append(("rw_fd", lambda: s.close(region.rw_fd)))
        for part, action in actions:
            if part in region.released_parts:
                continue
            try:
                action()
            except ExecmemError as exc:
                errors.append(exc)
                if not part.endswith("fd"):  # Linux releases the fd whatever close returns
                    continue
            region.released_parts.add(part)
        if errors:
            raise errors[0]

    def owned_ranges(self, region: Region) -> list[Range]:
        parts = (("view", region.address), ("alias", region.write_base))
        owned = [(start, region.size) for part, start in parts if start and part not in region.released_parts]
        return owned + [(w, self.page) for w in region.windows if f"window {w:#x}" not in region.released_parts]

    def describe(self) -> dict[str, object]:
        described = self.backing.describe()
        if described["kind"] is None and self.backing.hugetlb_files:
            described["kind"] = "memfd"  # every file so far came from hugetlbfs
        return described


class MprotectMapper(Mapper):
    mode = "mprotect"

    def __init__(self, spec: ArchSpec, sys_: _libc.Syscalls, page_size: int, *, huge_pages: bool) -> None:
        super().__init__(spec, sys_, page_size, huge_pages=huge_pages)
        self.write_unit = page_size

    def reserve(self, size: int, align: int, capacity: int, window: Window | None = None) -> Region:
        address = self.reserve_va(size, align, RW, MAP_PRIVATE | MAP_ANONYMOUS, capacity, window)
        try:
            self.advise_huge(address, size)
            self.fill(address, size)
            self._sys.mprotect(address, size, PROT_NONE)
        except BaseException:
            _undo_all([lambda: self._sys.munmap(address, size)])
            raise
        return Region(address, size, write_base=address, capacity=capacity)

    def _extend(self, region: Region, end: int, extra: int) -> bool:
        with region.lock:
            all_rw = not region.mapped and len(region.rw_pages) * self.page >= region.size
            prot = RW if all_rw else self._base_prot(region)
            # Mapped with the neighbour's protection, so the kernel merges it into the
            # region's VMA (it has no pages yet); made writable only to be filled.
            if not self.claim(end, extra, prot, MAP_PRIVATE | MAP_ANONYMOUS):
                return False
            try:
                if prot != RW:
                    self._sys.mprotect(end, extra, RW)
                self.fill(end, extra)
                if prot != RW:
                    self._sys.mprotect(end, extra, prot)
            except BaseException:
                _undo_all([lambda: self._sys.munmap(end, extra)])
                raise
            if all_rw:
                first = (end - region.address) // self.page
                region.rw_pages.update(range(first, first + extra // self.page))
            return True

    def _base_prot(self, region: Region) -> int:
        return RX if region.mapped else PROT_NONE

    def _protect(self, region: Region, pages: list[int], prot: int) -> None:
        for first, count in _runs(pages):
            self._sys.mprotect(region.address + first * self.page, count * self.page, prot)

    def _pages(self, offset: int, size: int) -> list[int]:
        return list(range(offset // self.page, (offset + max(size, 1) - 1) // self.page + 1))

    def _set_all(self, region: Region, prot: int) -> None:
        """Whole region to ``prot``, except pages held read+write by ``begin_inplace``."""
        held = {p for p, n in region.inplace.items() if n > 0}
        if not held:
            self._sys.mprotect(region.address, region.size, prot)
        else:
            self._protect(region, [p for p in range(region.size // self.page) if p not in held], prot)
        region.rw_pages = held

    def map(self, region: Region) -> None:
        with region.lock:
            self._set_all(region, RX)
            region.mapped = True

    def unmap(self, region: Region) -> None:
        with region.lock:
            self._set_all(region, PROT_NONE)
            region.mapped = False

    def _writable(self, region: Region, offset: int, size: int, action: Callable[[], object]) -> None:
        with region.lock:
            if not region.mapped:
                # Nothing can execute an unmapped reservation: make all of it read+write
                # once (one call, and a large page is not split) until map/unmap.
                if len(region.rw_pages) * self.page < region.size:
                    self._sys.mprotect(region.address, region.size, RW)
                    region.rw_pages = set(range(region.size // self.page))
                action()
                return
            need = [p for p in self._pages(offset, size) if p not in region.rw_pages]
            self._protect(region, need, RW)
            try:
                action()
            finally:
                self._protect(region, need, RX)

    def write(self, region: Region, offset: int, data: bytes) -> None:
        self._writable(region, offset, len(data), lambda: Mapper.write(self, region, offset, data))

    def store(self, region: Region, offset: int, size: int, action: Callable[[int], object]) -> None:
        self._writable(region, offset, size, lambda: action(region.address + offset))

    def begin_inplace(self, region: Region, offset: int, size: int) -> None:
        with region.lock:
            pages = self._pages(offset, size)
            need = [p for p in pages if p not in region.rw_pages]
            self._protect(region, need, RW)
            region.rw_pages.update(need)
            region.inplace.update(pages)

    def end_inplace(self, region: Region, offset: int, size: int) -> None:
        with region.lock:
            done = []
            for page in self._pages(offset, size):
                if region.inplace[page] > 0:
                    region.inplace[page] -= 1
                    if region.inplace[page] == 0:
                        del region.inplace[page]
                        done.append(page)
            self._protect(region, done, self._base_prot(region))
            region.rw_pages.difference_update(done)


class RwxMapper(Mapper):
    mode = "rwx"

    def reserve(self, size: int, align: int, capacity: int, window: Window | None = None) -> Region:
        address = self.reserve_va(size, align, RW, MAP_PRIVATE | MAP_ANONYMOUS, capacity, window)
        try:
            self.advise_huge(address, size)
            self.fill(address, size)
        except BaseException:
            _undo_all([lambda: self._sys.munmap(address, size)])
            raise
        return Region(address, size, write_base=address, capacity=capacity)

    def _extend(self, region: Region, end: int, extra: int) -> bool:
        prot = RW | PROT_EXEC if region.mapped else RW
        if not self.claim(end, extra, prot, MAP_PRIVATE | MAP_ANONYMOUS):
            return False
        try:
            self.fill(end, extra)
        except BaseException:
            _undo_all([lambda: self._sys.munmap(end, extra)])
            raise
        return True

    def map(self, region: Region) -> None:
        self._sys.mprotect(region.address, region.size, RW | PROT_EXEC)

    def unmap(self, region: Region) -> None:
        self._sys.mprotect(region.address, region.size, RW)


#: Constructor by mode name (the names ``NativeBackend(mode=...)`` accepts).
MAPPERS: dict[str, type[Mapper]] = {
    "dual": DualMapper,
    "dual-mapping": DualMapper,
    "mprotect": MprotectMapper,
    "rwx": RwxMapper,
}

__all__ = [
    "MAPPERS",
    "PMD_SIZE",
    "Backing",
    "DualMapper",
    "Mapper",
    "MprotectMapper",
    "Region",
    "RwxMapper",
    "round_up",
]
