"""Reliability of a text's whole life on the native backend: use after free, free
during calls, W^X for the whole process, and lifetimes (dropped allocators, context
managers, frees beside a running text in mprotect mode).

Fork and signals are ``fork_and_signals/``; the one-caller case of a free during a
call is ``test_public_api.py::test_free_during_a_call_defers_refill_and_quarantine``.
``pytest -s`` prints a few figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import programs as P
import pytest
from programs import const, exited, live, native_allocator, run_in_child, traps

import execmem
from execmem import JitText, TextState, _gates
from execmem._errors import UseAfterFreeError
from execmem.native import NativeBackend, _procmaps

pytestmark = P.needs_programs

SMALL = 1 << 16


def S(a: execmem.Allocator) -> dict[str, Any]:
    return a.stats()


# --- use after free ---------------------------------------------------------------------


def test_callable_made_before_free_refuses_after_free_even_after_va_reuse() -> None:
    with native_allocator() as a:
        anchor = live(a, 1)  # keeps the pack mapped
        t = live(a, 2)
        old_address = t.address
        fn = t.function(ctypes.c_int)
        assert fn() == 2
        t.free()
        with pytest.raises(UseAfterFreeError, match="freed"):
            fn()
        # Reuse the VA: allocate and publish until the quarantine epoch has passed and
        # the freed chunks come back (publishing into a mapped pack runs epochs).
        reused: JitText | None = None
        others: list[JitText] = []
        for k in range(200):
            u = live(a, 100 + k)
            if u.address == old_address:
                reused = u
                break
            others.append(u)
        assert reused is not None, "the freed address never came back"
        new_fn = reused.function(ctypes.c_int)
        assert new_fn() == 100 + k  # the new code runs at the old address
        with pytest.raises(UseAfterFreeError):
            fn()  # the old callable still refuses: it is bound to the handle, not the VA
        # Every verb of the freed handle refuses clearly, and nothing changes.
        before = (S(a)["texts"], a.occupancy())
        for verb in (
            lambda: t.write(0, b"\x90"),
            lambda: t.update(0, const(3)),
            t.map,
            t.map_rw_inplace,
            t.finalize,
            lambda: t.function(ctypes.c_int),
            t.read,
            t.free,
            lambda: execmem.jit_text_free(t),
            lambda: a.publish([t]),
        ):
            with pytest.raises(UseAfterFreeError):
                verb()
        assert (S(a)["texts"], a.occupancy()) == before
        assert new_fn() == 100 + k and anchor.function(ctypes.c_int)() == 1
        print(f"\n[uaf] the freed address came back after {len(others) + 1} publishes")


def test_close_turns_every_callable_into_use_after_free() -> None:
    backend = NativeBackend()
    a = execmem.Allocator(backend=backend, pack_size=SMALL)
    t = live(a, 5)
    fn = t.function(ctypes.c_int)
    assert fn() == 5
    a.close()
    backend.close()
    with pytest.raises(UseAfterFreeError):
        fn()  # the memory is gone: the call must be refused, not jump into unmapped VA
    with pytest.raises(execmem.BadStateError, match="closed"):
        t.free()


def _spin_text(a: execmem.Allocator) -> JitText:
    t = a.jit_text_alloc(64)
    t.write(0, P.SPIN)  # spins until the 8 bytes at its argument are non-zero, returns 7
    t.write(32, P.SPIN)  # a second entry point
    t.map()
    return t


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_free_during_many_concurrent_calls_waits_for_the_last() -> None:
    """Extends the one-caller test in test_public_api: several threads, two callables
    (two entry points) of the same text; reclamation waits for the very last return,
    and the VA is not handed out while any call is in flight."""
    with native_allocator() as a:
        live(a, 1)  # the pack is mapped: frees are quarantined
        t = _spin_text(a)
        code = t.read()
        entries = [t.function(ctypes.c_int, ctypes.c_void_p), t.function(ctypes.c_int, ctypes.c_void_p, offset=32)]
        callers = 6
        flags = [ctypes.c_uint64(0) for _ in range(callers)]
        results: list[int] = []
        lock = threading.Lock()

        def call(k: int) -> None:
            r = entries[k % 2](ctypes.addressof(flags[k]))
            with lock:
                results.append(r)

        threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(callers)]
        try:
            for th in threads:
                th.start()
            _wait(lambda: t._inflight == callers)
            t.free()
            assert t.state is TextState.FREED
            with pytest.raises(UseAfterFreeError):
                entries[0](ctypes.addressof(flags[0]))
            with pytest.raises(UseAfterFreeError):
                t.function(ctypes.c_int)
            # While calls run, new allocations never get the text's VA.
            others = [live(a, 10 + k) for k in range(40)]
            assert all(not (t.address <= o.address < t.address + 64) for o in others)
            for k in range(callers):
                assert ctypes.string_at(t.address, 64) == code, f"refilled with {callers - k} calls in flight"
                assert S(a)["totals"]["quarantined_bytes"] == 0
                flags[k].value = 1
                threads[k].join(10)
                assert not threads[k].is_alive()
            assert results == [7] * callers
            # The next verb reclaims it into quarantine; the next epoch refills it.
            assert S(a)["events"]["frees_deferred"] == 1
            assert S(a)["totals"]["quarantined_bytes"] >= 64
            live(a, 99)  # a publish into the mapped pack: an epoch
            assert ctypes.string_at(t.address, 64) == traps(64)
            assert all(o.function(ctypes.c_int)() == 10 + k for k, o in enumerate(others))
        finally:
            for f in flags:
                f.value = 1
            for th in threads:
                th.join(10)


def test_a_failing_call_does_not_leak_an_in_flight_count() -> None:
    """ctypes refusing the arguments (ArgumentError) happens inside the counted call."""
    with native_allocator() as a:
        t = live(a, 9)
        fn = t.function(ctypes.c_int, ctypes.c_int)
        with pytest.raises(ctypes.ArgumentError):
            fn("not an int")
        assert t._inflight == 0
        t.free()
        assert S(a)["events"].get("frees_deferred", 0) == 0


def test_jumping_into_freed_text_executes_only_traps() -> None:
    """A raw pointer (not tracked) into a freed text, from the epoch after the free on:
    the child that calls it dies with SIGTRAP at the first byte (never-written filler is
    covered in test_fork)."""
    with native_allocator() as a:
        live(a, 1)
        t = live(a, 4, size=64)
        raw = t.address
        t.free()
        live(a, 2)  # a publish into the mapped pack: the epoch that refills the freed text
        assert ctypes.string_at(raw, 64) == traps(64)
        status = run_in_child(lambda: ctypes.CFUNCTYPE(ctypes.c_int)(raw)() and 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTRAP


def test_close_during_a_call_does_not_crash() -> None:
    """close() while a call through function() runs is refused and changes nothing;
    it works once the call returned (formerly it unmapped the running code: SIGSEGV)."""

    def child() -> int:
        with native_allocator() as a:
            t = _spin_text(a)
            fn = t.function(ctypes.c_int, ctypes.c_void_p)
            flag = ctypes.c_uint64(0)
            out: list[int] = []
            th = threading.Thread(target=lambda: out.append(fn(ctypes.addressof(flag))), daemon=True)
            th.start()
            _wait(lambda: t._inflight == 1)
            try:
                a.close()
                refused = False
            except execmem.BadStateError:
                refused = t.state is TextState.LIVE
            flag.value = 1
            th.join(5)
            a.close()
            return 0 if out == [7] and refused else 3

    assert exited(run_in_child(child))


# --- W^X for the whole process ------------------------------------------------------------


def _wx_vmas() -> list[Any]:
    return [v for v in _procmaps.read_maps() if "w" in v.perms and "x" in v.perms]


class Closures:
    """Wraps ``ctypes.CFUNCTYPE`` so that instantiating a prototype with a Python
    callable (a libffi closure: writable+executable trampoline) is recorded with the
    file that asked for it."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.prototypes = 0
        self.pointers = 0

    @contextlib.contextmanager
    def watch(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Closures]:
        real = ctypes.CFUNCTYPE
        spy = self

        def cfunctype(restype: Any, *argtypes: Any, **kw: Any) -> Any:
            proto = real(restype, *argtypes, **kw)
            spy.prototypes += 1

            class Watched(proto):  # type: ignore[valid-type,misc]
                _flags_ = proto._flags_
                _restype_ = proto._restype_
                _argtypes_ = proto._argtypes_

                def __init__(self, *args: Any) -> None:
                    if args and callable(args[0]) and not isinstance(args[0], int):
                        spy.created.append(sys._getframe(1).f_code.co_filename)
                    else:
                        spy.pointers += 1

            return Watched

        def pyfunctype(restype: Any, *argtypes: Any) -> Any:  # the call gates' prototypes
            return cfunctype(restype, *argtypes, _pyfunctype=True)

        real_py = ctypes.PYFUNCTYPE
        real_c = real
        real = lambda restype, *argtypes, _pyfunctype=False, **kw: (  # noqa: E731
            real_py(restype, *argtypes) if _pyfunctype else real_c(restype, *argtypes, **kw)
        )
        monkeypatch.setattr(ctypes, "CFUNCTYPE", cfunctype)
        monkeypatch.setattr(ctypes, "PYFUNCTYPE", pyfunctype)
        monkeypatch.setattr(_gates, "_classes", {})  # prototypes made before the spy
        yield self


