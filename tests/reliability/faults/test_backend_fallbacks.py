"""Every fallback and rollback path of the native backend, through the fault-injection
seam of its one system-call dispatcher (``_libc.inject``)."""

from __future__ import annotations

import ctypes
import errno
import glob
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from programs import ADD, needs_programs

from execmem._errors import ExecmemError, OutOfMemoryError, SystemCallError
from execmem.native import NativeBackend, _libc, _procmaps, _sync
from execmem.native._libc import MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE as SYNC_CORE
from execmem.native._libc import MEMBARRIER_CMD_QUERY as QUERY
from execmem.native._libc import MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED as REG_PRIVATE
from execmem.native._libc import (
    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE as REG_SYNC_CORE,
)
from execmem.native._libc import PROT_EXEC


def S(backend: NativeBackend) -> dict[str, Any]:
    """``backend.stats()`` typed for reading nested values in assertions."""
    return dict(backend.stats())


pytestmark = [
    needs_programs,
    pytest.mark.usefixtures("other_thread"),
]


SAFE = lambda: _sync.ProbeResult(True, "test")  # noqa: E731


def call_add(address: int) -> int:
    return int(ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)(address)(40, 2))


def arg(args: tuple[object, ...], index: int) -> int:
    value = args[index]
    assert isinstance(value, int)
    return value


def exec_with_fd(args: tuple[object, ...]) -> bool:
    """``mmap`` arguments that ask for an executable view of a file."""
    return bool(arg(args, 2) & PROT_EXEC) and arg(args, 4) >= 0


def footprint() -> tuple[int, list[tuple[int, int, str, str]]]:
    """Open fds and every mapping execmem could have left behind."""
    fds = len(os.listdir("/proc/self/fd"))
    suspicious = [
        (v.start, v.end, v.perms, v.path)
        for v in _procmaps.read_maps()
        if "execmem" in v.path or (v.perms in ("---p", "r-xs", "rw-s", "r-xp") and not v.path)
    ]
    return fds, suspicious


def leftover_files() -> list[str]:
    import tempfile

    return [
        *glob.glob(f"/dev/shm/execmem-{os.getpid()}-*"),
        *glob.glob(os.path.join(tempfile.gettempdir(), f"execmem-{os.getpid()}-*")),
    ]


@pytest.fixture
def dual() -> Iterator[NativeBackend]:
    b = NativeBackend("dual", huge_pages=False, probe=SAFE)
    yield b
    b.close()


# --- backing fallbacks ----------------------------------------------------------------


def test_memfd_einval_falls_back_to_dev_shm() -> None:
    with _libc.inject("memfd_create", errno.EINVAL) as fault, NativeBackend("dual", probe=SAFE) as b:
        r = b.reserve(2 << 20, 16)
        b.write(r, 0, ADD)
        b.map(r)
        assert call_add(r.address) == 42
        detail = S(b)["backing_detail"]
        assert S(b)["backing"] == "shm"
        assert isinstance(detail, dict)
        notes = " ".join(detail["notes"])
        assert "MFD_EXEC" in notes and "memfd" in notes
        assert str(detail["hugetlb"]).startswith("unavailable")
        assert fault.fired >= 3  # hugetlb try, MFD_EXEC try, plain try
    assert leftover_files() == []


def test_noexec_dev_shm_falls_back_to_tmpdir() -> None:
    with (
        _libc.inject("memfd_create", errno.EINVAL),
        _libc.inject("mmap", errno.EPERM, times=1, when=exec_with_fd) as noexec,
        NativeBackend("dual", huge_pages=False, probe=SAFE) as b,
    ):
        r = b.reserve(4096, 16)
        b.write(r, 0, ADD)
        b.map(r)
        assert call_add(r.address) == 42
        assert noexec.fired == 1
        assert S(b)["backing"] == "tmpfile"
        notes = " ".join(S(b)["backing_detail"]["notes"])
        assert "shm: cannot be mapped executable" in notes
    assert leftover_files() == []


def test_memfd_without_mfd_exec_on_old_kernels() -> None:
    old_kernel = lambda args: bool(arg(args, 1) & _libc.MFD_EXEC)  # noqa: E731
    with _libc.inject("memfd_create", errno.EINVAL, when=old_kernel), NativeBackend("dual", probe=SAFE) as b:
        r = b.reserve(4096, 16)
        b.write(r, 0, ADD)
        b.map(r)
        assert call_add(r.address) == 42
        detail = S(b)["backing_detail"]
        assert isinstance(detail, dict)
        assert detail["kind"] == "memfd" and detail["memfd_exec_flag"] is False


