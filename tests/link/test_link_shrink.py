"""``JitText.shrink``: the unused tail back under free's rules; growing refused."""

from __future__ import annotations

import ctypes

import programs as P
import pytest

import execmem
from execmem._memory_backend import MemoryBackend
from execmem._shrink import shrink
from execmem.emu import Machine
from execmem.native import NativeBackend


def fingerprint(backend: MemoryBackend, a: execmem.Allocator, t: execmem.JitText) -> tuple[object, ...]:
    return (backend.snapshot(), a.stats(), t.state, t.size, t.read(), a.occupancy())


@pytest.fixture
def memory() -> tuple[MemoryBackend, execmem.Allocator]:
    backend = MemoryBackend("arm64")
    a = execmem.Allocator(backend=backend, pack_size=1 << 14)
    yield backend, a
    a.close()


def test_a_live_text_gives_its_tail_back_after_an_epoch(memory: tuple[MemoryBackend, execmem.Allocator]) -> None:
    backend, a = memory
    t = a.jit_text_alloc(1000)
    code = bytes.fromhex("1f2003d5") * 250  # nop
    t.write(0, code)
    t.map()
    t.shrink(100)
    assert t.size == 100 and t.read() == code[:100] and t.state is execmem.TextState.LIVE
    assert t._nchunks == 2  # 100 bytes in 64-byte chunks
    pack = a.stats()["packs"][0]
    assert pack["live_bytes"] == 128 and pack["quarantined_bytes"] == 1024 - 128
    u = a.jit_text_alloc(64)
    assert u.address >= t.address + 1024  # not in the quarantined tail
    a.serialize_all_threads()  # an epoch: the tail is free, and refilled with traps
    assert backend.read(t.address + 128, 1024 - 128) == a.arch.trap_bytes(1024 - 128)
    assert backend.read(t.address, 100) == code[:100]
    v = a.jit_text_alloc(64)
    assert v.address == t.address + 128


def test_a_reserved_text_in_an_unmapped_pack_gives_its_tail_back_at_once(
    memory: tuple[MemoryBackend, execmem.Allocator],
) -> None:
    _, a = memory
    t = a.jit_text_alloc(640, align=64)
    t.write(0, b"\x01" * 640)
    t.shrink(65)
    assert t.read() == b"\x01" * 65
    u = a.jit_text_alloc(64)
    assert u.address == t.address + 128
    assert a.stats()["totals"]["quarantined_bytes"] == 0
    t.map()  # only what is left is published
    assert a.stats()["texts"]["LIVE"] == 1


def test_refusals_change_nothing(memory: tuple[MemoryBackend, execmem.Allocator]) -> None:
    backend, a = memory
    t = a.jit_text_alloc(200)
    before = fingerprint(backend, a, t)
    with pytest.raises(execmem.SizeError, match="never grows"):
        t.shrink(201)
    for bad, error in ((0, execmem.SizeError), (-1, execmem.SizeError), ("x", TypeError), (2.5, TypeError)):
        with pytest.raises(error):
            t.shrink(bad)  # type: ignore[arg-type]
    t.shrink(200)  # the same size: nothing to do
    assert fingerprint(backend, a, t) == before
    with a.batch():
        t.map()
        with pytest.raises(execmem.BadStateError, match="queued"):
            t.shrink(10)
    w = a.jit_text_alloc(200)
    w.map_rw_inplace()
    with pytest.raises(execmem.BadStateError, match="finalize"):
        w.shrink(10)
    w.finalize()
    w.free()
    with pytest.raises(execmem.UseAfterFreeError):
        w.shrink(10)
    other = execmem.Allocator(backend=MemoryBackend("arm64"), pack_size=1 << 14)
    with pytest.raises(execmem.BadStateError, match="another allocator"):
        shrink(other, t, 10)
    other.close()


def test_whole_write_units_stay_with_a_live_text_in_mprotect_like_mode() -> None:
    backend = MemoryBackend("x86_64", write_unit=4096)
    with execmem.Allocator(backend=backend, pack_size=1 << 16) as a:
        a.jit_text_alloc(16).map()  # the pack is mapped
        t = a.jit_text_alloc(3 * 4096)
        t.write(0, b"\x90" * 10)
        t.map()
        t.shrink(10)
        assert t._nchunks * a.granularity == 4096  # one whole write unit kept


@P.needs_programs
@pytest.mark.parametrize("mode", ["dual", "mprotect"])
def test_shrink_natively_keeps_the_text_running(mode: str) -> None:
    with execmem.Allocator(backend=NativeBackend(mode)) as a:
        t = a.jit_text_alloc(4096)
        t.write(0, P.const(42))
        t.map()
        f = t.function(ctypes.c_int)
        t.shrink(P.CONST_SIZE)
        assert f() == 42 and t.function(ctypes.c_int)() == 42
        assert a.stats()["totals"]["live_bytes"] == (a.granularity if mode == "dual" else 4096)


def test_shrink_on_the_modeled_machine() -> None:
    m = Machine("arm64", cpus=2)
    a = execmem.Allocator(backend=m, pack_size=4096)
    t = a.jit_text_alloc(1024)
    t.write(0, execmem.asm("mov x0, #42\nret", "arm64", t.address))
    t.map()
    t.shrink(8)
    u = a.jit_text_alloc(16)  # after the quarantined tail
    u.write(0, execmem.asm("mov x0, #7\nret", "arm64", u.address))
    u.map()
    assert (m.call(t.address), m.call(u.address)) == (42, 7)
    assert u.address >= t.address + 1024
