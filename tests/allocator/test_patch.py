"""Live patches on instruction boundaries (``JitText.update``) and ``JitText.retarget``.

The property tests build instruction streams from instructions of known lengths, so
the true boundaries are known independently of the decoder ``update`` uses, and
check that every patch it accepts replaces exactly one whole instruction inside one
aligned word, and that it refuses (changing nothing) every other."""

from __future__ import annotations

import ctypes
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import capstone
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import HOST, SLOWDOWN, const, needs_programs

import execmem
from execmem._errors import BadStateError, UnsafePatchError, UseAfterFreeError
from execmem._memory_backend import MemoryBackend

#: x86-64 instructions of every length from 1 to 10 bytes.
X86 = [
    bytes.fromhex(h)
    for h in (
        "90", "c3", "55", "31c0", "eb00", "4801f8", "488d0437", "0f1f4000", "b82a000000", "e900000000",
        "0f1f440000", "660f1f440000", "488b8424ff000000", "48b88877665544332211", "0f1f840000000000",
    )
]
ARM64 = [bytes.fromhex(h) for h in ("1f2003d5", "00000014", "00000094", "c0035fd6", "200080d2", "002020d4")]
#: Words that do not decode (data in a text): boundaries stay every 4 bytes on arm64.
ARM64_DATA = [bytes.fromhex("ffffffff"), bytes.fromhex("01000000")]
CMODX = {"1f2003d5", "00000014", "00000094", "002020d4"}  # nop, b, bl, brk


def make(arch: str, code: bytes) -> tuple[MemoryBackend, execmem.Allocator, execmem.JitText]:
    backend = MemoryBackend(arch)
    allocator = execmem.Allocator(backend=backend)
    text = allocator.jit_text_alloc(len(code))
    text.write(0, code)
    text.map()
    return backend, allocator, text


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for backend, allocator, _ in made:
        allocator.close()
        backend.close()


def decodes_as_one(code: bytes, arch: str) -> bool:
    cs = capstone.Cs(*((capstone.CS_ARCH_X86, capstone.CS_MODE_64) if arch == "x86_64" else (capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)))
    insns = list(cs.disasm_lite(code, 0))
    return len(insns) == 1 and insns[0][1] == len(code)


@settings(parent=settings.get_profile("execmem"), max_examples=300)
@given(
    stream=st.lists(st.sampled_from(X86), min_size=1, max_size=12),
    offset=st.integers(0, 80),
    new=st.sampled_from(X86) | st.binary(min_size=1, max_size=8),
)
def test_x86_update_refuses_every_cut(stream: list[bytes], offset: int, new: bytes) -> None:
    code = b"".join(stream)
    if offset + len(new) > len(code):
        return
    starts = {sum(map(len, stream[:i])): len(insn) for i, insn in enumerate(stream)}
    backend, allocator, text = make("x86_64", code)
    try:
        address = text.address + offset
        whole = starts.get(offset) == len(new)  # exactly one whole instruction, same length
        one_word = address // 8 == (address + len(new) - 1) // 8
        allowed = whole and one_word and decodes_as_one(new, "x86_64")
        try:
            text.update(offset, new)
        except UnsafePatchError as exc:
            assert not allowed, exc
            assert text.read() == code and backend.read(text.address, len(code)) == code
            if one_word and not whole and offset not in starts:
                assert "would cut" in str(exc)
        else:
            assert allowed
            assert backend.read(text.address, len(code)) == code[:offset] + new + code[offset + len(new) :]
    finally:
        allocator.close()
        backend.close()


@settings(parent=settings.get_profile("execmem"), max_examples=200)
@given(
    stream=st.lists(st.sampled_from(ARM64 + ARM64_DATA), min_size=1, max_size=10),
    offset=st.integers(0, 40),
    new=st.sampled_from(ARM64) | st.binary(min_size=1, max_size=6),
)
def test_arm64_update_keeps_word_boundaries_through_data(stream: list[bytes], offset: int, new: bytes) -> None:
    code = b"".join(stream)
    if offset + len(new) > len(code):
        return
    backend, allocator, text = make("arm64", code)
    try:
        old = code[offset : offset + len(new)]
        allowed = offset % 4 == 0 and len(new) == 4 and old.hex() in CMODX and new.hex() in CMODX
        try:
            text.update(offset, new)
        except UnsafePatchError:
            assert not allowed
            assert backend.read(text.address, len(code)) == code
        else:
            assert allowed
    finally:
        allocator.close()
        backend.close()


def test_update_names_the_instruction_it_would_cut(closing: list[Any]) -> None:
    closing.append(made := make("x86_64", bytes.fromhex("9090b82a000000c3")))  # nop; nop; mov eax, 42; ret
    text = made[2]
    with pytest.raises(UnsafePatchError, match=r"would cut 'mov eax, 0x2a' \(5 bytes at \+0x2\)"):
        text.update(3, b"\x90")  # inside the mov: its bytes 2a 00 decode as one instruction alone
    with pytest.raises(UnsafePatchError, match="replaces 2 instructions"):
        text.update(0, b"\x66\x90")
    text.update(7, b"\xcc")