def test_no_executable_backing_at_all_leaves_nothing() -> None:
    before = footprint()
    with (
        _libc.inject("memfd_create", errno.ENOSYS),
        _libc.inject("mmap", errno.EPERM, when=exec_with_fd),
        NativeBackend("dual", probe=SAFE) as b,
        pytest.raises(SystemCallError) as info,
    ):
        b.reserve(4096, 16)
    assert "no executable shared memory" in str(info.value)
    assert info.value.errno == errno.EACCES
    assert footprint() == before
    assert leftover_files() == []


def test_private_dir_fallback_is_configurable(tmp_path: os.PathLike[str]) -> None:
    with _libc.inject("memfd_create", errno.EPERM), NativeBackend("dual", directories=[str(tmp_path)], probe=SAFE) as b:
        r = b.reserve(4096, 16)
        b.map(r)
        assert S(b)["backing"] == f"dir:{tmp_path}"
        assert os.listdir(tmp_path) == []  # unlinked right after open


# --- rollback at every step -------------------------------------------------------------


def _reserve_calls(mode: str) -> dict[str, int]:
    with NativeBackend(mode, probe=SAFE) as b:
        b.reserve(2 << 20, 16)
        return dict(S(b)["syscalls"])


@pytest.mark.parametrize("mode", ("dual", "mprotect", "rwx"))
def test_reserve_rolls_back_whatever_call_fails(mode: str) -> None:
    calls = _reserve_calls(mode)
    assert calls, "reserve makes system calls"
    for name, count in calls.items():
        for k in range(count):
            before = footprint()
            b = NativeBackend(mode, probe=SAFE)
            with _libc.inject(name, errno.ENOMEM, after=k, times=1) as fault:
                try:
                    r = b.reserve(2 << 20, 16)
                except ExecmemError as exc:
                    assert isinstance(exc, OutOfMemoryError), (name, k, exc)
                    assert _libc.errno_of(exc) == errno.ENOMEM
                    assert "ENOMEM" in str(exc) and name in str(exc)
                else:  # the failure hit an optional step (a hint or a fallback)
                    b.write(r, 0, ADD)
                    b.map(r)
                    assert call_add(r.address) == 42
            assert fault.fired == 1, (name, k)
            b.close()
            assert footprint() == before, (mode, name, k)


def test_map_failure_leaves_reservation_usable(dual: NativeBackend) -> None:
    r = dual.reserve(4096, 16)
    dual.write(r, 0, ADD)
    with _libc.inject("mmap", errno.ENOMEM), pytest.raises(OutOfMemoryError):
        dual.map(r)
    assert not r.mapped
    dual.map(r)
    assert call_add(r.address) == 42


def test_mprotect_write_failure_keeps_code_executable() -> None:
    with NativeBackend("mprotect", probe=SAFE) as b:
        r = b.reserve(4 * b.page_size, 16)
        b.write(r, 0, ADD)
        b.map(r)
        with _libc.inject("mprotect", errno.EACCES), pytest.raises(SystemCallError):
            b.write(r, 0, b"\xcc")
        assert call_add(r.address) == 42
        assert _procmaps.wx_violations(b.owned_ranges()) == []


def test_error_messages_name_call_and_errno() -> None:
    exc = _libc.error("mmap", errno.EACCES, "0x0, 4096")
    assert isinstance(exc, SystemCallError) and exc.errno == errno.EACCES
    assert "mmap(0x0, 4096) failed: EACCES" in str(exc)
    oom = _libc.error("memfd_create", errno.EMFILE, "b'execmem', 1")
    assert isinstance(oom, OutOfMemoryError) and _libc.errno_of(oom) == errno.EMFILE


def test_inject_counts_and_scopes() -> None:
    sys_ = _libc.Syscalls()
    with _libc.inject("madvise", errno.EINVAL, after=1, times=1) as fault:
        page = sys_.mmap(0, 4096, 3, _libc.MAP_PRIVATE | _libc.MAP_ANONYMOUS)
        sys_.madvise(page, 4096, _libc.MADV_DONTFORK)
        with pytest.raises(SystemCallError):
            sys_.madvise(page, 4096, _libc.MADV_DONTFORK)
        sys_.madvise(page, 4096, _libc.MADV_DONTFORK)
    sys_.munmap(page, 4096)
    assert fault.seen == 3 and fault.fired == 1
    assert sys_.tally == {"mmap": 1, "madvise": 3, "munmap": 1}
    assert _libc.totals()["madvise"] >= 3


# --- remote context synchronization fallbacks --------------------------------------------


