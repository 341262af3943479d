"""``near=``: texts placed where a direct call reaches them (``ArchSpec.branch_reach``)."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest
from programs import near_libc

import execmem
from execmem import arch as _arch
from execmem._memory_backend import BASE, MemoryBackend
from execmem._placement import find_gap, gaps, reach_window
from execmem.emu import Machine
from execmem.native import NativeBackend
from execmem.native._procmaps import read_maps

GIB = 1 << 30


def test_branch_reach_per_architecture() -> None:
    # x86-64 call rel32, arm64 BL imm26, riscv64 AUIPC+JALR (``call``): each less the
    # instruction's own length, so that every byte of the text reaches both ways.
    assert _arch.get("x86_64").branch_reach == (1 << 31) - 16
    assert _arch.get("arm64").branch_reach == (1 << 27) - 8
    assert _arch.get("riscv64").branch_reach == (1 << 31) - (1 << 11) - 8


@pytest.mark.parametrize(
    ("occupied", "size", "align", "window", "expected"),
    [
        ([], 0x1000, 0x1000, (0x10000, 0x20000), 0x18000),  # the middle of an empty window
        ([(0x14000, 0x8000)], 0x1000, 0x1000, (0x10000, 0x20000), 0x1C000),  # nearest free to the middle
        ([(0x10000, 0x10000)], 0x1000, 0x1000, (0x10000, 0x20000), None),  # full
        ([(0x10000, 0xF800)], 0x1000, 0x1000, (0x10000, 0x20000), None),  # 0x800 left: too small
        ([(0x10000, 0xF000)], 0x1000, 0x1000, (0x10000, 0x20000), 0x1F000),  # exactly the last page
        ([(0x11000, 0x100)], 0x2000, 0x4000, (0x10000, 0x19000), 0x14000),  # alignment inside a gap
    ],
)
def test_find_gap_table(occupied, size, align, window, expected) -> None:
    got = find_gap(occupied, size, align, window)
    assert got == expected
    if got is not None:
        assert got % align == 0 and window[0] <= got and got + size <= window[1]
        assert all(got + size <= s or s + n <= got for s, n in occupied)


def test_gaps_and_windows() -> None:
    assert gaps([(5, 5), (0, 2)], (0, 20)) == [(2, 3), (10, 10)]
    assert gaps([(0, 30)], (0, 20)) == []
    assert reach_window(100, 1000) == (0, 1101)
    assert reach_window(1 << 40, 1 << 31) == ((1 << 40) - (1 << 31), (1 << 40) + (1 << 31) + 1)


def _in_reach(spec: _arch.ArchSpec, near: int, t: execmem.JitText) -> bool:
    return abs(t.address - near) <= spec.branch_reach and abs(t.address + t.size - 1 - near) <= spec.branch_reach


@pytest.mark.parametrize("arch", ["x86_64", "arm64", "riscv64"])
def test_near_on_the_memory_backend(arch: str) -> None:
    backend = MemoryBackend(arch)
    with execmem.Allocator(backend=backend, pack_size=1 << 16) as a:
        spec = a.arch
        first = a.jit_text_alloc(64)
        far = first.address + 3 * spec.branch_reach  # the first pack is out of reach
        t = a.jit_text_alloc(100, near=far)
        assert _in_reach(spec, far, t) and t._pack is not first._pack
        assert a.stats()["events"]["packs_reserved"] == 2
        u = a.jit_text_alloc(100, near=far)  # the pack in reach is used
        assert u._pack is t._pack and _in_reach(spec, far, u)
        many = a.jit_text_alloc_many([10, 20, 30], near=far)
        assert all(_in_reach(spec, far, m) for m in many)
        big = a.jit_text_alloc(1 << 16, near=far)  # a dedicated reservation, in reach too
        assert big._pack.dedicated and _in_reach(spec, far, big)
        assert a.jit_text_alloc(16, near=first.address)._pack is first._pack
        # Nowhere: the window lies below the fake address space.
        before = (backend.snapshot(), a.stats())
        with pytest.raises(execmem.OutOfMemoryError, match="no free"):
            a.jit_text_alloc(16, near=BASE - 3 * spec.branch_reach)
        with pytest.raises(execmem.OutOfMemoryError):
            a.jit_text_alloc_many([16, 16], near=BASE - 3 * spec.branch_reach)
        assert (backend.snapshot(), a.stats()) == before
        for bad, error in ((-1, execmem.OutOfBoundsError), ("x", TypeError), (1 << 64, execmem.OutOfBoundsError)):
            with pytest.raises(error):
                a.jit_text_alloc(16, near=bad)  # type: ignore[arg-type]
        assert (backend.snapshot(), a.stats()) == before


def test_a_backend_that_ignores_the_window_is_caught() -> None:
    class Careless(MemoryBackend):
        def reserve(self, size: int, align: int, capacity: int | None = None, *, window=None):  # type: ignore[no-untyped-def, override]
            return super().reserve(size, align, capacity)

    backend = Careless("x86_64")
    with execmem.Allocator(backend=backend, pack_size=1 << 16) as a:
        with pytest.raises(execmem.OutOfMemoryError, match="outside"):
            a.jit_text_alloc(16, near=BASE + 64 * GIB)
        assert backend.reservations == []


def test_near_on_the_modeled_machine() -> None:
    m = Machine("arm64", cpus=1)
    a = execmem.Allocator(backend=m, pack_size=4096)
    home = a.jit_text_alloc(16)  # at the bottom of the dynamic range
    callee = a.jit_text_alloc(16, near=0x7000_0000)  # 0x3000_0000 away: beyond BL's reach
    assert callee._pack is not home._pack and _in_reach(a.arch, 0x7000_0000, callee)
    caller = a.jit_text_alloc(32, near=callee.address)
    assert caller._pack is callee._pack  # the pack in reach is used
    callee.write(0, execmem.asm("mov x0, #42\nret", "arm64", callee.address))
    caller.write(
        0,
        execmem.asm(f"stp x29, x30, [sp, #-16]!\nbl {callee.address}\nldp x29, x30, [sp], #16\nret", "arm64", caller.address),
    )
    execmem.publish([callee, caller])
    assert m.call(caller.address) == 42
    with pytest.raises(execmem.OutOfMemoryError, match="dynamic range"):
        a.jit_text_alloc(16, near=0x10_0000)  # the static code area: no reservation can reach it


HOST = _arch.host().name
#: f(x) = labs(x) through a direct call (the ``{target}`` placeholder: labs' address).
CALL_LABS = {
    "x86_64": "sub rsp, 8\nmov rdi, -5\ncall {target}\nadd rsp, 8\nret",
    "arm64": "stp x29, x30, [sp, #-16]!\nmov x0, #-5\nbl {target}\nldp x29, x30, [sp], #16\nret",
}


@pytest.fixture
def native() -> execmem.Allocator:
    a = execmem.Allocator(backend=NativeBackend())
    yield a
    a.close()


@pytest.mark.skipif(HOST not in CALL_LABS, reason="no direct-call program for this host")
def test_near_libc_makes_a_direct_call_reach_it(native: execmem.Allocator) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    target = ctypes.cast(libc.labs, ctypes.c_void_p).value
    assert target is not None
    with near_libc():
        t = native.jit_text_alloc(64, near=target)
    assert _in_reach(native.arch, target, t)
    # Keystone encodes the call relative to the text's address: in reach, or an error.
    t.write(0, execmem.asm(CALL_LABS[HOST].format(target=target), address=t.address))
    t.map()
    assert t.function(ctypes.c_long)() == 5


def test_near_reserves_a_pack_in_a_free_gap_natively(native: execmem.Allocator) -> None:
    spec = native.arch
    home = native.jit_text_alloc(64)
    far = 16 * spec.branch_reach + (1 << 32)  # low user space: far from mmap's area
    t = native.jit_text_alloc(64, near=far)
    assert _in_reach(spec, far, t) and t._pack is not home._pack
    u = native.jit_text_alloc(64, near=far)
    assert u._pack is t._pack
    vma = next(v for v in read_maps() if v.start <= t.address < v.end)
    assert not vma.executable  # reserved, not mapped yet
    t.write(0, spec.trap_bytes(64))
    t.map()
    vma = next(v for v in read_maps() if v.start <= t.address < v.end)
    assert vma.executable and not vma.writable
    before = native.stats()["packs"]
    with pytest.raises(execmem.OutOfMemoryError):
        native.jit_text_alloc(16, near=(1 << 56))  # beyond the user address space
    assert native.stats()["packs"] == before


def test_near_without_proc_falls_back_to_hint_addresses(monkeypatch: pytest.MonkeyPatch, native: execmem.Allocator) -> None:
    from execmem.native import _procmaps

    def no_proc(pid: object = "self") -> list[object]:
        raise OSError("no /proc here")

    far = 16 * native.arch.branch_reach + (1 << 33)
    monkeypatch.setattr(_procmaps, "read_maps", no_proc)
    t = native.jit_text_alloc(64, near=far)  # the kernel honours a free hint
    assert _in_reach(native.arch, far, t)
    d = native.jit_data_alloc(64, near=far)
    assert abs(d.address - far) <= native.arch.branch_reach


def test_near_skips_a_slot_taken_by_a_mapping_proc_does_not_show(
    monkeypatch: pytest.MonkeyPatch, native: execmem.Allocator
) -> None:
    """QEMU user mode hides its own mappings from the guest's /proc/self/maps: a gap
    that looks free but is refused must be left out of the next lookup, not retried
    (hidden mappings also sit on the three hint addresses tried last)."""
    from execmem.native import _procmaps

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    reach, pmd = native.arch.branch_reach, 2 << 20
    far = 16 * reach + (1 << 34)
    size = 16 * pmd
    hidden = [
        (far - size // 2) // pmd * pmd,  # where the nearest-gap search looks first
        (far - reach) // pmd * pmd,  # the low hint
        (far + reach - size) // pmd * pmd + pmd,  # the high hint
    ]
    map_private_anonymous_fixed_noreplace = 0x02 | 0x20 | 0x100000
    mapped = [a for a in hidden if libc.mmap(a, size, 0, map_private_anonymous_fixed_noreplace, -1, 0) == a]
    real = _procmaps.read_maps
    monkeypatch.setattr(
        _procmaps, "read_maps", lambda *a: [v for v in real(*a) if not any(h <= v.start < h + size for h in hidden)]
    )
    try:
        assert mapped == hidden
        t = native.jit_text_alloc(64, near=far)
        assert _in_reach(native.arch, far, t)
        assert not any(h <= t.address < h + size for h in hidden)
    finally:
        for a in mapped:
            libc.munmap(a, size)
