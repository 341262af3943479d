"""``execmem demo``: runs on this host, quickly, and reports what it did."""

from __future__ import annotations

import platform
import time

import capstone
import pytest

import execmem.arch
from execmem import _demo
from execmem.cli import main

on_x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 host")


@on_x86
@pytest.mark.parametrize("mode", ("dual", "mprotect", "rwx"))
def test_demo_runs_fast_and_reports(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    assert main(["demo", "--mode", mode]) == 0
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    assert elapsed < 2.0, elapsed
    for expected in (
        "add(2, 40)                 42",
        "fib(50)                    12586269025",
        "add_plus_one(20, 21)       42",
        "probe(5)                   5",
        "probe(5) after live patch  1005",
        "(all traps)",
        "remote_cse",
        "huge pages",
        "trap fill",
    ):
        assert expected in out, out
    assert ("no mapping is writable and executable" in out) is (mode != "rwx")


def test_demo_programs_assemble_for_every_keystone_architecture() -> None:
    for name, program in _demo.PROGRAMS.items():
        spec = execmem.arch.get(name)
        assemble = _demo._assembler(spec)
        addresses = {"add": 0x7F00_1234_5000, "hook": 0x7F00_1234_5040}
        for key in ("add", "fib", "add_plus_one", "hook", "probe"):
            assert assemble(_demo._fill(program[key], addresses), 0x7F00_1234_5080), (name, key)
        # The live-patched instruction: old and new are the same length, inside one
        # aligned word, and both on the architecture's concurrently-modifiable list.
        site = int(program["patch_site"])
        probe = assemble(program["probe"], 0x7F00_1234_5080)
        new = assemble(_demo._fill(program["patch_new"], addresses), 0x7F00_1234_5080 + site)
        assert spec.engines.capstone is not None
        cs = capstone.Cs(*spec.engines.capstone)
        old_insn = next(cs.disasm(probe[site:], 0))
        new_insn = next(cs.disasm(new, 0))
        assert old_insn.size == new_insn.size == len(new)
        assert site % spec.patch_rule.word + len(new) <= spec.patch_rule.word
        assert old_insn.mnemonic.startswith("nop") and new_insn.mnemonic in ("call", "bl")
        if spec.patch_rule.mnemonics:
            assert {old_insn.mnemonic, new_insn.mnemonic} <= spec.patch_rule.mnemonics
