"""fork: a child keeps the code it inherited, as it was at fork, and nothing writable.

A dual-mode view is a shared mapping of a file the parent goes on writing: without
this module, a forked child's inherited callables would run the parent's *current*
code (its updates; after its free, trap filler: SIGTRAP), and the child would hold the
parent's read+write descriptors.  Around ``os.fork()`` (``os.register_at_fork``):

* **before, in the parent**: each live native backend's *gate* is taken (its writes,
  atomic stores, maps, growth and releases hold it: one in progress finishes first,
  none starts), and each executable view of a shared file is copied into a fresh
  private anonymous mapping, filled read+write and then made read+execute (never
  both), with the architecture's cache maintenance (``publish_fresh``'s steps between
  write and map) run over it: the *snapshot*;
* **after, in the child**: each snapshot is moved over its view by one
  ``mremap(MREMAP_MAYMOVE | MREMAP_FIXED)`` (the child's copy of it costs nothing:
  copy-on-write pages nobody writes); every descriptor of the parent's files is
  closed and any leftover write window unmapped.  The child's hook makes only these
  calls and allocates nothing in proportion to the code;
* **after, in the parent**: the snapshots are unmapped and the gates released.

The parent copies (not the child) because the gates must be held until the copy is
complete: a write the parent makes after ``fork()`` returns can never reach the
child's snapshot.  The cost, a copy of every mapped view and four system calls per
view in the parent, is measured by ``execmem bench``.

mprotect and rwx modes keep code in private anonymous memory, which fork copies
already; the gate only ensures no page is caught read+write in the middle of a write.

Degraded cases, reported in the child's ``stats()["fork"]``: a snapshot the parent
could not make (out of memory, or a gate still busy after :data:`GATE_WAIT` seconds,
e.g. a fork from a signal handler that interrupted another thread's use) is copied
by the child itself, which may then see writes the parent made after the fork; a
view that cannot be replaced at all stays shared.  A fork that bypasses Python's
hooks (C code calling ``fork(2)`` directly) gets none of this.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from execmem._errors import ExecmemError
from execmem.native import _libc
from execmem.native._mapping import Region

if TYPE_CHECKING:
    from execmem.native._native import NativeBackend

RW = _libc.PROT_READ | _libc.PROT_WRITE
RX = _libc.PROT_READ | _libc.PROT_EXEC
#: How a snapshot is mapped (before it is filled and made read+execute).
SNAPSHOT_FLAGS = _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS | _libc.MAP_POPULATE
#: Seconds ``fork()`` waits for a backend's gate before leaving it to the child.
GATE_WAIT = 1.0
#: Recipe steps that are not cache maintenance of the snapshot's new pages.
_NOT_MAINTENANCE = frozenset({"write", "map", "local_cse", "remote_cse"})


@dataclass
class ForkReport:
    """What happened to one backend's views at the last fork (the child's ``stats()``)."""

    views: int = 0
    bytes: int = 0
    moved: int = 0
    copied_in_child: int = 0
    left_shared: list[str] = field(default_factory=list)
    descriptors_closed: int = 0
    windows_unmapped: int = 0
    parent_notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "views": self.views,
            "bytes": self.bytes,
            "moved": self.moved,
            "copied_in_child": self.copied_in_child,
            "left_shared": list(self.left_shared),
            "descriptors_closed": self.descriptors_closed,
            "windows_unmapped": self.windows_unmapped,
            "notes": list(self.parent_notes),
        }


@dataclass
class _Snapshot:
    region: Region
    temp: int = 0  # the private copy in the parent; 0 if it could not be made
    error: str = ""


@dataclass
class _Entry:
    backend: NativeBackend
    gated: bool
    snapshots: list[_Snapshot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_backends: weakref.WeakSet[NativeBackend] = weakref.WeakSet()
#: What ``_before`` did, per forking thread (the three hooks of one fork run in the
#: thread that called it; two threads may fork at once).
_forking = threading.local()


def _entries() -> list[_Entry]:
    entries: list[_Entry] | None = getattr(_forking, "entries", None)
    if entries is None:
        entries = _forking.entries = []
    return entries


def register(backend: NativeBackend) -> None:
    """Take part in every later fork (weakly: a dropped backend leaves by itself)."""
    _backends.add(backend)


def shared_views(backend: NativeBackend) -> list[Region]:
    """The regions whose executable view maps a file this process goes on writing."""
    return [r for r in backend._fork_regions() if r.fd >= 0 and r.mapped and "view" not in r.released_parts]


def copy_view(sys_: _libc.Syscalls, region: Region) -> int:
    """A private read+execute copy of ``region``'s view, W^X throughout."""
    size = region.size
    # MAP_POPULATE: the pages are made in one pass, not by a fault per page (a third
    # less time for a 2 MiB pack here).
    temp = sys_.mmap(0, size, RW, SNAPSHOT_FLAGS)
    try:
        ctypes.memmove(temp, region.address, size)
        sys_.mprotect(temp, size, RX)
    except BaseException:
        with contextlib.suppress(ExecmemError):  # the first error is the one to report
            sys_.munmap(temp, size)
        raise
    return temp


