"""``compile_function``: assemble for the final address, allocate, publish, wrap."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import pytest
from programs import near_libc

import execmem
from execmem import _compile
from execmem import arch as _arch
from execmem._memory_backend import MemoryBackend
from execmem.native import NativeBackend

HOST = _arch.host().name
ADD = {"x86_64": "lea rax, [rdi + rsi]\nret", "arm64": "add x0, x0, x1\nret"}
#: labs(-5) through a direct call: position dependent (the call's offset depends on where it is).
CALL_LABS = {
    "x86_64": "sub rsp, 8\nmov rdi, -5\ncall {target}\nadd rsp, 8\nret",
    "arm64": "stp x29, x30, [sp, #-16]!\nmov x0, #-5\nbl {target}\nldp x29, x30, [sp], #16\nret",
}
pytestmark = pytest.mark.skipif(HOST not in ADD, reason="no programs for this host")
I64 = ctypes.c_int64


@pytest.fixture
def a() -> execmem.Allocator:
    allocator = execmem.Allocator(backend=NativeBackend())
    yield allocator
    allocator.close()


@pytest.fixture
def assemblies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The addresses compile_function assembled at."""
    seen: list[int] = []
    real = _compile.asm

    def counting(source: str, arch: str | None = None, address: int = 0, **options: Any) -> bytes:
        seen.append(address)
        return real(source, arch, address, **options)

    monkeypatch.setattr(_compile, "asm", counting)
    return seen


def test_the_one_liner() -> None:
    add = execmem.compile_function(ADD[HOST], I64, (I64, I64), name="add")
    assert add(2, 40) == 42
    assert add.text.state is execmem.TextState.LIVE and add.text.name == "add"
    assert add.text.read() == execmem.asm(ADD[HOST], address=add.text.address)
    add.text.free()


def test_assembled_once_when_the_guess_is_right(a: execmem.Allocator, assemblies: list[int]) -> None:
    first = a.compile_function(ADD[HOST], I64, (I64, I64))
    assert len(assemblies) == 2  # no pack yet: assembled at 0, then at the real address
    assert a.stats()["events"]["compile_position_independent"] == 1
    assemblies.clear()
    second = a.compile_function(ADD[HOST], I64, (I64, I64))
    assert assemblies == [second.text.address]  # the guess was right: once
    assert (first(1, 2), second(3, 4)) == (3, 7)
    assert second.text.size == len(execmem.asm(ADD[HOST]))


def test_position_dependent_code_is_assembled_for_its_address(a: execmem.Allocator, assemblies: list[int]) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    target = ctypes.cast(libc.labs, ctypes.c_void_p).value
    assert target is not None
    source = CALL_LABS[HOST].format(target=target)
    with near_libc():
        f = a.compile_function(source, ctypes.c_long, near=target)  # no pack yet: assembled at near first
    assert f() == 5
    assert assemblies == [target, f.text.address]
    assert execmem.asm(source, address=target) != f.text.read()  # the call's offset moved
    events = a.stats()["events"]
    assert events["compile_reassembled"] == 1 and "compile_position_independent" not in events
    assert abs(f.text.address - target) <= a.arch.branch_reach
    assemblies.clear()
    g = a.compile_function(source, ctypes.c_long, near=target)
    assert g() == 5 and assemblies == [g.text.address]  # the pack in reach: the guess was right


def test_refusals_allocate_nothing(a: execmem.Allocator) -> None:
    other = "arm64" if HOST == "x86_64" else "x86_64"
    with pytest.raises(execmem.UnsupportedError, match="not"):
        a.compile_function(ADD[HOST], arch=other)
    with pytest.raises(execmem.SizeError, match="no bytes"):
        a.compile_function("")
    with pytest.raises(execmem.AssemblyError):
        a.compile_function("this is not an instruction")
    with pytest.raises(TypeError):
        a.compile_function(ADD[HOST], I64, "I64")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.compile_function(42)  # type: ignore[arg-type]
    stats = a.stats()
    assert stats["texts"] == {"RESERVED": 0, "WRITING": 0, "LIVE": 0, "FREED": 0}
    # A failure after the text was allocated frees it.
    with pytest.raises(TypeError):
        a.compile_function(ADD[HOST], "not a ctypes type")
    stats = a.stats()
    assert stats["texts"]["LIVE"] == 0 and stats["texts"]["FREED"] == 1
    with execmem.Allocator(backend=MemoryBackend(HOST)) as elsewhere, pytest.raises(
        execmem.UnsupportedError, match="does not run in this process"
    ):
        elsewhere.compile_function(ADD[HOST])