def test_the_spy_sees_closures(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Closures()
    with spy.watch(monkeypatch):
        cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x + 1)
        assert cb(1) == 2
        ctypes.CFUNCTYPE(ctypes.c_int)(0x1000)
    assert spy.created == [__file__] and spy.pointers == 1


def _workload(mode: str, scan: Callable[[str], None], capsys: pytest.CaptureFixture[str]) -> None:
    from execmem.examples import bf, bpf, calc

    with native_allocator(mode) as a:
        texts = [live(a, k) for k in range(8)]
        scan(f"{mode}: map")
        u = a.jit_text_alloc(4096, 4096)  # whole pages: in-place is allowed in every mode
        u.map_rw_inplace()
        scan(f"{mode}: map_rw_inplace")
        u.write(0, const(77))
        u.finalize()
        assert u.function(ctypes.c_int)() == 77
        with a.batch():
            more = [a.jit_text_alloc(16) for _ in range(20)]
            for k, m in enumerate(more):
                m.write(0, const(200 + k))
                m.map()
        scan(f"{mode}: batch")
        execmem.publish(p for p in [a.jit_text_alloc(16)])
        if mode == "dual":
            switch = P.Switch((1, 2))
            v = a.jit_text_alloc(len(switch.code(0)))
            v.write(0, switch.code(v.address))
            v.map()
            v.update(0, switch.patch(1, v.address))
            assert v.function(ctypes.c_int)() == 2
            scan(f"{mode}: update")
        for t in texts[::2]:
            t.free()
        scan(f"{mode}: free")
        assert all(m.function(ctypes.c_int)() == 200 + k for k, m in enumerate(more))
    scan(f"{mode}: close")
    if P.HOST.name == "x86_64":  # the bf and bpf examples compile to x86-64 only
        jit = bf.JIT()
        assert jit.compile("++++++++[>++++++++<-]>+.")() == b"A"
        scan("bf")
        assert bpf.main([]) == 0
        capsys.readouterr()
        scan("bpf")
    with calc.Compiler() as c:
        assert c.compile("1 + 2 * x")(x=20) == 41
    scan("calc")


