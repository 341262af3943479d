"""``sync_code`` and ``serialize_all_threads``: the host recipe over code execmem did not write."""

from __future__ import annotations

import ctypes
import mmap

import pytest

import execmem
from execmem._foreign import sync_recipe
from execmem._memory_backend import MemoryBackend
from execmem.emu import Machine
from execmem.native import NativeBackend

#: ``return 42`` on the host, for code written by "another library" (an mmap here).
RETURN_42 = {"x86_64": "mov eax, 42\nret", "arm64": "mov x0, #42\nret", "riscv64": "li a0, 42\nret"}


@pytest.fixture
def native() -> execmem.Allocator:
    a = execmem.Allocator(backend=NativeBackend())
    yield a
    a.close()


def test_sync_code_makes_foreign_code_runnable_natively(native: execmem.Allocator) -> None:
    spec = native.arch
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        code = execmem.asm(RETURN_42[spec.name], address=address)
        buf[: len(code)] = code
        native.sync_code(address, len(code))
        assert ctypes.CFUNCTYPE(ctypes.c_int)(address)() == 42
        stats = native.stats()
        assert stats["recipes"]["sync_code"] == 1
        expected = [s.name for s in sync_recipe(spec.publish).effective(native.backend.cache_features)]
        assert "write" not in expected and "map" not in expected
        for name in expected:
            assert stats["steps"][name] >= 1, name
        assert stats["epochs"]["completed"] == 1  # the remote step is one epoch
    finally:
        buf.close()


def test_sync_code_refuses_unmapped_and_bad_ranges(native: execmem.Allocator) -> None:
    # A page mapped and unmapped again: a hole in the address space.
    buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    buf.close()
    before = native.stats()
    with pytest.raises(execmem.OutOfBoundsError, match="not entirely mapped readable"):
        native.sync_code(address, 16)
    with pytest.raises(execmem.OutOfBoundsError):
        native.sync_code(-4096, 16)
    with pytest.raises(execmem.SizeError):
        native.sync_code(address, 0)
    with pytest.raises(TypeError):
        native.sync_code("here", 16)  # type: ignore[arg-type]
    assert native.stats() == before  # nothing ran


def test_sync_code_refuses_a_page_without_read_permission(native: execmem.Allocator) -> None:
    t = native.jit_text_alloc(64)
    t.write(0, execmem.asm(RETURN_42[native.arch.name], address=t.address))
    with pytest.raises(execmem.OutOfBoundsError):  # reserved but not mapped yet: PROT_NONE
        native.sync_code(t.address, 64)
    t.map()
    native.sync_code(t.address, 64)  # harmless over execmem's own live text


def test_module_level_sync_code_and_serialize_all_threads() -> None:
    before = execmem.default_allocator().stats()["epochs"]["completed"]
    execmem.serialize_all_threads()
    here = ctypes.create_string_buffer(64)
    execmem.sync_code(ctypes.addressof(here), 64)
    assert execmem.default_allocator().stats()["epochs"]["completed"] == before + 2


def test_sync_code_runs_the_publish_recipe_on_the_memory_backend() -> None:
    for arch, features in (("arm64", ()), ("arm64", ("idc", "dic")), ("x86_64", ()), ("riscv64", ())):
        backend = MemoryBackend(arch, cache_features=features)
        with execmem.Allocator(backend=backend, pack_size=4096) as a:
            t = a.jit_text_alloc(64)
            t.map()
            backend.steps.clear()
            a.sync_code(t.address + 8, 40)
            spec = a.arch
            want = [s.name for s in spec.publish.effective(frozenset(features)) if s.name not in ("write", "map")]
            assert [name for name, _ in backend.steps] == want
            assert all(ranges == ((t.address + 8, 40),) for name, ranges in backend.steps if name != "remote_cse")
            backend.steps.clear()
            a.serialize_all_threads()
            assert [name for name, _ in backend.steps] == ["remote_cse"]
            with pytest.raises(execmem.OutOfBoundsError):
                a.sync_code(t.address + 4096, 4)


def _foreign_code_run(*, sync: bool) -> set[tuple[int, int]]:
    """CPU0 (the host) overwrites code that something else put at X through its
    writable alias, then runs ``sync_code`` (or only ``serialize_all_threads``) and
    sets a flag; CPU1 reads the flag, then calls X: (flag, which version ran)."""
    m = Machine("arm64", cpus=2)
    a = execmem.Allocator(backend=m, pack_size=4096)
    # Another JIT's read+write+execute mapping (as many JITs make them).
    x = m.place(0, execmem.asm("mov w9, #1\nret", "arm64", 0), 0x30_0000, start=False, exit_at_end=False, perms="rwx").address
    flag = m.alloc(4)
    m.load(1, "ldr w2, [x3]\nblr x1")
    m.set_reg(1, "x1", x)
    m.set_reg(1, "x3", flag)
    m.host().store(x, execmem.asm("mov w9, #2", "arm64", 0), 4, note="another library writes X")
    if sync:
        a.sync_code(x, 8)
    else:
        a.serialize_all_threads()
    m.host().store(flag, 1, 4, note="flag")
    result = m.explore(lambda st: (m.reg(st, 1, "w2"), m.reg(st, 1, "w9")))
    assert result.complete and result.stuck is None
    return set(result.finals)


def test_sync_code_on_the_modeled_arm64_machine_runs_its_cache_maintenance() -> None:
    stale = (1, 1)  # saw the flag, ran the old instruction
    assert stale in _foreign_code_run(sync=False)  # a CSE alone leaves the I-cache stale
    outcomes = _foreign_code_run(sync=True)
    assert stale not in outcomes
    assert (1, 2) in outcomes


def test_sync_code_on_the_model_names_its_steps() -> None:
    m = Machine("arm64", cpus=2)
    a = execmem.Allocator(backend=m, pack_size=4096)
    x = m.place(0, bytes(8), 0x30_0000, start=False, exit_at_end=False).address
    a.sync_code(x, 8)
    notes = [action.note for action in m._cpus[0].host]
    assert notes[0] == f"DC CVAU {x:#x}" and f"IC IVAU {x:#x}" in notes
    assert "membarrier SYNC_CORE: IPI" in notes
    with pytest.raises(execmem.OutOfBoundsError):
        a.sync_code(0x7000_0000, 4)  # nothing mapped there
