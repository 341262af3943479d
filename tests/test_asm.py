"""``execmem.asm``: Keystone assembly with errors that name the failing line."""

from __future__ import annotations

import pytest

import execmem
from execmem._errors import AssemblyError, UnsupportedError


def test_x86_64_and_addresses() -> None:
    assert execmem.asm("mov eax, 42\nret", "x86_64") == b"\xb8\x2a\x00\x00\x00\xc3"
    # A relative jump depends on where the code is placed.
    assert execmem.asm("jmp 0x2000", "x86_64", 0x1000) != execmem.asm("jmp 0x2000", "x86_64", 0x1800)
    assert execmem.asm("", "x86_64") == b""


def test_arm64() -> None:
    assert execmem.asm("mov x0, #42\nret", "arm64") == bytes.fromhex("400580d2c0035fd6")
    assert execmem.asm("mov x0, #1 // comment\nret", "aarch64") == execmem.asm("mov x0, #1\nret", "arm64")


@pytest.mark.parametrize(
    ("arch", "source", "line", "text"),
    [
        ("x86_64", "mov eax, 1\nbogus eax\nret", 2, "bogus eax"),
        ("x86_64", "jmp done\nnop\nnop\nfrobnicate\ndone: ret", 4, "frobnicate"),  # forward label
        ("x86_64", "jmp missing\nret", 1, "jmp missing"),  # undefined symbol
        ("x86_64", "mov eax, [nowhere]\nret", 1, "mov eax, [nowhere]"),
        ("arm64", "b.ne later\nmov x0, #1\n\nadd x0, x0, #1\nxyz x0\nlater:\nret", 5, "xyz x0"),
        ("arm64", "cbz x0, out\nmov x0, #1\nout: ret\nmov q0, x1", 4, "mov q0, x1"),
        ("arm64", "\n".join(["nop"] * 200 + ["bad"] + ["nop"] * 55), 201, "bad"),
    ],
)
def test_error_names_the_failing_line(arch: str, source: str, line: int, text: str) -> None:
    with pytest.raises(AssemblyError) as info:
        execmem.asm(source, arch)
    message = str(info.value)
    assert f"line {line}:" in message and repr(text) in message and arch in message


def test_riscv64_has_no_keystone() -> None:
    with pytest.raises(UnsupportedError, match="Keystone"):
        execmem.asm("nop", "riscv64")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        execmem.asm(b"nop", "x86_64")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        execmem.asm("nop", "x86_64", address="0")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError):
        execmem.asm("nop", "pdp11")
    with pytest.raises(AssemblyError):
        execmem.asm("nop", "x86_64", address=-1)
