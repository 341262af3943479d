"""The ``libc`` JIT example: direct calls into the C library from a text placed near it."""

from __future__ import annotations

import pytest
from programs import near_libc

import execmem
from execmem.examples import libc

pytestmark = pytest.mark.skipif(execmem.arch.host().name not in ("x86_64", "arm64"), reason="no version for this host")


def test_both_versions_match_len_and_the_direct_one_is_in_reach() -> None:
    with near_libc():
        figures = libc.run()
    direct = figures["direct"]
    assert isinstance(direct, dict)
    assert abs(direct["distance"]) <= execmem.arch.host().branch_reach
    register = figures["register"]
    assert isinstance(register, dict) and register["size"] > direct["size"]


def test_the_direct_version_calls_by_name_and_the_other_through_a_register() -> None:
    arch = execmem.arch.host().name
    srcs = libc.sources(arch, 0x1234_5678_9ABC)
    assert srcs["direct"].count("call strlen" if arch == "x86_64" else "bl strlen") == 2
    through = "call rax" if arch == "x86_64" else "blr x16"
    assert srcs["register"].count(through) == 2 and "strlen" not in srcs["register"]


def test_a_direct_call_out_of_reach_is_refused_by_the_assembler() -> None:
    """``symbols=`` is checked against the reach: far from strlen, ``call strlen`` fails."""
    arch = execmem.arch.host().name
    far = 0 if execmem.arch.host().branch_reach < 2**40 else None
    assert far is not None
    with pytest.raises(execmem.AssemblyError):
        execmem.asm(libc.sources(arch, 0)["direct"], address=far, symbols={"strlen": 2**46})


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with near_libc():
        assert libc.main([]) == 0
    out = capsys.readouterr().out
    assert "direct" in out and "register" in out
