"""The ``libc`` JIT example: direct calls into the C library from a text placed near it."""

from __future__ import annotations

import pytest

import execmem
from execmem.examples import libc

pytestmark = pytest.mark.skipif(execmem.arch.host().name not in ("x86_64", "arm64"), reason="no version for this host")


def test_both_versions_match_len_and_the_direct_one_is_in_reach() -> None:
    figures = libc.run()
    direct = figures["direct"]
    assert isinstance(direct, dict)
    assert abs(direct["distance"]) <= execmem.arch.host().branch_reach
    register = figures["register"]
    assert isinstance(register, dict) and register["size"] > direct["size"]


def test_the_direct_version_calls_relative_and_the_other_through_a_register() -> None:
    arch = execmem.arch.host().name
    srcs = libc.sources(arch, 0x1234_5678_9ABC)
    assert ("call 20015998343868" if arch == "x86_64" else "bl 20015998343868") in srcs["direct"]
    through = "call rax" if arch == "x86_64" else "blr x16"
    assert srcs["register"].count(through) == 2 and "20015998343868" not in srcs["register"].replace(
        "mov rax, 20015998343868", ""
    )


def test_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert libc.main([]) == 0
    out = capsys.readouterr().out
    assert "direct" in out and "register" in out
