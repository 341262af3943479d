"""What a forked child keeps of the parent's texts (``execmem.native._fork``).

The child keeps its inherited callables *with the code they had at fork*: dual mode's
views of the parent's file become private read+execute snapshots, the parent's
descriptors are closed in the child, and the parent's updates and frees never reach
the child.  The backend refuses to write, reserve or unmap in the child, the
allocator every verb; a fork while another thread holds the allocator's lock leaves a
child that is refused, never deadlocked.  Forks while threads hold the native
backend's locks are ``test_locks.py``."""

from __future__ import annotations

import ctypes
import errno
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import programs as P
import pytest
from programs import (
    ADD,
    ADD_T,
    CONST_T,
    Switch,
    const,
    exited,
    live,
    native_allocator,
    needs_programs,
    report_from_child,
    run_in_child,
)

import execmem
from execmem._errors import ForkedProcessError
from execmem.bench._measure import idle_thread
from execmem.native import NativeBackend, _libc, _procmaps
from execmem.native import _fork as native_fork

pytestmark = needs_programs


def S(backend: NativeBackend) -> dict[str, Any]:
    """``backend.stats()`` typed for reading nested values in assertions."""
    return dict(backend.stats())


def _file_fds(inode: int | None = None) -> list[str]:
    """Descriptors of this process open on an execmem backing file (only the one with
    ``inode``, when given: other backends of this process may use files of the same name;
    never the GDB interface's object, which a process keeps for good)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if inode is not None and os.stat(f"/proc/self/fd/{fd}").st_ino != inode:
                continue
        except OSError:
            continue
        if "execmem" in target and "execmem-gdbjit" not in target:
            out.append(target)
    return out


def _mapped_inode(vma: _procmaps.Vma) -> int | None:
    """The inode of the file ``vma`` maps (``/proc/self/map_files``), if any."""
    try:
        return os.stat(f"/proc/self/map_files/{vma.start:x}-{vma.end:x}").st_ino
    except OSError:
        return None


def test_child_gets_private_snapshots_and_no_descriptor() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(1 << 16, 16)
        b.write(r, 0, ADD)
        b.map(r)
        view = next(v for v in _procmaps.read_maps() if v.overlaps(r.address, r.size))
        inode = _mapped_inode(view)
        assert inode is not None and _file_fds(inode), "the parent holds its backing file open"

        def child() -> dict[str, object]:
            vmas = _procmaps.read_maps()
            refused: list[bool] = []
            report: dict[str, object] = {
                "file_mappings": [v.perms for v in vmas if v.path == view.path and _mapped_inode(v) == inode],
                "view_perms": [v.perms for v in vmas if v.overlaps(r.address, r.size)],
                "file_fds": _file_fds(inode),
                "call": ADD_T(r.address)(20, 22),
                "forked": b.forked,
                "fork": S(b)["fork"],
            }
            for attempt in (  # never stored: any bytes do
                lambda: b.write(r, 0, bytes(1)),
                lambda: b.atomic_store(r, 0, bytes(1)),
                lambda: b.reserve(4096, 16),
                lambda: b.unmap(r),
            ):
                try:
                    attempt()
                    refused.append(False)
                except ForkedProcessError:
                    refused.append(True)
            report["refused"] = refused
            b.close()  # allowed in the child: drops only the child's copies
            return report

        report, status = report_from_child(child)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        fork = report.pop("fork")
        assert report == {
            "file_mappings": [],  # nothing of the parent's file is mapped in the child...
            "view_perms": ["r-xp"],  # ...the view is a private read+execute copy
            "file_fds": [],  # and no descriptor of it is left open
            "call": 42,
            "forked": True,
            "refused": [True, True, True, True],
        }
        assert fork == {
            "views": 1, "bytes": r.size, "moved": 1, "copied_in_child": 0, "left_shared": [],
            "descriptors_closed": 2, "windows_unmapped": 0, "notes": [],
        }
        # The parent is untouched: same code, still callable, still writable by execmem,
        # and nothing of the snapshot is left in it.
        assert ctypes.string_at(r.address, len(ADD)) == ADD
        assert ADD_T(r.address)(1, 2) == 3
        b.write(r, 0, ADD)
        assert S(b)["fork"] is None
        assert [v.perms for v in _procmaps.read_maps() if v.overlaps(r.address, r.size)] == ["r-xs"]


def test_trap_fill_really_traps() -> None:
    """Executing filler (never-written or freed bytes) raises SIGTRAP, never runs on."""
    with NativeBackend("dual") as b:
        r = b.reserve(4096, 16)
        b.map(r)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            import faulthandler

            faulthandler.disable()
            ctypes.CFUNCTYPE(None)(r.address + 100)()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTRAP


# --- multiprocessing workers while the parent updates and frees -------------------------------


@pytest.fixture
def allocator(request: pytest.FixtureRequest) -> Iterator[execmem.Allocator]:
    backend = NativeBackend(request.param)
    a = execmem.Allocator(backend=backend, pack_size=1 << 16)
    try:
        yield a
    finally:
        a.close()
        backend.close()


def _worker(functions: list[Any], addresses: list[int], seconds: float, out: Any) -> None:
    """Call every inherited function, through JitFunction and a raw pointer, for a while;
    report every value seen per function."""
    seen: list[set[int]] = [set() for _ in functions]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for i, (fn, address) in enumerate(zip(functions, addresses, strict=True)):
            seen[i].add(fn())
            seen[i].add(CONST_T(address)())
    out.put([sorted(s) for s in seen])


@pytest.mark.parametrize("allocator", ["dual", "mprotect"], indirect=True)
def test_fork_workers_keep_their_at_fork_code(allocator: execmem.Allocator) -> None:
    """multiprocessing workers (fork start method) call inherited functions while the
    parent patches them, frees them and reuses their addresses for new code: every
    worker sees exactly the values of fork time, and none dies of SIGTRAP."""
    a = allocator
    patchable = a.backend.concurrent_patch_safe
    values = [1000 + i for i in range(12)]
    switches = [Switch((v, 5000 + i, 6000 + i)) for i, v in enumerate(values[:4])]  # patched below
    texts = a.jit_text_alloc_many([64] * len(values))
    a.publish(texts, [s.code(t.address) for s, t in zip(switches, texts[:4], strict=True)] + [const(v) for v in values[4:]])
    functions = [t.function(ctypes.c_int32) for t in texts]
    addresses = [t.address for t in texts]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    with idle_thread():  # the parent's membarrier really runs
        workers = [ctx.Process(target=_worker, args=(functions, addresses, 1.0, out)) for _ in range(3)]
        for w in workers:
            w.start()
        # The parent changes everything its children inherited, as fast as it can.
        deadline, round_ = time.monotonic() + 0.8, 0
        while time.monotonic() < deadline:
            round_ += 1
            if patchable:
                for s, t in zip(switches, texts[:4], strict=True):
                    t.update(0, s.patch(1 + round_ % 2, t.address))
            for t in texts[4 + round_ % 8 : 5 + round_ % 8]:
                if t.state is execmem.TextState.LIVE:
                    t.free()
            fresh = a.jit_text_alloc_many([16] * 8)  # epochs pass: freed addresses are reused
            a.publish(fresh, [const(9000 + round_)] * 8)
            for t in fresh[::2]:
                t.free()
        results = [out.get(timeout=30) for _ in workers]
        for w in workers:
            w.join(30)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert all(seen == [[v] for v in values] for seen in results), results
    assert round_ > 3


WITHOUT_SNAPSHOTS = """
import ctypes, os, signal, sys
import execmem
from execmem.native import NativeBackend, _fork
_fork.register = lambda backend: None  # what the fork hooks would see: no backend
b = NativeBackend("dual")
a = execmem.Allocator(backend=b, pack_size=1 << 16)
code, patch = (bytes.fromhex(h) for h in sys.argv[2:])
t = a.jit_text_alloc(len(code))
t.write(0, code)
t.map()
address = t.address
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)
    os._exit(ctypes.CFUNCTYPE(ctypes.c_int)(address)())