def test_no_writable_and_executable_memory_and_no_closures(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ranges: list[tuple[int, int]] = []
    real_reserve = NativeBackend.reserve

    def reserve(self: NativeBackend, *args: Any, **kw: Any) -> Any:
        r = real_reserve(self, *args, **kw)
        ranges.extend(self.owned_ranges())
        return r

    monkeypatch.setattr(NativeBackend, "reserve", reserve)
    scans = 0
    wx_elsewhere: set[str] = set()
    bad: list[str] = []

    def scan(step: str) -> None:
        nonlocal scans
        scans += 1
        for v in _wx_vmas():
            ours = "execmem" in v.path or any(v.overlaps(start, size) for start, size in ranges)
            if ours:
                bad.append(f"{step}: {v}")
            else:
                wx_elsewhere.add(v.path or "[anon]")

    import execmem.emu  # noqa: F401  (imports Unicorn, whose hook prototypes are module globals)
    from execmem.examples import bf, bpf, calc  # noqa: F401

    spy = Closures()
    with spy.watch(monkeypatch):
        for mode in ("dual", "mprotect"):
            _workload(mode, scan, capsys)
    assert bad == []
    ours = [f for f in spy.created if f"{os.sep}execmem{os.sep}" in f or f"{os.sep}jit_examples{os.sep}" in f]
    assert ours == [], f"libffi closures created by {ours}"
    assert spy.pointers > 0  # the wrapper really saw execmem's function pointers
    with capsys.disabled():
        print(
            f"\n[w^x] {scans} scans of /proc/self/maps, {len(ranges)} execmem ranges watched, "
            f"0 W+X in them; W+X elsewhere in the process: {sorted(wx_elsewhere) or 'none'}; "
            f"{spy.pointers} function pointers, {len(spy.created)} closures ({len(ours)} from execmem/jit_examples)"
        )


# --- lifetimes ------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _execmem_vmas() -> int:
    gates = _gates.allocator_of_gates()
    kept = [] if gates is None else gates.backend.owned_ranges()  # type: ignore[attr-defined]
    return sum(1 for v in _procmaps.read_maps() if "execmem" in v.path and not any(v.overlaps(s, n) for s, n in kept))


def _drop_one(with_text: bool) -> None:
    a = execmem.Allocator(backend=None, pack_size=SMALL)
    t = a.jit_text_alloc(16)
    if with_text:
        t.write(0, const(5))
        t.map()


def test_an_unreachable_allocator_releases_its_memory_with_a_resource_warning() -> None:
    import gc
    import warnings

    gc.collect()
    fds, vmas = _fds(), _execmem_vmas()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        _drop_one(with_text=True)
        gc.collect()
    assert (_fds(), _execmem_vmas()) == (fds, vmas)
    messages = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert len(messages) == 1 and "never closed" in messages[0] and "64 bytes of texts" in messages[0], messages
    with warnings.catch_warnings(record=True) as caught:  # closed: nothing to say
        warnings.simplefilter("always", ResourceWarning)
        with execmem.Allocator() as a:
            live(a, 1)
        del a
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("count", [pytest.param(300, id="300"), pytest.param(10_000, id="10000", marks=pytest.mark.slow)])
def test_dropped_allocators_leave_descriptors_and_vmas_flat(count: int) -> None:
    """Issue 11: 3,000 dropped allocators used to hold 6,006 descriptors."""
    import gc
    import warnings

    gc.collect()
    fds, vmas = _fds(), _execmem_vmas()
    peak = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for i in range(count):
            _drop_one(with_text=i % 2 == 0)
            if i % 100 == 99:
                gc.collect()
                peak = max(peak, _fds() - fds)
        gc.collect()
    print(f"\n[lifetimes] {count} dropped allocators: descriptors {fds} -> {_fds()} (peak +{peak}), "
          f"execmem VMAs {vmas} -> {_execmem_vmas()}")
    assert (_fds(), _execmem_vmas()) == (fds, vmas)
    assert peak <= 2 * 100 + 4  # at most what the allocators between two collections hold


def test_texts_and_allocators_are_context_managers() -> None:
    with native_allocator() as a:
        with a.jit_text_alloc(16) as t:
            t.write(0, const(3))
            t.map()
            assert t.function(ctypes.c_int)() == 3
        assert t.state is TextState.FREED
        with a.jit_text_alloc(16) as u:
            u.free()  # freed inside the block: nothing left to do at its end
        assert u.state is TextState.FREED
    assert a.stats()["closed"]


def test_mprotect_free_never_stops_a_text_running_on_the_same_page() -> None:
    """Issue 11: freeing texts that share a page with a running text killed it
    (SIGSEGV: the refill made the page non-executable).  Now the refill of their chunks
    waits until no text is left in the page; the running text completes."""

    def child() -> int:
        with native_allocator("mprotect") as a:
            texts = a.jit_text_alloc_many([64] * 8)  # densely packed: one page
            codes = [P.SPIN] + [const(10 + k) for k in range(1, 8)]
            a.publish(texts, codes)
            fn = texts[0].function(ctypes.c_int, ctypes.c_void_p)
            flag = ctypes.c_uint64(0)
            out: list[int] = []
            th = threading.Thread(target=lambda: out.append(fn(ctypes.addressof(flag))), daemon=True)
            th.start()
            _wait(lambda: texts[0]._inflight == 1)
            for t in texts[1:]:
                t.free()  # same page as the running text
            kept = ctypes.string_at(texts[1].address, P.CONST_SIZE) == const(11)  # its refill waits
            flag.value = 1
            th.join(5)
            texts[0].free()  # the last text of the page: at the next epoch, all refilled
            u = a.jit_text_alloc(4096, 4096)
            u.write(0, const(1))
            u.map()  # a publish into the mapped pack (its own page): an epoch
            refilled = ctypes.string_at(texts[0].address, 64 * 8) == traps(64 * 8)
            return 0 if out == [7] and kept and refilled else 3

    assert exited(run_in_child(child))
