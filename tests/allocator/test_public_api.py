"""The public surface: pinned names, the module-level default allocator, calls and
free during a call on real memory, and a smoke run on the modeled machine."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import programs as P
import pytest
from programs import needs_programs

import execmem
from execmem._errors import UseAfterFreeError


def S(a: execmem.Allocator) -> dict[str, Any]:
    return a.stats()


def test_public_names_are_pinned() -> None:
    assert sorted(execmem.__all__) == sorted(
        [
            "AlignmentError",
            "Allocator",
            "AssemblyError",
            "BadNameError",
            "BadStateError",
            "ExecmemError",
            "ForkedProcessError",
            "JitData",
            "JitFunction",
            "JitText",
            "LitmusError",
            "ModelError",
            "OutOfBoundsError",
            "OutOfMemoryError",
            "SizeError",
            "SystemCallError",
            "TextState",
            "UnsafePatchError",
            "UnsupportedError",
            "UseAfterFreeError",
            "__version__",
            "arch",
            "asm",
            "compile_function",
            "default_allocator",
            "jit_data_alloc",
            "jit_text_alloc",
            "jit_text_alloc_many",
            "jit_text_free",
            "publish",
            "serialize_all_threads",
            "sync_code",
            "text_at",
        ]
    )
    for name in execmem.__all__:
        assert hasattr(execmem, name), name
    assert [s.name for s in execmem.TextState] == ["RESERVED", "WRITING", "LIVE", "FREED"]


@needs_programs
def test_module_level_default_allocator() -> None:
    t = execmem.jit_text_alloc(16)
    assert t.address % 16 == 0 and t.state is execmem.TextState.RESERVED
    t.write(0, P.ADD)
    execmem.publish([t])
    add = t.function(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
    assert add(40, 2) == 42
    switch = P.Switch((7, 9))
    u = execmem.jit_text_alloc(len(switch.code(0)))
    u.map_rw_inplace()
    u.write(0, switch.code(u.address))
    u.finalize()
    assert u.function(ctypes.c_int)() == 7
    u.update(0, switch.patch(1, u.address))  # one whole patchable instruction in one word
    assert u.function(ctypes.c_int)() == 9
    execmem.jit_text_free(t)
    execmem.jit_text_free(u)
    with pytest.raises(UseAfterFreeError):
        add(1, 2)


@needs_programs
def test_free_during_a_call_defers_refill_and_quarantine() -> None:
    from execmem.native import NativeBackend

    backend = NativeBackend()
    a = execmem.Allocator(backend=backend, pack_size=1 << 16)
    try:
        anchor = a.jit_text_alloc(16)
        anchor.map()  # the pack is mapped: frees are quarantined
        t = a.jit_text_alloc(32)
        code = P.SPIN  # spins until the 8 bytes at its argument are non-zero, returns 7
        t.write(0, code)
        t.map()
        fn = t.function(ctypes.c_int, ctypes.c_void_p)
        flag = ctypes.c_uint64(0)
        results: list[int] = []
        caller = threading.Thread(target=lambda: results.append(fn(ctypes.addressof(flag))))
        caller.start()
        deadline = time.monotonic() + 5
        while t._inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert t._inflight == 1
        t.free()
        assert t.state is execmem.TextState.FREED
        with pytest.raises(UseAfterFreeError):
            fn(ctypes.addressof(flag))  # no new calls
        # The running call still sees its code: no refill yet, nothing quarantined.
        assert ctypes.string_at(t.address, len(code)) == code
        assert S(a)["totals"]["quarantined_bytes"] == 0
        assert S(a)["events"]["frees_deferred"] == 1
        flag.value = 1
        caller.join(5)
        assert results == [7]
        # The last call returned: the next verb reclaims the text into quarantine, and
        # the next epoch refills it.
        assert S(a)["totals"]["quarantined_bytes"] == 64
        anchor.free()
        a.jit_text_alloc(16).map()  # a publish into the mapped pack: an epoch
        assert ctypes.string_at(t.address, len(code)) == P.traps(len(code))
    finally:
        flag.value = 1
        a.close()
        backend.close()


def test_smoke_on_the_modeled_machine() -> None:
    from execmem.emu import Machine

    m = Machine("arm64", cpus=2)
    a = execmem.Allocator(backend=m, pack_size=4096)
    t = a.jit_text_alloc(16)
    t.write(0, execmem.asm("mov x0, #42\nret", "arm64", t.address))
    t.map()
    assert m.call(t.address) == 42
    u = a.jit_text_alloc(16)  # the pack is mapped now: publish with membarrier
    u.write(0, execmem.asm("mov x0, #7\nret", "arm64", u.address))
    u.map()
    assert m.call(u.address) == 7
    w = a.jit_text_alloc(20)
    w.write(0, execmem.asm("nop\nmov x0, #42\nret\nmov x0, #5\nret", "arm64", w.address))
    w.map()
    assert m.call(w.address) == 42
    w.update(0, execmem.asm(f"b {w.address + 12}", "arm64", w.address))  # NOP -> B: both CMODX
    assert m.call(w.address) == 5
    t.free()
    assert S(a)["epochs"]["completed"] >= 1


def test_allocator_runs_on_the_modeled_machine() -> None:
    """The part of the smoke test that does not depend on ``Machine.call``."""
    from execmem.emu import Machine

    m = Machine("arm64", cpus=2)
    a = execmem.Allocator(backend=m, pack_size=4096)
    t = a.jit_text_alloc(16)
    t.write(0, execmem.asm("mov x0, #42\nret", "arm64", t.address))
    t.map()
    u = a.jit_text_alloc(16)
    u.write(0, execmem.asm("mov x0, #7\nret", "arm64", u.address))
    u.map()
    host = [action.note for action in m._cpus[0].host]
    assert host[:2] == [f"write {0x10000000:#x}", f"write {0x10000008:#x}"]
    assert any(note.startswith("map ") for note in host)
    assert "membarrier SYNC_CORE: IPI" in host  # the second text lands in a mapped pack
    stats = a.stats()
    assert stats["recipes"] == {"publish_fresh": 1, "publish": 1}
    assert stats["mode"] == "emulated"


def test_a_native_backend_runs_the_recipes_of_the_spec_it_is_given() -> None:
    """Mutations are data handed to a backend (``ArchSpec.with_recipes``), as the
    verification catalog hands them to the modeled machine; no allocator option
    reaches them.  A spec of another architecture is refused."""
    from execmem.native import NativeBackend

    step = P.HOST.publish.names[-1]
    mutated = P.HOST.with_recipes(publish=P.HOST.publish.without(step))
    backend = NativeBackend("dual", arch=mutated)
    try:
        with execmem.Allocator(backend=backend, pack_size=1 << 16) as a:
            for _ in range(2):  # the second publishes into the mapped pack: ``publish``
                a.jit_text_alloc(16).map()
            assert S(a)["recipes"] == {"publish_fresh": 1, f"publish-without-{step}": 1}
            assert step not in S(a)["steps"] or step in P.HOST.publish_fresh.names
    finally:
        backend.close()
    other = next(name for name in ("x86_64", "arm64") if name != P.HOST.name)
    with pytest.raises(execmem.UnsupportedError, match=r"runs \w+ code only"):
        NativeBackend("dual", arch=execmem.arch.get(other))
