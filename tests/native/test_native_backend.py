"""The native backend on this host: call JIT'd code, W^X audits, trap fill, threads,
live patching, errors, stats.  Code is written through ``backend.write`` and called
with ctypes (which releases the GIL, so threads really run JIT'd code in parallel)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import programs as P
import pytest
from programs import ADD, FIB, SUM, traps

import execmem.arch
from execmem._backend import Backend, Reservation
from execmem._errors import (
    AlignmentError,
    BadStateError,
    OutOfBoundsError,
    UnsupportedError,
)
from execmem.native import NativeBackend, _procmaps, _routines


def S(backend: NativeBackend) -> dict[str, Any]:
    """``backend.stats()`` typed for reading nested values in assertions."""
    return dict(backend.stats())


pytestmark = [
    P.needs_programs,
    pytest.mark.usefixtures("other_thread"),
]


W_X_MODES = ("dual", "mprotect")
MODES = ("dual", "mprotect", "rwx")
C = ctypes.c_int64
BINARY = ctypes.CFUNCTYPE(C, C, C)
UNARY = ctypes.CFUNCTYPE(C, C)
NULLARY = ctypes.CFUNCTYPE(C)


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@pytest.fixture(params=MODES)
def backend(request: pytest.FixtureRequest) -> Iterator[NativeBackend]:
    b = NativeBackend(request.param)
    yield b
    b.close()


def publish(b: NativeBackend, code: bytes, size: int = 1 << 16) -> Reservation:
    """Fresh-pack publish: reserve, write, map (the ``publish_fresh`` recipe)."""
    r = b.reserve(size, 16)
    b.write(r, 0, code)
    b.map(r)
    return r


def test_is_a_backend() -> None:
    with NativeBackend() as b:
        assert isinstance(b, Backend)
        assert b.arch is execmem.arch.host()
        assert b.mode == "dual-mapping" and b.write_unit == 1
        assert b.cache_features <= frozenset(b.arch.cache_features)  # what CTR_EL0 says


def test_call_with_arguments(backend: NativeBackend) -> None:
    r = backend.reserve(1 << 16, 16)
    add_at, fib_at, caller_at = 0, 64, 128
    backend.write(r, add_at, ADD)
    backend.write(r, fib_at, FIB)
    # A function calling another JIT'd function by absolute address.
    caller = P.call_plus_one(r.address + add_at, r.address + caller_at)
    backend.write(r, caller_at, caller)
    backend.map(r)
    add = BINARY(r.address + add_at)
    fibf = UNARY(r.address + fib_at)
    call = BINARY(r.address + caller_at)
    assert add(2, 40) == 42 and add(-5, 3) == -2
    assert [fibf(n) for n in (0, 1, 2, 10, 90)] == [fib(n) for n in (0, 1, 2, 10, 90)]
    assert call(20, 21) == 42


def test_trap_fill_everywhere_but_code(backend: NativeBackend) -> None:
    size = 3 * backend.page_size
    code = ADD
    r = publish(backend, code, size)
    image = ctypes.string_at(r.address, size)
    assert image[: len(code)] == code
    assert image[len(code) :] == traps(size - len(code))
    # "Free": the core writes traps back; the bytes read back as traps.
    backend.write(r, 0, backend.arch.trap_bytes(len(code)))
    assert ctypes.string_at(r.address, size) == traps(size)


def test_unmapped_view_is_inaccessible_and_va_kept(backend: NativeBackend) -> None:
    r = publish(backend, ADD)
    backend.unmap(r)
    vmas = [v for v in _procmaps.read_maps() if v.overlaps(r.address, r.size)]
    assert vmas, "the VA must stay reserved"
    assert all(v.perms[:3] in ("---", "rw-") and not v.executable for v in vmas)
    backend.map(r)
    assert BINARY(r.address)(1, 2) == 3  # the code survived unmap/map


@pytest.mark.parametrize("mode", W_X_MODES)
def test_wx_audit_throughout(mode: str) -> None:
    helper = _routines.host_routines()
    with NativeBackend(mode) as b:

        def audit() -> None:
            ranges = [*b.owned_ranges(), (helper.address, helper.size)]
            assert _procmaps.wx_violations(ranges) == []

        r = b.reserve(1 << 16, 16)
        audit()
        b.write(r, 0, ADD)
        audit()
        b.map(r)
        audit()
        b.write(r, 4096, ADD)
        audit()
        b.atomic_store(r, 8, traps(8))
        audit()
        b.begin_inplace(r, 8192, 100)
        audit()
        b.write(r, 8192, ADD)
        b.end_inplace(r, 8192, 100)
        audit()
        big = b.reserve(4 << 20, 16)
        b.map(big)
        audit()
        b.unmap(r)
        audit()
        assert BINARY(big.address)  # mapped, never writable
        # The helper page is read+execute, not writable.
        helper_vma = next(v for v in _procmaps.read_maps() if v.overlaps(helper.address, helper.size))
        assert helper_vma.perms.startswith("r-x")


def test_rwx_mode_is_detected_by_the_audit() -> None:
    with NativeBackend("rwx") as b:
        r = publish(b, ADD)
        assert _procmaps.wx_violations(b.owned_ranges()), "the audit must see RWX when there is RWX"
        assert BINARY(r.address)(3, 4) == 7


def test_dual_mode_maps_code_nowhere_writable() -> None:
    """Writes go through pwrite on the file: the only mapping of the code is the
    read+execute view, so no stray store of this process can change it (hugetlbfs,
    which has no write, keeps an alias: not asked for here)."""
    with NativeBackend("dual", huge_pages=False) as b:
        r = publish(b, ADD)
        execs = [v for v in _procmaps.read_maps() if v.overlaps(r.address, r.size)]
        assert [v.perms for v in execs] == ["r-xs"]
        assert b.owned_ranges() == [(r.address, r.size)]
        with open("/proc/self/maps") as maps:  # fields: range perms offset dev inode path
            lines = [line.split() for line in maps]
        (inode,) = {f[4] for f in lines if int(f[0].split("-")[0], 16) == r.address}
        assert [f[1] for f in lines if f[4] == inode] == ["r-xs"]  # the file is mapped once


def test_mprotect_inplace_toggles_only_those_pages() -> None:
    with NativeBackend("mprotect") as b:
        r = publish(b, ADD, 4 * b.page_size)
        b.begin_inplace(r, b.page_size + 10, 20)
        prot = {v.start: v.perms for v in _procmaps.read_maps() if v.overlaps(r.address, r.size)}
        assert prot[r.address] == "r-xp"
        assert prot[r.address + b.page_size] == "rw-p"
        assert prot[r.address + 2 * b.page_size] == "r-xp"
        b.write(r, b.page_size, FIB)
        b.end_inplace(r, b.page_size + 10, 20)
        assert all(v.perms == "r-xp" for v in _procmaps.read_maps() if v.overlaps(r.address, r.size))
        assert UNARY(r.address + b.page_size)(10) == 55
        assert BINARY(r.address)(1, 1) == 2


def test_atomic_store_sizes_and_alignment(backend: NativeBackend) -> None:
    r = publish(backend, b"", 1 << 14)
    for offset, data in ((64, b"\x01"), (66, b"\x02\x03"), (68, b"\x04\x05\x06\x07"), (72, bytes(range(8)))):
        backend.atomic_store(r, offset, data)
        assert ctypes.string_at(r.address + offset, len(data)) == data
    with pytest.raises(AlignmentError):
        backend.atomic_store(r, 65, b"\x00\x00")
    with pytest.raises(AlignmentError):
        backend.atomic_store(r, 64, b"\x00\x00\x00")
    with pytest.raises(OutOfBoundsError):
        backend.atomic_store(r, r.size, b"\x00")


def test_errors_are_execmem_errors(backend: NativeBackend) -> None:
    r = backend.reserve(100, 16)
    assert r.size == backend.page_size
    with pytest.raises(OutOfBoundsError):
        backend.write(r, r.size - 1, b"\x90\x90")
    with pytest.raises(OutOfBoundsError):
        backend.write(r, -1, b"\x90")
    with pytest.raises(AlignmentError):
        backend.reserve(4096, 3)
    with pytest.raises(AlignmentError):
        backend.reserve(0, 16)
    with pytest.raises(BadStateError):
        backend.unmap(r)
    backend.map(r)
    with pytest.raises(BadStateError):
        backend.map(r)
    with pytest.raises(UnsupportedError):
        backend.run_step("write", [])
    backend.release(r)
    with pytest.raises(BadStateError):
        backend.write(r, 0, b"\x90")
    with pytest.raises(BadStateError):
        backend.release(r)
    other = NativeBackend(backend.mode.split("-")[0])
    foreign = other.reserve(4096, 16)
    with pytest.raises(BadStateError):
        backend.write(foreign, 0, b"\x90")
    other.close()


def test_constructor_refusals() -> None:
    with pytest.raises(UnsupportedError):
        NativeBackend("rwx-please")
    with pytest.raises(UnsupportedError):
        NativeBackend(arch="arm64" if execmem.arch.host().name != "arm64" else "x86_64")


def test_close_is_idempotent_and_returns_everything() -> None:
    b = NativeBackend()
    rs = [publish(b, ADD) for _ in range(3)]
    owned = b.owned_ranges()
    b.close()
    b.close()
    assert not [v for v in _procmaps.read_maps() for rng in owned if v.overlaps(*rng)]
    with pytest.raises(BadStateError):
        b.write(rs[0], 0, b"\x90")
    with pytest.raises(BadStateError):
        b.reserve(4096, 16)
    assert S(b)["closed"] is True


def test_alignment_and_large_page_alignment(backend: NativeBackend) -> None:
    small = backend.reserve(4096, 1 << 16)
    assert small.address % (1 << 16) == 0
    big = backend.reserve(2 << 20, 16)
    assert big.address % (2 << 20) == 0
    with NativeBackend(backend.mode.split("-")[0], huge_pages=False) as plain:
        r = plain.reserve(2 << 20, 16)
        assert r.address % plain.page_size == 0


def test_run_step_x86_and_stats(backend: NativeBackend) -> None:
    r = publish(backend, ADD)
    ranges = [(r.address, 5)]
    for step in ("clean_dcache", "barrier", "invalidate_icache", "local_cse", "remote_cse", "remote_cse"):
        backend.run_step(step, ranges)
    s = backend.stats()
    assert s["steps"] == {"clean_dcache": 1, "barrier": 1, "invalidate_icache": 1, "local_cse": 1, "remote_cse": 2}
    sync = s["sync"]
    assert isinstance(sync, dict)
    assert sync["remote_cse"] in (
        "membarrier-sync-core",
        "membarrier-private-expedited",
        "mprotect-ipi",
        "membarrier-global",
    )
    assert sum(sync["remote_cse_runs"].values()) == 2
    assert s["reservations"] == 1 and s["bytes_reserved"] == r.size and s["bytes_mapped"] == r.size
    syscalls = s["syscalls"]
    assert isinstance(syscalls, dict) and syscalls["mmap"] >= 1
    assert s["syscalls_total"] == sum(syscalls.values())


def test_syscalls_per_publish_into_mapped_dual_pack() -> None:
    """Publishing into an already mapped pack: one pwrite per write, one membarrier."""
    with NativeBackend("dual") as b:
        r = publish(b, ADD)
        b.run_step("remote_cse", [(r.address, 5)])  # selection happens on first use
        before = dict(S(b)["syscalls"])
        for i in range(10):
            b.write(r, 64 * (i + 1), ADD)
        b.run_step("local_cse", [])
        b.run_step("remote_cse", [(r.address, 64 * 11)])
        after = S(b)["syscalls"]
        assert isinstance(after, dict)
        diff = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        if S(b)["sync"]["remote_cse"] == "membarrier-sync-core":
            assert diff == {"pwrite": 10, "membarrier": 1}
        assert BINARY(r.address + 640)(1, 2) == 3


def test_threads_execute_while_others_change(backend: NativeBackend) -> None:
    """Four threads run JIT'd code (GIL released) while the main thread reserves,
    writes, maps, unmaps and releases other reservations and synchronizes."""
    r = publish(backend, SUM + traps(16) + FIB)
    sum_fn = UNARY(r.address)
    fib_fn = UNARY(r.address + len(SUM) + 16)
    stop = threading.Event()
    errors: list[str] = []
    counts = [0] * 4

    def worker(k: int) -> None:
        while not stop.is_set():
            n = 20000 + k
            if sum_fn(n) != n * (n + 1) // 2 or fib_fn(50) != fib(50):
                errors.append(f"thread {k} got a wrong result")
                return
            counts[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 0.4
        cycles = 0
        while time.monotonic() < deadline or cycles < 20:
            other = backend.reserve(1 << 16, 16)
            backend.write(other, 0, ADD)
            backend.map(other)
            backend.run_step("local_cse", [(other.address, 4)])
            backend.run_step("remote_cse", [(other.address, 4)])
            assert BINARY(other.address)(cycles, 1) == cycles + 1
            backend.unmap(other)
            backend.release(other)
            cycles += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert all(c > 0 for c in counts)


@pytest.mark.parametrize("mode", ("dual", "rwx"))
def test_live_patch_while_threads_run(mode: str) -> None:
    """The aligned word holding a live-patchable instruction (x86-64: ``mov eax,
    imm32``; arm64: a ``B`` to one of many ``return value`` blocks) replaced by one
    atomic store, again and again: every call returns the old or the new value, and
    after the patch recipe every thread sees the last one."""
    with NativeBackend(mode) as b:
        assert b.concurrent_patch_safe
        switch = P.Switch(tuple(range(1, 200)))
        r = b.reserve(1 << 16, 16)
        b.write(r, 0, switch.code(r.address))
        b.map(r)
        fn: Callable[[], int] = NULLARY(r.address)
        seen: list[set[int]] = [set() for _ in range(4)]
        after_sync: list[list[int]] = [[] for _ in range(4)]
        patched = threading.Event()
        stop = threading.Event()

        def worker(k: int) -> None:
            while not stop.is_set():
                synced = patched.is_set()
                value = fn()
                seen[k].add(value)
                if synced:
                    after_sync[k].append(value)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.05)
            for index in range(1, len(switch.values)):
                b.atomic_store(r, 0, switch.word(index, r.address))
            for step in b.arch.patch.effective(b.cache_features):  # the rest of the patch recipe
                if step.name != "atomic_store":
                    b.run_step(step.name, [(r.address, 8)])
            patched.set()
            deadline = time.monotonic() + 10 * P.SLOWDOWN  # each thread calls after the sync
            while not all(after_sync) and time.monotonic() < deadline:  # (however loaded the machine)
                time.sleep(0.005)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert set().union(*seen) <= set(range(1, 200))
        assert all(values and set(values) == {199} for values in after_sync)


def test_reservation_token_is_private() -> None:
    with NativeBackend() as b:
        r = b.reserve(4096, 16)
        fake = Reservation(r.address, r.size)
        with pytest.raises(BadStateError):
            b.map(fake)