def test_x86_data_hides_later_boundaries(closing: list[Any]) -> None:
    """Bytes that do not decode (here ``06``, invalid in 64-bit mode) stop the sweep:
    a patch after them is refused, one before them is not."""
    closing.append(made := make("x86_64", bytes.fromhex("90c3" + "06" + "90909090")))
    text = made[2]
    text.update(0, b"\xcc")
    with pytest.raises(UnsafePatchError, match="cannot be established"):
        text.update(4, b"\xcc")


# -- retarget ---------------------------------------------------------------------------------


def test_x86_retarget_keeps_rel32(closing: list[Any]) -> None:
    code = execmem.asm("{disp32} jmp 0x1000\n.balign 8\n{disp32} call 0x1000\nret", "x86_64", 0)
    closing.append(made := make("x86_64", code + b"\xcc" * 3))
    backend, _, text = made
    base = text.address
    call_at = code.index(b"\xe8")
    text.retarget(0, base + 0x10)  # near: stays 5 bytes
    text.retarget(call_at, base - 0x7000_0000)
    decoded = execmem.asm(f"{{disp32}} jmp {base + 0x10:#x}", "x86_64", base)
    assert text.read()[:5] == decoded
    assert text.read()[call_at : call_at + 5] == execmem.asm(f"call {base - 0x7000_0000:#x}", "x86_64", base + call_at)
    with pytest.raises(UnsafePatchError, match="out of reach"):
        text.retarget(0, base + (1 << 32))
    with pytest.raises(UnsafePatchError, match="not a direct"):
        text.retarget(len(code) - 1, base)  # ret
    with pytest.raises(UnsafePatchError, match="inside"):
        text.retarget(1, base)
    with pytest.raises(UnsafePatchError, match="address space"):
        text.retarget(0, -1)
    with pytest.raises(TypeError):
        text.retarget(0, 1.5)  # type: ignore[arg-type]
    assert backend.read(base, 5) == decoded


def test_x86_retarget_needs_one_aligned_word(closing: list[Any]) -> None:
    """A 5-byte jmp crossing an 8-byte boundary cannot be stored atomically."""
    closing.append(made := make("x86_64", execmem.asm("nop\nnop\nnop\nnop\n{disp32} jmp 0", "x86_64", 0)))
    with pytest.raises(UnsafePatchError, match=r"\.balign 8"):
        made[2].retarget(4, made[2].address)


def test_arm64_retarget_b_and_bl(closing: list[Any]) -> None:
    closing.append(made := make("arm64", execmem.asm("b 0\nbl 0\nret", "arm64", 0)))
    backend, _, text = made
    base = text.address
    text.retarget(0, base + 0x100)
    text.retarget(4, base - 0x7FF_FFFC)  # 128 MiB - 4 back: the edge of imm26 from +4
    assert backend.read(base, 8) == execmem.asm(f"b {base + 0x100:#x}\nbl {base - 0x7FF_FFFC:#x}", "arm64", base)
    with pytest.raises(UnsafePatchError, match="out of reach"):
        text.retarget(0, base + (128 << 20))
    with pytest.raises(UnsafePatchError, match="out of reach"):
        text.retarget(0, base + 2)  # not a multiple of 4
    with pytest.raises(UnsafePatchError, match="'ret'"):
        text.retarget(8, base)


def test_retarget_states_and_batches(closing: list[Any]) -> None:
    backend = MemoryBackend("x86_64")
    allocator = execmem.Allocator(backend=backend)
    closing.append((backend, allocator, None))
    text = allocator.jit_text_alloc(8)
    text.write(0, execmem.asm(f"{{disp32}} jmp {text.address:#x}", "x86_64", text.address))
    with pytest.raises(BadStateError):
        text.retarget(0, text.address)  # RESERVED: write() instead
    text.map()
    with allocator.batch():
        text.retarget(0, text.address + 0x40)
        assert backend.read(text.address + 1, 4) != (0x40 - 5).to_bytes(4, "little")  # deferred
    assert backend.read(text.address + 1, 4) == (0x40 - 5).to_bytes(4, "little")
    text.free()
    with pytest.raises(UseAfterFreeError):
        text.retarget(0, 0)


#: A jump stub to ``one`` per host: x86-64 ``jmp rel32`` (``{disp32}``: Keystone would
#: pick the 2-byte form for a near target; at a 16-byte aligned address the 5 bytes
#: lie in one aligned 8-byte word), arm64 ``B``.
STUB = {"x86_64": "{disp32} jmp one", "arm64": "b one"}


@needs_programs
def test_retarget_while_other_threads_call_the_stub() -> None:
    """Threads call a jump stub while it is retargeted thousands of times between two
    functions: every call reaches one of them (one atomic store of the whole
    instruction, then the host's cross-CPU synchronization)."""
    one, two, stub = execmem.jit_text_alloc_many([16, 16, 16])
    stub_code = execmem.asm(STUB[HOST.name], address=stub.address, symbols={"one": one.address})
    execmem.publish([one, two, stub], [const(1), const(2), stub_code])
    call = stub.function(ctypes.c_int32)
    seen: Counter[int] = Counter()
    stop = threading.Event()

    def caller() -> None:
        local: Counter[int] = Counter()
        while not stop.is_set():
            local[call()] += 1
        seen.update(local)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(int(3000 / SLOWDOWN)):
            stub.retarget(0, (two if i % 2 == 0 else one).address)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(seen) <= {1, 2} and seen[1] and seen[2], seen
    for text in (one, two, stub):
        text.free()