def _before() -> None:
    for backend in list(_backends):
        if backend._closed or backend.forked:
            continue
        gated = backend._gate.acquire(timeout=GATE_WAIT)
        entry = _Entry(backend, gated)
        _entries().append(entry)
        if not gated:
            entry.notes.append(f"the backend was busy for {GATE_WAIT:g} s at fork: views copied by the child")
            continue
        try:
            regions = shared_views(backend)
            for region in regions:
                snap = _Snapshot(region)
                try:
                    snap.temp = copy_view(backend._sys, region)
                except ExecmemError as exc:
                    snap.error = str(exc)
                entry.snapshots.append(snap)
            _maintain(backend, [(s.temp, s.region.size) for s in entry.snapshots if s.temp])
        except Exception as exc:  # a fork hook must not raise; the child copies instead
            entry.notes.append(f"snapshot failed in the parent: {exc}")
            for snap in entry.snapshots:
                if snap.temp:
                    with contextlib.suppress(ExecmemError):
                        backend._sys.munmap(snap.temp, snap.region.size)
                    snap.temp, snap.error = 0, str(exc)


def _maintain(backend: NativeBackend, ranges: list[tuple[int, int]]) -> None:
    """The cache maintenance fresh code needs before it runs (none on x86-64)."""
    recipe = backend.arch.publish_fresh
    if not ranges or all(step.name in _NOT_MAINTENANCE for step in recipe.steps):
        return
    sync = backend._synchronizer()
    for step in recipe.effective(sync.features):
        if step.name not in _NOT_MAINTENANCE:
            sync.run(step.name, ranges)


def _after_in_parent() -> None:
    entries = _entries()
    for entry in entries:
        for snap in entry.snapshots:
            if snap.temp:
                try:
                    entry.backend._sys.munmap(snap.temp, snap.region.size)
                except ExecmemError:
                    entry.backend._fork_leaks.append((snap.temp, snap.region.size))
        if entry.gated:
            entry.backend._gate.release()
    entries.clear()


def _after_in_child() -> None:
    for backend in list(_backends):
        backend._gate = threading.RLock()  # whoever held it in the parent is gone
    entries = _entries()
    for entry in entries:
        backend = entry.backend
        try:
            backend._fork_report = _adopt(entry)
        except Exception as exc:  # never raise from a fork hook
            backend._fork_report = ForkReport(left_shared=[f"fork handling failed: {exc}"])
    entries.clear()


def _adopt(entry: _Entry) -> ForkReport:
    """In the child: the snapshots over the views, the parent's descriptors closed."""
    backend, sys_ = entry.backend, entry.backend._sys
    report = ForkReport(parent_notes=list(entry.notes))
    snapshots = entry.snapshots if entry.gated else [_Snapshot(r) for r in shared_views(backend)]
    for snap in snapshots:
        region = snap.region
        report.views += 1
        report.bytes += region.size
        temp = snap.temp
        if not temp:
            try:
                temp = copy_view(sys_, region)  # may see the parent's later writes
            except ExecmemError as exc:
                report.left_shared.append(f"{region.address:#x}: {snap.error or exc}")
                continue
            try:
                _maintain(backend, [(temp, region.size)])
            except Exception as exc:
                report.left_shared.append(f"{region.address:#x}: {exc}")
                with contextlib.suppress(ExecmemError):
                    sys_.munmap(temp, region.size)
                continue
            report.copied_in_child += 1
        try:
            sys_.mremap(temp, region.size, region.size, _libc.MREMAP_MAYMOVE | _libc.MREMAP_FIXED, region.address)
        except ExecmemError as exc:
            report.left_shared.append(f"{region.address:#x}: {exc}")
            with contextlib.suppress(ExecmemError):
                sys_.munmap(temp, region.size)
            continue
        report.moved += 1
    for region in backend._fork_regions():
        _drop_writable(sys_, region, backend.page_size, report)
    return report


def _drop_writable(sys_: _libc.Syscalls, region: Region, page: int, report: ForkReport) -> None:
    """Close the parent's descriptors of ``region`` and unmap its write windows."""
    for part, fd in (("fd", region.fd), ("rw_fd", region.rw_fd)):
        if fd >= 0 and part not in region.released_parts and (part == "fd" or fd != region.fd):
            with contextlib.suppress(ExecmemError):  # Linux releases it whatever close returns
                sys_.close(fd)
            region.released_parts.add(part)
            report.descriptors_closed += 1
    for window in region.windows:
        name = f"window {window:#x}"
        if name not in region.released_parts:
            try:
                sys_.munmap(window, page)
                region.released_parts.add(name)
                report.windows_unmapped += 1
            except ExecmemError:
                pass


os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)

__all__ = ["GATE_WAIT", "SNAPSHOT_FLAGS", "ForkReport", "copy_view", "register", "shared_views"]
