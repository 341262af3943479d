"""``jit_data_alloc``: read+write memory that is never executable, in reach of the code."""

from __future__ import annotations

import ctypes
import platform
import struct

import pytest
from programs import needs_programs

import execmem
from execmem._data import DATA_GRANULARITY
from execmem._memory_backend import BASE, MemoryBackend
from execmem.emu import Machine
from execmem.native import NativeBackend
from execmem.native._procmaps import read_maps

X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.fixture(params=["dual", "mprotect"])
def native(request: pytest.FixtureRequest) -> execmem.Allocator:
    a = execmem.Allocator(backend=NativeBackend(request.param))
    yield a
    a.close()


def _vma(address: int):  # type: ignore[no-untyped-def]
    return next(v for v in read_maps() if v.start <= address < v.end)


def _reaches(a: execmem.Allocator, x: int, y: int) -> bool:
    return abs(x - y) <= a.arch.branch_reach


def test_data_regions_are_read_write_never_executable(native: execmem.Allocator) -> None:
    t = native.jit_text_alloc(64)
    d = native.jit_data_alloc(100)
    assert d.size == 100 and d.address % 16 == 0
    assert d.read() == bytes(100)
    vma = _vma(d.address)
    assert vma.writable and not vma.executable and vma.perms[0] == "r"
    assert _reaches(native, d.address, t.address) and _reaches(native, d.address + 99, t.address + 63)
    d.write(10, b"hello")
    assert d.read()[10:15] == b"hello"
    assert ctypes.string_at(d.address + 10, 5) == b"hello"  # plain memory of this process
    e = native.jit_data_alloc(32, align=64)
    assert e.address % 64 == 0 and not (e.address < d.address + 100 and d.address < e.address + 32)
    big = native.jit_data_alloc(1 << 20)  # its own pages
    assert not _vma(big.address).executable and big.read() == bytes(1 << 20)
    stats = native.stats()["data"]
    assert stats["regions"] == 3 and stats["live_bytes"] == 100 + 32 + (1 << 20)
    for region in (d, e, big):
        region.free()
    assert native.stats()["data"]["regions"] == 0
    assert native.stats()["epochs"]["started"] == 0  # freeing data synchronizes nothing


def test_bad_uses_raise_and_change_nothing(native: execmem.Allocator) -> None:
    d = native.jit_data_alloc(16)
    d.write(0, b"\x01" * 16)
    before = (d.read(), native.stats())
    with pytest.raises(execmem.OutOfBoundsError):
        d.write(10, b"\x00" * 7)
    with pytest.raises(execmem.OutOfBoundsError):
        d.write(-1, b"\x00")
    with pytest.raises(TypeError):
        d.write(0, "text")  # type: ignore[arg-type]
    for bad, error in ((0, execmem.SizeError), (-5, execmem.SizeError), ("x", TypeError)):
        with pytest.raises(error):
            native.jit_data_alloc(bad)  # type: ignore[arg-type]
    with pytest.raises(execmem.AlignmentError):
        native.jit_data_alloc(16, align=3)
    with pytest.raises(execmem.OutOfMemoryError):
        native.jit_data_alloc(16, near=1 << 56)
    assert (d.read(), native.stats()) == before
    d.free()
    for verb in (d.read, d.free, lambda: d.write(0, b"x")):
        with pytest.raises(execmem.UseAfterFreeError):
            verb()
    again = native.jit_data_alloc(16)  # the same chunks, zeroed again
    assert again.address == d.address and again.read() == bytes(16)


def _load_and_store(text: int, data: int) -> bytes:
    """``int64 f(int64 v)``: returns the int64 at ``data`` and stores ``v`` at
    ``data + 8``, both addressed relative to the code (they raise if out of reach)."""
    if X86:  # mov rax, [rip + disp32]; mov [rip + disp32 + 8], rdi; ret
        load = b"\x48\x8b\x05" + struct.pack("<i", data - (text + 7))
        store = b"\x48\x89\x3d" + struct.pack("<i", data + 8 - (text + 14))
        return load + store + b"\xc3"
    page, low = data & ~0xFFF, data & 0xFFF  # arm64: ADRP reaches +-4 GiB
    source = f"adrp x2, {page:#x}\nldr x1, [x2, #{low}]\nstr x0, [x2, #{low + 8}]\nmov x0, x1\nret"
    return execmem.asm(source, "arm64", text)


@needs_programs
def test_jit_code_loads_and_stores_relative_to_itself(native: execmem.Allocator) -> None:
    d = native.jit_data_alloc(16)
    d.write(0, struct.pack("<q", 1234))
    t = native.jit_text_alloc(32)
    t.write(0, _load_and_store(t.address, d.address))
    t.map()
    assert t.function(ctypes.c_int64, ctypes.c_int64)(77) == 1234
    assert struct.unpack("<q", d.read()[8:]) == (77,)


def test_near_and_the_code_window_on_the_memory_backend() -> None:
    backend = MemoryBackend("arm64")
    with execmem.Allocator(backend=backend, pack_size=1 << 16) as a:
        reach = a.arch.branch_reach
        first = a.jit_data_alloc(8)  # no packs yet: an empty one is reserved, the texts go there
        t = a.jit_text_alloc(64)
        d = a.jit_data_alloc(8)
        assert _reaches(a, d.address, t.address)
        far = BASE + 8 * reach
        n = a.jit_data_alloc(8, near=far)
        assert _reaches(a, n.address, far) and not _reaches(a, n.address, t.address)
        assert [r.address for r in backend.data_regions] and backend.reservations == [t._pack.reservation]
        a.jit_text_alloc(64, near=far)  # the packs now lie too far apart for one data region
        before = a.stats()
        with pytest.raises(execmem.OutOfMemoryError, match="pass near="):
            a.jit_data_alloc(8)
        assert a.stats() == before
        with pytest.raises(execmem.BadStateError):
            backend.map(first._pack.reservation)  # a data region is never mapped executable
    assert backend.data_regions == [] and backend.reservations == []
    with pytest.raises(execmem.BadStateError, match="closed"):
        first.read()  # gone with its allocator


def test_empty_data_packs_return_to_the_system() -> None:
    backend = MemoryBackend("x86_64")
    with execmem.Allocator(backend=backend, pack_size=1 << 16) as a:
        pack_chunks = a._data.pack_size // DATA_GRANULARITY
        regions = [a.jit_data_alloc(a._data.pack_size // 2) for _ in range(4)]
        assert len(backend.data_regions) == 2 and pack_chunks
        for region in regions:
            region.free()
        assert len(backend.data_regions) == 1  # one stays for the next allocation


def test_data_regions_on_the_modeled_machine() -> None:
    m = Machine("arm64", cpus=1)
    a = execmem.Allocator(backend=m, pack_size=4096)
    t = a.jit_text_alloc(16)
    d = a.jit_data_alloc(8)
    d.write(0, struct.pack("<q", 42))
    assert 0 < d.address - t.address < 1 << 20  # LDR (literal) reaches +-1 MiB
    t.write(0, execmem.asm(f"ldr x0, {d.address}\nret", "arm64", t.address))
    t.map()
    assert m.call(t.address) == 42
    assert any(action.note.startswith("map data") and "rw-" in action.note for action in m._cpus[0].host)
    with pytest.raises(execmem.ModelError, match="faulted"):
        m.call(d.address)  # never executable
    with pytest.raises(execmem.UnsupportedError, match=r"machine\.read"):
        d.read()
