"""The shared-memory files behind dual mapping (:class:`Backing`).

Each reservation of ``dual`` mode is one file, mapped read+execute at the text's
address (the *view*) and written with ``pwrite`` (a hugetlbfs file, which has no
``write``, through a read+write alias).  This module creates the file and makes sure
the view cannot be turned writable:

* **read-only descriptor** - the view is mapped from a descriptor opened
  ``O_RDONLY`` (``/proc/self/fd/N`` reopened).  A ``MAP_SHARED`` mapping of a
  read-only descriptor lacks ``VM_MAYWRITE``, so ``mprotect(view, PROT_WRITE)``
  fails with ``EACCES`` in this process and in any forked child.  Fallback, counted
  in ``stats()["backing_detail"]["views"]``: when ``/proc`` is not mounted or the
  reopen is refused (ENOENT, EACCES, EPERM, ENXIO, ENOTDIR), the view is mapped
  from the read+write descriptor, and *can* be made writable by code of this
  process or of a forked child.
* **seals** (memfd only) - ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``: the file
  cannot be truncated under the view (which would turn execution into SIGBUS).  A
  hugetlb file, written through its alias, is also sealed ``F_SEAL_FUTURE_WRITE``
  once the alias exists: no new writable mapping and no ``write(2)``.  Kernels older
  than 5.1 reject that seal with EINVAL: the backend then stops using it
  (``backing_detail["sealing"]`` says so).  Files in ``/dev/shm`` or the temp dir
  cannot be sealed.

The read+write descriptor stays open for ``pwrite``; a forked child inherits it (as
it inherits every descriptor; ``O_CLOEXEC`` closes it at ``exec``), and code of the
child that deliberately writes through it changes the parent's text: the backend
itself refuses to work in a child.

Not guaranteed: a process of the same user can always ``ptrace`` this one (or write
``/proc/<pid>/mem``) and change anything, and this process can always write its own
code with ``pwrite`` - W^X is about mappings, not about trust.

Large pages: with ``hugetlb`` requested, ``MFD_HUGETLB`` is tried first (whole
packs only: see ``DualMapper.reserve``) and
``fallocate`` reserves the huge pages, so that a system without enough of them fails
cleanly here instead of with SIGBUS later.  Only failures that mean *the host* lacks
huge pages make hugetlb ``unavailable`` for the backend's life (``memfd_create``
refusing ``MFD_HUGETLB``, ``fallocate`` unsupported, the executable probe refused,
or no free huge page even for the smallest size); a failure that concerns one size
(too few free pages for it, an invalid length, a refused call) only skips hugetlb
for that size and larger.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile

from execmem._errors import ExecmemError, SystemCallError
from execmem._locks import OwnedLock, SetupLock
from execmem.native import _libc
from execmem.native._libc import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_NORESERVE,
    MAP_PRIVATE,
    MAP_SHARED,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
)

RX = PROT_READ | PROT_EXEC
#: The x86-64/arm64(4K)/riscv64 PMD size: the smallest hugetlb page used here.
PMD_SIZE = 2 << 20

#: errnos after which another backing is tried (anything else is a real failure).
BACKING_FALLBACK = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EACCES, errno.ENOENT, errno.EROFS, errno.ENODEV, errno.EOPNOTSUPP}
)
#: errnos of the read-only reopen after which the read+write descriptor is kept.
REOPEN_FALLBACK = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENOTDIR})
#: The seals of a hugetlb memfd once its alias exists (see the module docstring).
SEALS = _libc.F_SEAL_FUTURE_WRITE | _libc.F_SEAL_SHRINK | _libc.F_SEAL_GROW | _libc.F_SEAL_SEAL
SEALED = "F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL"
#: The seals of a memfd written with ``pwrite``: its size is fixed, its contents not.
SEALS_WRITABLE = _libc.F_SEAL_SHRINK | _libc.F_SEAL_GROW | _libc.F_SEAL_SEAL
SEALED_WRITABLE = "F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL"


def close_quietly(sys_: _libc.Syscalls, fd: int) -> None:
    """Close during cleanup: Linux releases the fd even when close reports an error."""
    with contextlib.suppress(ExecmemError):
        sys_.close(fd)


class Backing:
    """Chooses and creates the shared-memory files of dual mapping.

    Order: ``memfd_create("execmem", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC)``
    (without ``MFD_EXEC`` on kernels older than 6.3, which reject it with EINVAL),
    then a file in ``/dev/shm``, then one in the temp dir (``$TMPDIR``), each
    unlinked right after ``open``.  The first file of each kind is probed with a
    read+execute mapping, which fails on a ``noexec`` mount (or under
    ``vm.memfd_noexec``).  The kind is chosen once per backend; ``notes`` says why
    earlier kinds were passed over.  :meth:`view_fd` seals and reopens read-only.
    """

    def __init__(self, sys_: _libc.Syscalls, page_size: int, *, directories: tuple[str, ...] | None = None) -> None:
        self._sys = sys_
        self._page = page_size
        # OwnedLock: the selection makes system calls and changes several fields; a
        # signal handler reserving from this backend meanwhile gets BadStateError.
        self._lock = OwnedLock("the dual-mapping backing")
        # The view counters: a SetupLock (re-entrant), since a nested increment from a
        # signal handler is harmless and view_fd must not fail once the fd is swapped.
        self._counts_lock = SetupLock("the dual-mapping view counters")
        self._memfd_flags = _libc.MFD_CLOEXEC | _libc.MFD_ALLOW_SEALING | _libc.MFD_EXEC
        self.kind: str | None = None
        self.directory: str | None = None
        self.notes: list[str] = []
        self.hugetlb = "not tried"
        self.hugetlb_files = 0
        #: The smallest size for which too few huge pages were free (later requests of
        #: at least that size skip hugetlb), and the latest size-specific refusal.
        self.hugetlb_short_from: int | None = None
        self.hugetlb_note: str | None = None
        self.sealing = "not tried"
        self._seals_used: dict[str, None] = {}  # the seal sets applied so far, in order
        self._future_write_refused = ""
        self.read_only_views = 0
        self.writable_fd_views = 0
        self.view_fallback: str | None = None
        self._candidates: tuple[tuple[str, str | None], ...] = (
            ("memfd", None),
            ("shm", "/dev/shm"),
            ("tmpfile", tempfile.gettempdir()),
        )
        if directories is not None:  # tests and embedders may pin the file fallbacks
            self._candidates = (("memfd", None), *((f"dir:{d}", d) for d in directories))

    def hugetlb_may(self, size: int) -> bool:
        if self.hugetlb.startswith("unavailable") or self.kind not in (None, "memfd"):
            return False
        return self.hugetlb_short_from is None or size < self.hugetlb_short_from

    def create(self, size: int, *, scratch: int) -> int:
        """A new file of ``size`` bytes (ordinary pages), read+write.

        ``scratch`` is inaccessible address space of at least a page that the caller
        owns: the executable probe of the first file is mapped there (and put back
        inaccessible), so a failure can never leave a probe mapping behind.
        """
        with self._lock:
            if self.kind is None:
                return self._select(size, scratch)
            kind, directory = self.kind, self.directory
        return self._create(kind, directory, size)

    def view_fd(self, fd: int, *, keep_writable: bool) -> int:
        """The descriptor to map views from, once the file has its first contents.

        Seals a memfd, then reopens ``fd`` read-only.  ``keep_writable``: the caller
        goes on writing with ``pwrite`` through ``fd`` (sealed ``SEALS_WRITABLE``);
        otherwise its alias is the only writer left (sealed ``SEALS``) and ``fd`` is
        closed.  Returns the read-only descriptor, or ``fd`` itself after a
        documented fallback.  On error ``fd`` is still open and nothing else is (the
        caller rolls back)."""
        seals, name = (SEALS_WRITABLE, SEALED_WRITABLE) if keep_writable else (SEALS, SEALED)
        if self.kind == "memfd" or not keep_writable:  # hugetlb files are memfds too
            self._seal(fd, seals, name)
        try:
            read_only = self._sys.open(f"/proc/self/fd/{fd}".encode(), _libc.O_RDONLY | _libc.O_CLOEXEC, 0)
        except ExecmemError as exc:
            if _libc.errno_of(exc) not in REOPEN_FALLBACK:
                raise
            with self._counts_lock:
                self.writable_fd_views += 1
                self.view_fallback = f"view mapped from the read+write descriptor (/proc not mounted?): {exc}"
            return fd
        with self._counts_lock:  # never raises: fd must not be closed twice on error
            self.read_only_views += 1
        if not keep_writable:
            close_quietly(self._sys, fd)  # the alias keeps the file; the fd is released anyway
        return read_only

    def _seal(self, fd: int, seals: int, name: str) -> None:
        future_write = bool(seals & _libc.F_SEAL_FUTURE_WRITE)
        if future_write and self._future_write_refused:
            return
        try:
            self._sys.fcntl(fd, _libc.F_ADD_SEALS, seals)
        except ExecmemError as exc:
            if _libc.errno_of(exc) != errno.EINVAL or not future_write:
                raise
            self._future_write_refused = f"unsupported (F_SEAL_FUTURE_WRITE needs Linux 5.1): {exc}"
        else:
            self._seals_used.setdefault(name)
        described = [*self._seals_used, *([self._future_write_refused] if self._future_write_refused else [])]
        self.sealing = "; ".join(described)

    def _memfd(self, extra: int) -> int:
        try:
            return self._sys.memfd_create(b"execmem", self._memfd_flags | extra)
        except ExecmemError as exc:
            if _libc.errno_of(exc) != errno.EINVAL or not self._memfd_flags & _libc.MFD_EXEC:
                raise
            self._memfd_flags &= ~_libc.MFD_EXEC
            self.notes.append("memfd_create: MFD_EXEC unknown to this kernel (< 6.3), retried without")
            return self._sys.memfd_create(b"execmem", self._memfd_flags | extra)

    def _file(self, directory: str) -> int:
        path = os.path.join(directory, f"execmem-{os.getpid()}-{secrets.token_hex(8)}").encode()
        flags = _libc.O_RDWR | _libc.O_CREAT | _libc.O_EXCL | _libc.O_CLOEXEC | _libc.O_NOFOLLOW
        fd = self._sys.open(path, flags, 0o600)
        try:
            self._sys.unlink(path)  # nothing outlives the process, nobody else opens it
        except BaseException:
            close_quietly(self._sys, fd)
            raise
        return fd

    def _create(self, kind: str, directory: str | None, size: int) -> int:
        fd = self._memfd(0) if directory is None else self._file(directory)
        try:
            self._sys.ftruncate(fd, size)
        except BaseException:
            close_quietly(self._sys, fd)
            raise
        return fd

    def _probe_exec(self, fd: int, length: int, scratch: int) -> None:
        self._sys.mmap(scratch, length, RX, MAP_SHARED | MAP_FIXED, fd, 0)
        self._sys.mmap(scratch, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE)

    def _select(self, size: int, scratch: int) -> int:
        for kind, directory in self._candidates:
            if directory is not None and not os.path.isdir(directory):
                self.notes.append(f"{kind}: {directory} does not exist")
                continue
            try:
                fd = self._create(kind, directory, size)
            except ExecmemError as exc:
                if _libc.errno_of(exc) not in BACKING_FALLBACK:
                    raise
                self.notes.append(f"{kind}: {exc}")
                continue
            try:
                self._probe_exec(fd, self._page, scratch)
            except ExecmemError as exc:
                close_quietly(self._sys, fd)
                if _libc.errno_of(exc) not in BACKING_FALLBACK:
                    raise
                self.notes.append(f"{kind}: cannot be mapped executable (noexec?): {exc}")
                continue
            self.kind, self.directory = kind, directory
            return fd
        raise SystemCallError(errno.EACCES, "no executable shared memory: " + "; ".join(self.notes))

    def try_hugetlb(self, size: int, scratch: int) -> int:
        """A hugetlb memfd of ``size`` bytes, or -1 (ordinary pages follow).  Raises
        only when the probe could not put ``scratch`` back inaccessible: the caller
        then releases the scratch address space, which also removes the probe."""
        try:
            fd = self._memfd(_libc.MFD_HUGETLB)
        except ExecmemError as exc:
            if _libc.errno_of(exc) in BACKING_FALLBACK:  # no hugetlbfs (or not for memfd)
                self.hugetlb = f"unavailable: {exc}"
            else:  # EMFILE, ENOMEM...: this attempt, not the host
                self.hugetlb_note = f"not used for {size} bytes: {exc}"
            return -1
        step = "ftruncate"
        try:
            self._sys.ftruncate(fd, size)
            step = "fallocate"
            self._sys.fallocate(fd, 0, 0, size)
            if self.hugetlb_files == 0:
                step = "probe"
                self._sys.mmap(scratch, size, RX, MAP_SHARED | MAP_FIXED, fd, 0)
                step = "restore"
                self._sys.mmap(scratch, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE)
        except ExecmemError as exc:
            close_quietly(self._sys, fd)
            if step == "restore":
                raise
            self._hugetlb_refused(step, size, exc)
            return -1
        self.hugetlb = "in use"
        self.hugetlb_files += 1
        return fd

    def _hugetlb_refused(self, step: str, size: int, exc: ExecmemError) -> None:
        err = _libc.errno_of(exc)
        host_lacks = (
            (step == "fallocate" and err in (errno.EOPNOTSUPP, errno.ENOSYS))
            or (step == "probe" and err in BACKING_FALLBACK)
            or (step == "fallocate" and err in (errno.ENOSPC, errno.ENOMEM) and size <= PMD_SIZE)
        )
        if host_lacks:
            self.hugetlb = f"unavailable: {exc}"
            return
        if step == "fallocate" and err in (errno.ENOSPC, errno.ENOMEM):  # too few free huge pages
            short = self.hugetlb_short_from
            self.hugetlb_short_from = size if short is None else min(short, size)
        self.hugetlb_note = f"not used for {size} bytes: {exc}"

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "directory": self.directory,
            "memfd_exec_flag": bool(self._memfd_flags & _libc.MFD_EXEC) if self.kind == "memfd" else None,
            "hugetlb": self.hugetlb,
            "hugetlb_short_from_bytes": self.hugetlb_short_from,
            "hugetlb_note": self.hugetlb_note,
            "sealing": self.sealing,
            "views": {
                "read_only_fd": self.read_only_views,
                "read_write_fd": self.writable_fd_views,
                "fallback": self.view_fallback,
            },
            "notes": list(self.notes),
        }


__all__ = [
    "BACKING_FALLBACK",
    "PMD_SIZE",
    "REOPEN_FALLBACK",
    "RX",
    "SEALED",
    "SEALED_WRITABLE",
    "SEALS",
    "SEALS_WRITABLE",
    "Backing",
    "close_quietly",
]
