"""Dual mapping: the read+execute view cannot be made writable (``_backing``), and
impossible or oversized requests are refused before any system call.

The view is mapped from a read-only descriptor (``/proc/self/fd/N`` reopened), which
stops ``mprotect(view, RW)`` in this process and in a forked child; writes go through
``pwrite`` on the read+write descriptor, so no mapping of the code is ever writable.
A memfd is sealed against shrinking and growing.  The fallback (no ``/proc``) is
reported in ``stats()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from typing import Any

import pytest
from programs import const, needs_programs, synchronize

import execmem
from execmem._backend import Reservation
from execmem._errors import OutOfMemoryError
from execmem.native import NativeBackend, _libc, _sync
from execmem.native._backing import SEALED_WRITABLE, SEALS_WRITABLE
from execmem.native._mapping import PMD_SIZE, Region
from execmem.native._native import ADDRESS_SPACE_BITS

pytestmark = needs_programs

SAFE = lambda: _sync.ProbeResult(True, "test")  # noqa: E731
PAGE = mmap.PAGESIZE

_c = ctypes.CDLL(None, use_errno=True)
_c.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_c.mmap.restype = ctypes.c_void_p
_c.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_c.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def S(b: NativeBackend) -> dict[str, Any]:
    return dict(b.stats())


def mprotect_rw(address: int) -> int:
    """0 if ``mprotect(page, RW)`` succeeded, else the errno."""
    if _c.mprotect(address & ~(PAGE - 1), PAGE, _libc.PROT_READ | _libc.PROT_WRITE) == 0:
        return 0
    return ctypes.get_errno()


@contextlib.contextmanager
def published(
    *faults: tuple[str, int], directories: tuple[str, ...] | None = None
) -> Iterator[tuple[NativeBackend, Region]]:
    with contextlib.ExitStack() as stack:
        for name, err in faults:
            stack.enter_context(_libc.inject(name, err))
        b = NativeBackend("dual", probe=SAFE, directories=directories)
        r = b.reserve(PAGE, 16)
        b.write(r, 0, const(7))
        b.map(r)
    try:
        region = r.token
        assert isinstance(region, Region)
        yield b, region
    finally:
        b.close()


def call(address: int) -> int:
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(address)())


def child_mprotects(address: int) -> int:
    """Fork; the child tries mprotect(view, RW) and writes 99 if allowed.  Returns the
    child's verdict: 0 refused, 1 it wrote.  (The child's view is its private snapshot
    since fork (``_fork``): what it writes never reaches this process.)"""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            if mprotect_rw(address) == 0:
                ctypes.memmove(address, const(99), len(const(99)))
                code = 1
            else:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"child status {status:#x}"
    return os.WEXITSTATUS(status)


def test_view_is_mapped_from_a_read_only_descriptor_of_a_sealed_memfd() -> None:
    with published() as (b, region):
        detail = S(b)["backing_detail"]
        assert detail["kind"] == "memfd"
        assert detail["views"] == {"read_only_fd": 1, "read_write_fd": 0, "fallback": None}
        assert detail["sealing"] == SEALED_WRITABLE
        assert fcntl.fcntl(region.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl_get_seals(region.fd) == SEALS_WRITABLE
        # This process cannot make the view writable; a forked child can only write
        # its own private snapshot of it.
        assert mprotect_rw(region.address) == errno.EACCES
        assert child_mprotects(region.address) == 1
        assert call(region.address) == 7
        # Nor change the file's size under the view (a SIGBUS on execution).
        with pytest.raises(PermissionError):
            os.ftruncate(region.rw_fd, 0)
        # Writes go through pwrite on the read+write descriptor.
        b.write(Reservation(region.address, region.size, mapped=True, token=region), 0, const(5))
        synchronize(b, region.address, 64)
        assert call(region.address) == 5


def fcntl_get_seals(fd: int) -> int:
    fn = _c.fcntl
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return int(fn(fd, _libc.F_GET_SEALS, 0))


def test_without_proc_the_view_comes_from_the_writable_descriptor() -> None:
    """The documented fallback: without ``/proc`` nothing stops ``mprotect(view, RW)``."""
    with published(("open", errno.ENOENT)) as (b, region):
        detail = S(b)["backing_detail"]
        assert detail["views"]["read_write_fd"] == 1 and "read+write" in detail["views"]["fallback"]
        assert region.fd == region.rw_fd
        assert child_mprotects(region.address) == 1
        assert call(region.address) == 7  # the child wrote its snapshot, not our view


def test_dev_shm_backing_has_a_read_only_view_without_seal() -> None:
    with published(("memfd_create", errno.ENOSYS), directories=("/dev/shm",)) as (b, region):
        detail = S(b)["backing_detail"]
        assert detail["kind"] == "dir:/dev/shm" and detail["sealing"] == "not tried"
        assert detail["views"]["read_only_fd"] == 1
        assert mprotect_rw(region.address) == errno.EACCES
        assert child_mprotects(region.address) == 1
        assert call(region.address) == 7


def test_reservation_costs_one_seal_one_reopen_and_keeps_two_descriptors() -> None:
    with NativeBackend("dual", probe=SAFE) as b:
        b.reserve(PAGE, 16)  # the backing is chosen
        before = dict(S(b)["syscalls"])
        b.reserve(PAGE, 16)
        after = S(b)["syscalls"]
        diff = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        assert diff["fcntl"] == 1 and diff["open"] == 1 and "close" not in diff, diff
        fds = set(os.listdir("/proc/self/fd"))
        b.close()
        assert len(fds - set(os.listdir("/proc/self/fd"))) == 4  # read-only and read+write, twice


@pytest.mark.parametrize(("name", "err"), [("fcntl", errno.EPERM), ("open", errno.EMFILE)])
def test_a_refused_seal_or_reopen_is_a_clear_error_and_rolls_back(name: str, err: int) -> None:
    with NativeBackend("dual", probe=SAFE) as b:
        b.reserve(PAGE, 16)
        fds, ranges = set(os.listdir("/proc/self/fd")), b.owned_ranges()
        with _libc.inject(name, err), pytest.raises(execmem.ExecmemError, match=name):
            b.reserve(PAGE, 16)
        assert set(os.listdir("/proc/self/fd")) == fds and b.owned_ranges() == ranges


# --- sizes that cannot (or should not) exist ------------------------------------------------


@pytest.mark.parametrize("size", [2**64, 2**200, 1 << 47])
def test_impossible_sizes_are_refused_before_any_system_call(size: int) -> None:
    with NativeBackend("dual", probe=SAFE) as b:
        before = dict(S(b)["syscalls"])
        with pytest.raises(OutOfMemoryError, match="larger than this backend allows"):
            b.reserve(size, 16)
        assert dict(S(b)["syscalls"]) == before
        assert S(b)["huge_pages"]["hugetlb"] == "not tried"


def test_more_than_the_machine_has_is_a_clear_error_not_an_oom_kill() -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with NativeBackend("mprotect", probe=SAFE) as b, execmem.Allocator(backend=b, pack_size=1 << 16) as a:
        assert S(b)["max_reservation"] == ram
        before = repr(a.stats())
        with pytest.raises(OutOfMemoryError):
            a.jit_text_alloc(ram + PAGE)
        assert repr(a.stats()) == before


def test_alignment_beyond_the_address_space_is_refused() -> None:
    with NativeBackend("dual", probe=SAFE) as b, pytest.raises(OutOfMemoryError, match="address space"):
        b.reserve(PAGE, 1 << 60)


def test_max_reservation_argument() -> None:
    with NativeBackend("dual", probe=SAFE, max_reservation=1 << 20) as b:
        b.reserve(1 << 20, 16)
        with pytest.raises(OutOfMemoryError, match="max_reservation"):
            b.reserve((1 << 20) + 1, 16)
    with NativeBackend(max_reservation=1 << 80) as b:  # the user address space
        assert b.max_reservation == 1 << ADDRESS_SPACE_BITS[b.arch.name]
    with pytest.raises(TypeError):
        NativeBackend(max_reservation=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NativeBackend(max_reservation=0)


# --- hugetlb: the host lacks it, or only this size -------------------------------------------


def _huge_free() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def test_a_size_specific_hugetlb_refusal_does_not_disable_it() -> None:
    def hugetlb_fallocate(args: tuple[object, ...]) -> bool:
        return True

    with NativeBackend("dual", probe=SAFE) as b:
        with _libc.inject("fallocate", errno.EINVAL, when=hugetlb_fallocate):
            b.reserve(PMD_SIZE, 16)
        huge = S(b)["backing_detail"]
        assert not str(huge["hugetlb"]).startswith("unavailable"), huge
        assert "not used for" in str(huge["hugetlb_note"])
        with _libc.inject("memfd_create", errno.EMFILE, when=lambda a: bool(int(a[1]) & _libc.MFD_HUGETLB)):
            b.reserve(PMD_SIZE, 16)
        assert not str(S(b)["backing_detail"]["hugetlb"]).startswith("unavailable")


@pytest.mark.skipif(_huge_free() > 0, reason="this host has free huge pages")
def test_too_few_huge_pages_skips_that_size_and_larger_then_smallest_means_unavailable() -> None:
    with NativeBackend("dual", probe=SAFE) as b:
        b.reserve(2 * PMD_SIZE, 16)
        d = S(b)["backing_detail"]
        assert d["hugetlb_short_from_bytes"] == 2 * PMD_SIZE and d["hugetlb"] == "not tried"
        calls = dict(S(b)["syscalls"])
        b.reserve(4 * PMD_SIZE, 16)  # larger: not tried again
        assert S(b)["syscalls"].get("fallocate", 0) == calls.get("fallocate", 0)
        b.reserve(PMD_SIZE, 16)  # the smallest size: no huge page at all
        assert str(S(b)["backing_detail"]["hugetlb"]).startswith("unavailable")


def test_a_pack_larger_than_one_reservation_may_be_is_refused_by_the_constructor() -> None:
    with NativeBackend("dual", probe=SAFE, max_reservation=1 << 20) as b:
        with pytest.raises(OutOfMemoryError, match="pack_size 0x200000 is larger than the backend allows"):
            execmem.Allocator(backend=b, pack_size=2 << 20)
        assert S(b)["syscalls"] == {}
        with execmem.Allocator(backend=b, pack_size=1 << 20) as a:
            assert a.jit_text_alloc(16).address