def _remote(b: NativeBackend) -> dict[str, Any]:
    b.run_step("remote_cse", [])
    sync = S(b)["sync"]
    assert isinstance(sync, dict)
    return sync


def _is(cmd: int) -> Callable[[tuple[object, ...]], bool]:
    return lambda args: arg(args, 0) == cmd


def test_membarrier_sync_core_is_chosen_here() -> None:
    with NativeBackend(probe=SAFE) as b:
        sync = _remote(b)
        assert sync["remote_cse"] == "membarrier-sync-core", sync["notes"]
        assert S(b)["syscalls"]["membarrier"] == 3  # QUERY, REGISTER, run
        _remote(b)
        assert S(b)["syscalls"]["membarrier"] == 4


def test_membarrier_eperm_registers_and_retries() -> None:
    with NativeBackend(probe=SAFE) as b, _libc.inject("membarrier", errno.EPERM, times=1, when=_is(SYNC_CORE)):
        sync = _remote(b)
    assert sync["remote_cse"] == "membarrier-sync-core"
    assert any("EPERM, registered and retried" in n for n in sync["notes"])
    assert S(b)["syscalls"]["membarrier"] == 5  # QUERY, REG, EPERM, REG, run


def test_membarrier_sync_core_einval_falls_back_at_run_time() -> None:
    with NativeBackend(probe=SAFE) as b, _libc.inject("membarrier", errno.EINVAL, when=_is(SYNC_CORE)):
        sync = _remote(b)
        assert sync["remote_cse"] == "membarrier-private-expedited"
        assert any("falling back" in n for n in sync["notes"])
        assert _remote(b)["remote_cse_runs"] == {"membarrier-private-expedited": 2}


def test_register_einval_falls_back_at_selection() -> None:
    with NativeBackend(probe=SAFE) as b, _libc.inject("membarrier", errno.EINVAL, when=_is(REG_SYNC_CORE)):
        assert _remote(b)["remote_cse"] == "membarrier-private-expedited"


def _without_membarrier_there_is_nothing(b: NativeBackend) -> bool:
    """True where the host has no remote_cse but membarrier: on arm64 an mprotect
    shootdown is a broadcast TLBI that interrupts no one (no mprotect-ipi fallback),
    so it must be a clear error."""
    if "mprotect-ipi" in b._synchronizer().remote._candidates:
        return False
    with pytest.raises(SystemCallError, match="no way to make other threads take a context synchronization"):
        b.run_step("remote_cse", [])
    return True


def test_no_membarrier_falls_back_to_mprotect_ipi() -> None:
    with NativeBackend(probe=SAFE) as b, _libc.inject("membarrier", errno.ENOSYS, when=_is(QUERY)):
        if _without_membarrier_there_is_nothing(b):
            return
        sync = _remote(b)
        assert sync["remote_cse"] == "mprotect-ipi"
        assert S(b)["syscalls"]["mprotect"] == 2
        assert "mprotect-ipi" in sync["how"]["remote_cse"]
    owned = b.stats()
    assert owned["closed"] is True


def test_mprotect_failure_falls_back_to_membarrier_global() -> None:
    not_offered = lambda args: arg(args, 0) in (REG_SYNC_CORE, REG_PRIVATE)  # noqa: E731
    with (
        NativeBackend(probe=SAFE) as b,
        _libc.inject("membarrier", errno.EINVAL, when=not_offered),
        _libc.inject("mprotect", errno.ENOMEM),
        _libc.inject("mmap", errno.EPERM),
    ):
        assert _remote(b)["remote_cse"] == "membarrier-global"


def test_nothing_works_is_a_clear_error() -> None:
    with (
        NativeBackend(probe=SAFE) as b,
        _libc.inject("membarrier", errno.ENOSYS),
        _libc.inject("mmap", errno.EPERM),
        pytest.raises(SystemCallError) as info,
    ):
        b.run_step("remote_cse", [])
    assert "context synchronization" in str(info.value)


def test_unsafe_probe_means_membarrier_is_never_called() -> None:
    unsafe = lambda: _sync.ProbeResult(False, "probe child killed by SIGSYS (seccomp?)")  # noqa: E731
    with NativeBackend(probe=unsafe) as b:
        if _without_membarrier_there_is_nothing(b):
            assert "membarrier" not in S(b)["syscalls"]
            return
        sync = _remote(b)
        assert sync["remote_cse"] == "mprotect-ipi"
        assert "membarrier" not in S(b)["syscalls"]
        assert any("SIGSYS" in n for n in sync["notes"])
