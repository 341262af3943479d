"""The three ways the native backend lays out executable memory.

``dual`` (:class:`DualMapper`, the default)
    A shared-memory file (memfd, else a file in ``/dev/shm``, else in the temp dir,
    unlinked at once; see :class:`Backing`) is mapped twice: a read+write *alias* at a
    kernel-chosen address, where every write goes, and a read+execute *view* at the
    reservation's fixed address, installed by ``map`` and replaced by an inaccessible
    anonymous mapping by ``unmap`` (the kernel shoots the TLBs down; the VA stays
    reserved).  No mapping is ever writable and executable.  The alias is
    ``MADV_DONTFORK``, and the view is mapped from a *read-only* descriptor of the
    file (a memfd is also sealed ``F_SEAL_FUTURE_WRITE``): ``mprotect`` cannot make
    the view writable, so a forked child keeps the read+execute view of every text
    but has no way to write the parent's code.  Fallbacks and limits (no ``/proc``,
    kernels before 5.1, ptrace) are in ``_backing``.

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
are wanted), and every failure rolls back what was created before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from execmem._backend import Range
from execmem._errors import ExecmemError, OutOfMemoryError
from execmem._locks import OwnedLock
from execmem.arch import ArchSpec
from execmem.native import _libc
from execmem.native._backing import PMD_SIZE, RX, Backing
from execmem.native._backing import close_quietly as _close_quietly
from execmem.native._libc import (
    MADV_DONTFORK,
    MADV_HUGEPAGE,
    MADV_POPULATE_WRITE,
    MAP_ANONYMOUS,
    MAP_FIXED,
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


def round_up(value: int, align: int) -> int:
    return -(-value // align) * align


@dataclass(eq=False)
class Region:
    """Backend-private state of one reservation (``Reservation.token``)."""

    address: int
    size: int
    #: Where writes land: the alias (dual) or the address itself.
    write_base: int
    #: dual mode: the descriptor views are mapped from - read-only (and the alias
    #: keeps the file) unless the reopen fell back (``_backing``).
    fd: int = -1
    hugetlb: bool = False
    mapped: bool = False
    released: bool = False
    #: mprotect mode: pages (indices) currently read+write, and in-place nesting counts.
    rw_pages: set[int] = field(default_factory=set)
    inplace: Counter[int] = field(default_factory=Counter)
    #: Parts already returned to the system ("view", "alias", "fd"): a release that
    #: failed half way is retried for the rest only (``NativeBackend.close``).
    released_parts: set[str] = field(default_factory=set)
    #: mprotect mode: guards the page protections.  An OwnedLock: a signal handler
    #: writing to this region while the interrupted code toggles its pages gets
    #: BadStateError instead of a deadlock.
    lock: OwnedLock = field(default_factory=lambda: OwnedLock("a region's page protections"), repr=False)


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

    # -- helpers -------------------------------------------------------------------------

    def alignment(self, size: int, align: int) -> int:
        """The alignment actually used: page at least, the PMD when large pages may fit."""
        align = max(align, self.page)
        if self.huge_pages and size >= PMD_SIZE:
            align = max(align, PMD_SIZE)
        return align

    def reserve_va(self, size: int, align: int, prot: int, flags: int) -> int:
        """``size`` bytes at an ``align``-aligned address: over-allocate, trim both ends."""
        span = size + align - self.page
        base = self._sys.mmap(0, span, prot, flags)
        start = round_up(base, align)
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

    def fill(self, address: int, size: int) -> None:
        """Trap-fill ``size`` bytes at a writable ``address``."""
        chunk = min(size, PMD_SIZE)
        if len(self._pattern) < chunk:
            self._pattern = self.spec.trap_bytes(chunk)
        done = 0
        while done < size:
            n = min(chunk, size - done)
            ctypes.memmove(address + done, self._pattern, n)
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

    def reserve(self, size: int, align: int) -> Region:
        raise NotImplementedError

    def map(self, region: Region) -> None:
        raise NotImplementedError

    def unmap(self, region: Region) -> None:
        raise NotImplementedError

    def release(self, region: Region, *, forked: bool) -> None:
        if "view" not in region.released_parts:
            self._sys.munmap(region.address, region.size)
            region.released_parts.add("view")

    def write(self, region: Region, offset: int, data: bytes) -> None:
        ctypes.memmove(region.write_base + offset, data, len(data))

    def store(self, region: Region, offset: int, size: int, action: Callable[[int], object]) -> None:
        """Run ``action(address)`` with ``address`` the writable alias of ``offset``."""
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

    def reserve(self, size: int, align: int) -> Region:
        s = self._sys
        undo: list[Callable[[], None]] = []
        try:
            address = self.reserve_va(size, align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)
            undo.append(lambda: s.munmap(address, size))
            wants_hugetlb = self.huge_pages and size % PMD_SIZE == 0
            fd, hugetlb = self.backing.create(size, hugetlb=wants_hugetlb, scratch=address)
            undo.append(lambda: _close_quietly(s, fd))
            alias = s.mmap(0, size, RW, MAP_SHARED, fd, 0)
            undo.append(lambda: s.munmap(alias, size))
            # A forked child must never be able to write the parent's code.
            s.madvise(alias, size, MADV_DONTFORK)
            if not hugetlb:
                self.advise_huge(alias, size)
            self._populate(alias, fd, size)
            self.fill(alias, size)
            # Last step: seal (memfd) and swap the read+write descriptor for a read-only
            # one, so the views cannot be made writable (see _backing).  On error the
            # read+write fd is still open (closed by the undo list); on success it is
            # closed unless it is the documented fallback.
            view_fd = self.backing.view_fd(fd, hugetlb=hugetlb)
        except BaseException:
            _undo_all(undo)
            raise
        return Region(address, size, write_base=alias, fd=view_fd, hugetlb=hugetlb)

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

    def map(self, region: Region) -> None:
        # MAP_POPULATE: the page tables are filled now (the pages exist already), so
        # first execution takes no page fault and smaps shows the page sizes obtained.
        self._sys.mmap(region.address, region.size, RX, MAP_SHARED | MAP_FIXED | MAP_POPULATE, region.fd, 0)

    def unmap(self, region: Region) -> None:
        self._sys.mmap(region.address, region.size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE)

    def release(self, region: Region, *, forked: bool) -> None:
        s = self._sys
        errors: list[ExecmemError] = []
        actions: list[tuple[str, Callable[[], None]]] = [("view", lambda: s.munmap(region.address, region.size))]
        if not forked:  # a child has no alias (MADV_DONTFORK): that VA may be someone else's
            actions.append(("alias", lambda: s.munmap(region.write_base, region.size)))
        actions.append(("fd", lambda: s.close(region.fd)))
        for part, action in actions:
            if part in region.released_parts:
                continue
            try:
                action()
            except ExecmemError as exc:
                errors.append(exc)
                if part != "fd":  # Linux releases the fd whatever close returns
                    continue
            region.released_parts.add(part)
        if errors:
            raise errors[0]

    def owned_ranges(self, region: Region) -> list[Range]:
        parts = (("view", region.address), ("alias", region.write_base))
        return [(start, region.size) for part, start in parts if part not in region.released_parts]

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

    def reserve(self, size: int, align: int) -> Region:
        address = self.reserve_va(size, align, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        try:
            self.advise_huge(address, size)
            self.fill(address, size)
            self._sys.mprotect(address, size, PROT_NONE)
        except BaseException:
            _undo_all([lambda: self._sys.munmap(address, size)])
            raise
        return Region(address, size, write_base=address)

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

    def reserve(self, size: int, align: int) -> Region:
        address = self.reserve_va(size, align, RW, MAP_PRIVATE | MAP_ANONYMOUS)
        try:
            self.advise_huge(address, size)
            self.fill(address, size)
        except BaseException:
            _undo_all([lambda: self._sys.munmap(address, size)])
            raise
        return Region(address, size, write_base=address)

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