if sys.argv[1] == "update":
    t.update(0, patch)
else:
    t.free()
    a.jit_text_alloc(16).map()  # a publish into the mapped pack: the epoch that refills t
os.write(go_w, b"x")
_, status = os.waitpid(pid, 0)
print(os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status))
"""


@pytest.mark.parametrize(("what", "child_gets"), [("update", "2"), ("free", str(-signal.SIGTRAP))])
def test_without_the_snapshots_a_child_follows_the_parent(what: str, child_gets: str) -> None:
    """The hazard the snapshots remove (so the tests above can fail): with the fork
    hooks seeing no backend, the child runs the parent's update, or its trap refill."""
    import subprocess
    import sys

    # Returns 1, patched to return 2; the bytes are the same at every address (x86-64's
    # immediates, arm64's PC-relative B), so they are made here for the child's text.
    switch = Switch((1, 2))
    code, patch = switch.code(0).hex(), switch.patch(1, 0).hex()
    r = subprocess.run([sys.executable, "-c", WITHOUT_SNAPSHOTS, what, code, patch],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == child_gets, (r.stdout, r.stderr[-2000:])


def test_a_fork_during_concurrent_patching_sees_whole_values() -> None:
    """A thread patches one function back and forth while the main thread forks: each
    child sees one of the two values, the same on every call (a snapshot, whole)."""
    with NativeBackend("dual") as b, execmem.Allocator(backend=b, pack_size=1 << 16) as a:
        switch = Switch((1, 2))
        t = a.jit_text_alloc(64)
        t.write(0, switch.code(t.address))
        t.map()
        stop = threading.Event()

        def patch() -> None:
            k = 0
            while not stop.is_set():
                k += 1
                t.update(0, switch.patch(k % 2, t.address))

        patcher = threading.Thread(target=patch)
        patcher.start()
        try:
            for _ in range(8):
                report, status = report_from_child(lambda: {"values": sorted({CONST_T(t.address)() for _ in range(2000)})})
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                assert report["values"] in ([1], [2]), report
        finally:
            stop.set()
            patcher.join()


def test_two_threads_fork_at_once() -> None:
    """Each fork's hooks keep their own state (per forking thread): every child of two
    threads forking in a loop gets its snapshot and the right value."""
    with NativeBackend("dual") as b, execmem.Allocator(backend=b, pack_size=1 << 16) as a:
        t = a.jit_text_alloc(16)
        t.write(0, const(5))
        t.map()
        results: list[tuple[object, int]] = []

        def forker() -> None:
            for _ in range(5):
                results.append(report_from_child(lambda: {"value": CONST_T(t.address)(), "moved": S(b)["fork"]["moved"]}))

        threads = [threading.Thread(target=forker) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert len(results) == 10
        for report, status in results:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            assert report == {"value": 5, "moved": 1}, report


# --- degraded cases -----------------------------------------------------------------------------


def test_parent_snapshot_refused_the_child_copies() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(5 << 12, 16)  # a size of its own: other backends of the process fork too
        b.write(r, 0, ADD)
        b.map(r)
        snapshot = lambda args: args[1] == r.size and args[3] == native_fork.SNAPSHOT_FLAGS  # noqa: E731
        with _libc.inject("mmap", errno.ENOMEM, when=snapshot, times=1) as fault:
            report, status = report_from_child(lambda: {"fork": S(b)["fork"], "call": ADD_T(r.address)(2, 3)})
        assert fault.fired == 1  # in the parent, before the fork
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert report["call"] == 5
        fork = report["fork"]
        assert isinstance(fork, dict) and fork["moved"] == 1 and fork["copied_in_child"] == 1, fork


def test_child_cannot_move_the_snapshot_the_view_stays_shared() -> None:
    with NativeBackend("dual") as b:
        r = b.reserve(1 << 16, 16)
        b.write(r, 0, ADD)
        b.map(r)
        with _libc.inject("mremap", errno.ENOMEM):  # inherited: fires in the child
            report, status = report_from_child(
                lambda: {"fork": S(b)["fork"], "perms": [v.perms for v in _procmaps.read_maps() if v.overlaps(r.address, r.size)]}
            )
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        fork = report["fork"]
        assert isinstance(fork, dict) and fork["moved"] == 0 and len(fork["left_shared"]) == 1, fork
        assert "mremap" in fork["left_shared"][0]
        assert report["perms"] == ["r-xs"]  # still the (read-only) view of the file
        assert b.owned_ranges()  # the parent's snapshot was unmapped, its view kept


def test_fork_with_nothing_mapped_and_in_mprotect_mode_copies_nothing() -> None:
    with NativeBackend("dual") as dual, NativeBackend("mprotect") as mp:
        dual.reserve(1 << 16, 16)  # reserved, never mapped: no view to copy
        r = mp.reserve(4096, 16)
        mp.write(r, 0, ADD)
        mp.map(r)
        report, status = report_from_child(lambda: {"dual": S(dual)["fork"], "mprotect": S(mp)["fork"], "call": ADD_T(r.address)(1, 1)})
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert report["call"] == 2
        assert isinstance(report["dual"], dict) and report["dual"]["views"] == 0
        assert report["dual"]["descriptors_closed"] == 2  # the reservation's file, still
        assert isinstance(report["mprotect"], dict) and report["mprotect"]["views"] == 0


def test_fork_snapshots_an_alias_written_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hugetlb layout (a whole-pack file written through a MADV_DONTFORK alias, its
    view mapped from a read-only descriptor), here on an ordinary memfd standing in for
    the hugetlbfs one: the child gets the snapshot and no descriptor, and its release
    leaves the parent's alias alone (a child has none)."""
    with NativeBackend("dual") as b, execmem.Allocator(backend=b) as a:
        stand_in = lambda size, scratch: _file_of(size)  # noqa: E731
        monkeypatch.setattr(b._mapper.backing, "try_hugetlb", stand_in)
        switch = Switch((7, 8))
        t = a.jit_text_alloc(64)
        t.write(0, switch.code(t.address))
        t.map()
        region = t._pack.reservation.token
        assert region.write_base and region.rw_fd < 0  # written through the alias
        fn = t.function(ctypes.c_int32)
        inode = _mapped_inode(next(v for v in _procmaps.read_maps() if v.overlaps(t.address, 1)))
        assert inode is not None

        def child() -> dict[str, object]:
            report: dict[str, object] = {"fork": S(b)["fork"], "call": fn(), "fds": _file_fds(inode)}
            b.close()
            return report

        report, status = report_from_child(child)
        t.update(0, switch.patch(1, t.address))
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert report["call"] == 7 and fn() == 8 and report["fds"] == []
        fork = report["fork"]
        assert isinstance(fork, dict) and fork["moved"] == 1 and fork["bytes"] == 2 << 20, fork
        assert fork["descriptors_closed"] == 1  # the view's (read-only) one: there is no other


def _file_of(size: int) -> int:
    fd = os.memfd_create("execmem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


class _Recorder:
    def __init__(self, features: frozenset[str]) -> None:
        self.features, self.calls = features, []  # type: list[tuple[str, list[tuple[int, int]]]]

    def run(self, step: str, ranges: list[tuple[int, int]]) -> None:
        self.calls.append((step, ranges))


@pytest.mark.parametrize(("arch", "features", "steps"), [
    ("arm64", frozenset(), ["clean_dcache", "barrier", "invalidate_icache", "barrier"]),
    ("arm64", frozenset({"idc"}), ["barrier", "invalidate_icache", "barrier"]),
    ("riscv64", frozenset(), ["barrier"]),
    ("x86_64", frozenset(), []),  # coherent fetch: nothing, and no synchronizer is made
])
def test_snapshots_get_the_architectures_cache_maintenance(arch: str, features: frozenset[str], steps: list[str]) -> None:
    """A snapshot is fresh memory with code written into it: before it runs it gets the
    maintenance the architecture's publish_fresh recipe gives new code (arm64: DC CVAU
    unless IDC, DSB, IC IVAU, DSB; the recipe's map and local_cse steps excepted)."""
    from execmem.arch import get

    recorder, spec = _Recorder(features), get(arch)

    class Backend:
        arch = spec

        def _synchronizer(self) -> _Recorder:
            if not steps:
                raise AssertionError("no maintenance: no synchronizer needed")
            return recorder

    native_fork._maintain(Backend(), [(0x10000, 0x20000)])  # type: ignore[arg-type]
    assert recorder.calls == [(step, [(0x10000, 0x20000)]) for step in steps]


def _nr_hugepages() -> int:
    try:
        with open("/proc/sys/vm/nr_hugepages") as f:
            return int(f.read())
    except OSError:
        return 0


@pytest.mark.skipif(_nr_hugepages() < 2, reason="no hugetlb pages reserved (vm.nr_hugepages)")
def test_fork_snapshots_a_hugetlb_pack() -> None:
    with NativeBackend("dual") as b, execmem.Allocator(backend=b) as a:
        switch = Switch((7, 8))
        t = a.jit_text_alloc(64)
        t.write(0, switch.code(t.address))
        t.map()
        assert S(b)["huge_pages"]["hugetlb"] == "in use"
        fn = t.function(ctypes.c_int32)
        report, status = report_from_child(lambda: {"fork": S(b)["fork"], "call": fn()})
        t.update(0, switch.patch(1, t.address))
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert report["call"] == 7 and fn() == 8
        fork = report["fork"]
        assert isinstance(fork, dict) and fork["moved"] == 1 and fork["bytes"] == 2 << 20, fork


# --- the allocator in a forked child ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_allocator_in_a_forked_child_refuses_and_parent_is_untouched(mode: str) -> None:
    with native_allocator(mode) as a:
        t = live(a, 42)
        r = a.jit_text_alloc(16)  # RESERVED
        fn = t.function(ctypes.c_int)
        execmem.jit_text_alloc(16).free()  # the parent's default allocator exists
        parent_default = execmem.default_allocator()

        def child() -> int:
            failures = 0
            for attempt in (
                lambda: a.jit_text_alloc(16),
                lambda: r.write(0, const(1)),
                r.map,
                lambda: t.update(0, const(1)),
                t.free,
                lambda: t.function(ctypes.c_int),
                a.stats,
                lambda: a.publish([r]),
            ):
                try:
                    attempt()
                    failures += 1
                except ForkedProcessError:
                    pass
            if fn() != 42:  # the inherited read+execute view still runs the parent's code
                failures += 1
            # The child's default allocator is its own, on private memory, and works.
            d = execmem.default_allocator()
            if d is parent_default:
                failures += 1
            c = live(d, 9)
            if c.function(ctypes.c_int)() != 9:
                failures += 1
            c.free()
            a.close()  # allowed: drops only the child's view of things
            return failures

        assert exited(run_in_child(child))
        assert fn() == 42 and t.read()[: P.CONST_SIZE] == const(42)
        r.write(0, const(8))
        r.map()
        assert r.function(ctypes.c_int)() == 8
        assert execmem.default_allocator() is parent_default
        assert a.stats()["texts"]["LIVE"] == 2


def _child_overwrites_code(address: int) -> Callable[[], int]:
    def child() -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = address & ~4095
        if libc.mprotect(page, 4096, 3) != 0:  # PROT_READ | PROT_WRITE
            return 0  # refused: the child cannot write the code
        ctypes.memmove(address, const(99), P.CONST_SIZE)
        return 0

    return child


def test_a_child_cannot_change_the_parents_code_mprotect_mode() -> None:
    with native_allocator("mprotect") as a:
        t = live(a, 7)
        fn = t.function(ctypes.c_int)
        assert exited(run_in_child(_child_overwrites_code(t.address)))
        assert fn() == 7  # private memory: the child wrote its own copy


def test_a_child_cannot_change_the_parents_code_dual_mode() -> None:
    with native_allocator("dual") as a:
        t = live(a, 7)
        fn = t.function(ctypes.c_int)
        assert exited(run_in_child(_child_overwrites_code(t.address)))
        assert fn() == 7


def test_fork_while_another_thread_holds_the_allocator_lock() -> None:
    with native_allocator() as a:
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with a._lock:
                holding.set()
                release.wait(10)

        th = threading.Thread(target=hold, daemon=True)
        th.start()
        holding.wait(10)
        try:

            def child() -> int:
                try:
                    a.jit_text_alloc(16)
                except ForkedProcessError:
                    return 0
                return 1

            status = run_in_child(child, timeout=3)
        finally:
            release.set()
            th.join(10)
        assert exited(status), f"child status {status:#x} (SIGALRM: deadlocked)"
