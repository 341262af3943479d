"""The one door to the kernel: every memory and synchronization system call of the
native backend goes through :func:`Syscalls._call`.

Why one door:

* **accounting** - each call is counted by name, per backend (a :class:`Syscalls`
  instance) and per process (:func:`totals`), so ``stats()`` can say what a publish
  costs in system calls;
* **fault injection** - :func:`inject` makes chosen calls fail with a chosen errno,
  so every fallback and rollback path is tested on any machine (memfd refused,
  ``/dev/shm`` mounted noexec, membarrier missing or unregistered, ENOMEM...);
* **errors** - a failure becomes :class:`~execmem.SystemCallError` (or
  :class:`~execmem.OutOfMemoryError` when the system refused memory or a limit was
  reached) carrying ``errno`` and a message naming the call and its arguments.

``fcntl`` is bound in its integer-argument form only (``F_ADD_SEALS``/``F_GET_SEALS``).
The calls go through glibc with ``ctypes`` (``use_errno=True``), but for ``pwrite``,
the call of every publish, which goes through ``os.pwrite`` (half the cost of a ctypes
call); the two that glibc does not wrap everywhere (``membarrier``,
``riscv_flush_icache``) go through ``syscall(2)`` with numbers from a per-host table,
and ``clone`` is made by the architecture's ``probe_membarrier`` routine
(``fork_probe``).  The constants below are the Linux UAPI values, identical on x86-64,
arm64 and riscv64 (asm-generic).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import functools
import os
import platform
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from execmem._errors import ExecmemError, OutOfMemoryError, SystemCallError, UnsupportedError
from execmem._locks import SetupLock

# --- <sys/mman.h> -----------------------------------------------------------------
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_FIXED_NOREPLACE = 0x100000  # Linux 4.17; older kernels take the address as a hint
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MAP_FAILED = ctypes.c_void_p(-1).value
MADV_DONTFORK = 10
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14: prefault writable, report SIGBUS-worthy failures
# --- <linux/memfd.h> --------------------------------------------------------------
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_EXEC = 0x0010  # Linux 6.3; older kernels reject unknown flags with EINVAL
# --- <fcntl.h> --------------------------------------------------------------------
O_RDONLY = os.O_RDONLY
O_RDWR = os.O_RDWR
O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL
O_CLOEXEC = os.O_CLOEXEC
O_NOFOLLOW = os.O_NOFOLLOW
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; older kernels reject it with EINVAL
# --- <linux/membarrier.h> ---------------------------------------------------------
MEMBARRIER_CMD_QUERY = 0
MEMBARRIER_CMD_GLOBAL = 1 << 0
MEMBARRIER_CMD_PRIVATE_EXPEDITED = 1 << 3
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED = 1 << 4
MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 5
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE = 1 << 6

#: Numbers of the system calls reached through ``syscall(2)``, per host machine
#: (``uname -m``).  arm64 and riscv64 share the asm-generic table; 259 is riscv's
#: ``__NR_arch_specific_syscall + 15``.
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"membarrier": 324, "memfd_create": 319},
    "aarch64": {"membarrier": 283, "memfd_create": 279},
    "arm64": {"membarrier": 283, "memfd_create": 279},
    "riscv64": {"membarrier": 283, "memfd_create": 279, "riscv_flush_icache": 259},
}

#: errnos that mean "the system refused memory or a limit was reached".
_OUT_OF_MEMORY = frozenset({_errno.ENOMEM, _errno.EMFILE, _errno.ENFILE, _errno.ENOSPC})

_libc = ctypes.CDLL(None, use_errno=True)


def _bind(name: str, restype: object, *argtypes: object) -> Callable[..., int]:
    fn = getattr(_libc, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn  # type: ignore[no-any-return]


_c_void_p, _c_size_t, _c_int, _c_long = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
_mmap = _bind("mmap", _c_void_p, _c_void_p, _c_size_t, _c_int, _c_int, _c_int, _c_long)
_munmap = _bind("munmap", _c_int, _c_void_p, _c_size_t)
_mprotect = _bind("mprotect", _c_int, _c_void_p, _c_size_t, _c_int)
_madvise = _bind("madvise", _c_int, _c_void_p, _c_size_t, _c_int)
_open = _bind("open", _c_int, ctypes.c_char_p, _c_int, _c_int)
_unlink = _bind("unlink", _c_int, ctypes.c_char_p)
_close = _bind("close", _c_int, _c_int)
_ftruncate = _bind("ftruncate", _c_int, _c_int, _c_long)
_fcntl = _bind("fcntl", _c_int, _c_int, _c_int, _c_int)  # the int-argument form only
_fallocate = _bind("fallocate", _c_int, _c_int, _c_int, _c_long, _c_long)
# pwrite is the one call of every publish: Python's own wrapper costs half what a
# ctypes call does (0.7 against 1.5 us here); it raises OSError, which _call handles.
_pwrite = os.pwrite
# mremap is variadic (new_address only with MREMAP_FIXED); glibc reads the fifth
# argument where a fixed fifth argument is passed on x86-64, arm64 and riscv64.
_mremap = _bind("mremap", _c_void_p, _c_void_p, _c_size_t, _c_size_t, _c_int, _c_void_p)
_waitpid = _bind("waitpid", _c_int, _c_int, ctypes.POINTER(_c_int), _c_int)
_kill = _bind("kill", _c_int, _c_int, _c_int)
# syscall(2) is variadic; it is called with plain ints only (no argtypes): ctypes
# passes them as C ints (each syscall argument here is small), sign-extended to
# registers by libffi, without making a ctypes object per call (the hot path: the
# membarrier of every publish).
_syscall = _libc.syscall
_syscall.restype = _c_long
_memfd_create: Callable[..., int] | None
try:
    _memfd_create = _bind("memfd_create", _c_int, ctypes.c_char_p, ctypes.c_uint)
except AttributeError:  # glibc < 2.27: use syscall(2)
    _memfd_create = None


def syscall_number(name: str) -> int:
    """The number of ``name`` on this host, or :class:`UnsupportedError`."""
    table = SYSCALL_NUMBERS.get(platform.machine().lower(), {})
    try:
        return table[name]
    except KeyError:
        raise UnsupportedError(f"no system call {name!r} known on {platform.machine()}") from None


# --- fault injection ------------------------------------------------------------------


@dataclass
class Fault:
    """One injected failure rule (see :func:`inject`); ``fired`` counts failures made."""

    name: str
    errno: int
    after: int = 0
    times: int | None = None
    when: Callable[[tuple[object, ...]], bool] | None = None
    seen: int = 0
    fired: int = 0

    def _should_fire(self, name: str, args: tuple[object, ...]) -> bool:
        if name != self.name or (self.when is not None and not self.when(args)):
            return False
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


#: Calls whose effect happens even when they report an error: Linux releases the fd
#: in ``close`` whatever it returns, so an injected failure releases it too.
_EFFECTIVE_EVEN_ON_ERROR = frozenset({"close"})

_faults: list[Fault] = []
#: Guards the fault list, and the tallies while faults are injected (without faults
#: they are counted without it: ``Syscalls._call``).  Re-entrant (``SetupLock``), not
#: refusing: a signal handler that makes a system call while the interrupted thread is in
#: ``_call`` can safely complete its own call inside it (nothing here spans a system
#: call); at worst a count taken at that very moment is lost.  Reset in a forked child.
_lock = SetupLock("execmem.native._libc accounting")
_totals: Counter[str] = Counter()


@contextlib.contextmanager
def inject(
    name: str,
    err: int,
    *,
    after: int = 0,
    times: int | None = None,
    when: Callable[[tuple[object, ...]], bool] | None = None,
) -> Iterator[Fault]:
    """Test seam: make calls named ``name`` fail with ``err`` inside the ``with`` block.

    The first ``after`` matching calls succeed, then ``times`` of them fail (all of them
    when ``None``).  ``when`` filters on the call's arguments (e.g. only ``mmap`` with
    ``PROT_EXEC``).  A failing call is counted like a real one but never reaches the
    kernel.  Process-wide: use it from one thread.
    """
    fault = Fault(name, err, after=after, times=times, when=when)
    with _lock:
        _faults.append(fault)
    try:
        yield fault
    finally:
        with _lock:
            _faults.remove(fault)


def totals() -> dict[str, int]:
    """System calls made by every backend of this process, by name."""
    with _lock:
        return dict(_totals)


def errno_of(exc: BaseException) -> int | None:
    """The errno an execmem error carries, if any."""
    value = getattr(exc, "errno", None)
    return value if isinstance(value, int) else None


def error(name: str, err: int, detail: str) -> ExecmemError:
    """The public error for ``name(detail)`` failing with ``err``."""
    code = _errno.errorcode.get(err, str(err))
    message = f"{name}({detail}) failed: {code} ({os.strerror(err)})"
    if err in _OUT_OF_MEMORY:
        exc: ExecmemError = OutOfMemoryError(message)
        exc.errno = err  # type: ignore[attr-defined]
        return exc
    return SystemCallError(err, message)


def _fmt(arg: object) -> str:
    if isinstance(arg, bytes) and len(arg) > 32:
        return f"<{len(arg)} bytes>"
    return hex(arg) if isinstance(arg, int) and arg > 4096 else repr(arg)


class Syscalls:
    """System calls counted into one tally (one per backend); see the module docstring."""

    def __init__(self) -> None:
        self.tally: Counter[str] = Counter()

    def _call(self, name: str, fn: Callable[..., int], *args: object, fails: object = -1) -> int:
        injected = None
        tally = self.tally  # dict.get/setitem: a Counter's += costs twice as much
        if _faults:
            # Injected faults count exactly (under the lock): the k-th call fails.
            with _lock._lock:  # the SetupLock's RLock (replaced in a forked child)
                tally[name] = tally.get(name, 0) + 1
                _totals[name] = _totals.get(name, 0) + 1
                injected = next((f.errno for f in _faults if f._should_fire(name, args)), None)
        else:
            # No lock on the hot path (a third of its cost): two threads counting the
            # same call at the same instant may lose one count of the statistics.
            tally[name] = tally.get(name, 0) + 1
            _totals[name] = _totals.get(name, 0) + 1
        if injected is not None:
            if name in _EFFECTIVE_EVEN_ON_ERROR:
                fn(*args)
            raise error(name, injected, ", ".join(map(_fmt, args)) + " [injected]")
        try:
            result = fn(*args)
        except OSError as exc:  # a wrapper from the os module
            raise error(name, exc.errno or 0, ", ".join(map(_fmt, args))) from None
        if result == fails or result is None:
            raise error(name, ctypes.get_errno(), ", ".join(map(_fmt, args)))
        return int(result)

    # Each wrapper names the call the way the man page does.

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
        return self._call("mmap", _mmap, addr or None, length, prot, flags, fd, offset, fails=MAP_FAILED)

    def munmap(self, addr: int, length: int) -> None:
        self._call("munmap", _munmap, addr, length)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self._call("mprotect", _mprotect, addr, length, prot)

    def madvise(self, addr: int, length: int, advice: int) -> None:
        self._call("madvise", _madvise, addr, length, advice)

    def memfd_create(self, name: bytes, flags: int) -> int:
        if _memfd_create is not None:
            return self._call("memfd_create", _memfd_create, name, flags)
        number = syscall_number("memfd_create")
        return self._call("memfd_create", _raw(number), name, flags)

    def open(self, path: bytes, flags: int, mode: int) -> int:
        return self._call("open", _open, path, flags, mode)

    def unlink(self, path: bytes) -> None:
        self._call("unlink", _unlink, path)

    def close(self, fd: int) -> None:
        self._call("close", _close, fd)

    def ftruncate(self, fd: int, length: int) -> None:
        self._call("ftruncate", _ftruncate, fd, length)

    def fcntl(self, fd: int, cmd: int, arg: int = 0) -> int:
        return self._call("fcntl", _fcntl, fd, cmd, arg)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        self._call("fallocate", _fallocate, fd, mode, offset, length)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        """Bytes written (possibly fewer than ``len(data)``)."""
        return self._call("pwrite", _pwrite, fd, data, offset)

    def membarrier(self, cmd: int, flags: int = 0) -> int:
        return self._call("membarrier", _bound("membarrier"), cmd, flags)

    def riscv_flush_icache(self, start: int, end: int, flags: int) -> None:
        number = syscall_number("riscv_flush_icache")
        self._call("riscv_flush_icache", _raw(number), start, end, flags)

    def mremap(self, old: int, old_size: int, new_size: int, flags: int, new: int = 0) -> int:
        return self._call("mremap", _mremap, old, old_size, new_size, flags, new or None, fails=MAP_FAILED)

    def fork_probe(self, routine: Callable[[int], object], flags: int) -> int:
        """Run a routine that forks (``probe_membarrier``) with clone ``flags``: the
        child's pid.  Counted as the ``clone`` it makes; the routine returns -errno on
        failure."""
        return self._call("clone", _negative_errno(routine), flags)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        """``(pid, wait status)``; pid 0 with ``WNOHANG`` while the child runs."""
        status = _c_int(0)
        got = self._call("waitpid", _waitpid, pid, ctypes.byref(status), options)
        return got, status.value

    def kill(self, pid: int, sig: int) -> None:
        self._call("kill", _kill, pid, sig)


def _bound(name: str) -> Callable[..., int]:
    """``syscall(number of name, *args)``, made once per name (the hot path)."""
    fn = _BOUND.get(name)
    if fn is None:
        fn = _BOUND[name] = functools.partial(_syscall, syscall_number(name))
    return fn


_BOUND: dict[str, Callable[..., int]] = {}


def _negative_errno(fn: Callable[[int], object]) -> Callable[[int], int]:
    """A raw system call's -errno turned into the -1 and errno ``_call`` expects."""

    def call(arg: int) -> int:
        result: int = fn(arg)  # type: ignore[assignment]  # ctypes: restype c_long
        if -4096 < result < 0:
            ctypes.set_errno(-result)
            return -1
        return result

    return call


def _raw(number: int) -> Callable[..., int]:
    def call(*args: object) -> int:
        converted = [ctypes.c_char_p(a) if isinstance(a, bytes) else _c_long(int(a)) for a in args]  # type: ignore[call-overload]
        return int(_syscall(_c_long(number), *converted))

    return call


__all__ = ["Fault", "Syscalls", "errno_of", "error", "inject", "syscall_number", "totals"]
