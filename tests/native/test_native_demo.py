"""``execmem demo``: runs on this host, quickly, through the public API, and reports
what it did; its programs are right on every architecture it has one for."""

from __future__ import annotations

import re
import time

import pytest
from programs import HOST, SLOWDOWN

import execmem
import execmem.arch
from execmem import _asm, _demo
from execmem.cli import main

on_host = pytest.mark.skipif(HOST.name not in _demo.PROGRAMS, reason=f"the demo has no program for {HOST.name}")
#: How the demo names the host's local_cse (``execmem.native._sync``).
LOCAL_CSE = {"x86_64": ("serialize", "iret to self"), "arm64": ("isb",)}


def _has(out: str, key: str, value: str) -> bool:
    """A ``key  value`` line of the demo's table (any column width)."""
    return re.search(rf"^  {re.escape(key)}\s+{re.escape(value)}", out, re.MULTILINE) is not None


@on_host
@pytest.mark.parametrize("mode", ("dual", "mprotect", "rwx"))
def test_demo_runs_fast_and_reports(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.perf_counter()
    assert main(["demo", "--mode", mode]) == 0
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    assert elapsed < 2.0 * SLOWDOWN, elapsed
    after_free = "(refilled with traps at the next epoch)"  # a free writes nothing
    for key, value in (
        ("add(2, 40)", "42"),
        ("fib(50)", "12586269025"),
        ("add_plus_one(20, 21)", "42"),
        ("answer()", "7"),
        ("fib after free", ""),
        ("fib.function() after free", "UseAfterFreeError"),
        ("mode", {"dual": "dual-mapping", "mprotect": "mprotect", "rwx": "rwx"}[mode]),
    ):
        assert _has(out, key, value), (key, value, out)
    assert after_free in out, out
    # x86-64: SERIALIZE where the CPU has it, else IRET to self, never CPUID (a VM exit).
    assert any(_has(out, "local_cse", how) for how in LOCAL_CSE[HOST.name]), out
    for key in ("backing", "pack", "trap fill", "huge pages", "remote_cse", "system calls", "recipes"):
        assert _has(out, key, ""), (key, out)
    assert "never anything else" in out and "UNEXPECTED" not in out
    assert ("no mapping is writable and executable" in out) is (mode != "rwx")
    if mode == "mprotect":
        # A live patch would make the page briefly non-executable: refused, nothing stored.
        assert _has(out, "answer() after live update", "refused: ")
        assert _has(out, "remote_cse", "none selected (never needed): ran 0 time(s)")
        assert _has(out, "recipes", "publish_fresh x1")
    else:
        patch = execmem.asm(_demo.PROGRAMS[HOST.name].patch, HOST.name)
        assert _has(out, "answer() after live update", f"42  ({len(patch)}-byte instruction replaced by one atomic store)")
        # One batch for four texts on a fresh pack (no membarrier needed), then the
        # live patch with another thread running: the only membarrier.
        assert _has(out, "recipes", "publish_fresh x1, patch x1")
        assert re.search(r"^  remote_cse\s+membarrier[\w-]*: ran 1 time\(s\)$", out, re.MULTILINE), out


@on_host
def test_demo_reports_what_stats_says(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"^  pack\s+(0x[0-9a-f]+), (?:64|2048) of 2048 KiB, mapped: live (\d+) B, quarantined (\d+) B$", out, re.MULTILINE)
    assert match, out
    assert int(match.group(2)) == 3 * 64 and int(match.group(3)) == 64  # three live texts, fib freed
    assert _has(out, "texts", "LIVE 3, FREED 1")
    trap = re.search(rf"^  trap fill\s+{HOST.trap_fill.hex(' ')}: (\d+) of the pack's (\d+) bytes are traps$", out, re.MULTILINE)
    assert trap, out
    # Live code, and fib's: freed, its chunk keeps the code until the next epoch refills it.
    sources = _demo.PROGRAMS[HOST.name].sources
    code = sum(len(execmem.asm(_demo.fill(s, dict.fromkeys(sources, 0x7F00_0000_0000))))
               for name, s in sources.items())
    assert int(trap.group(2)) - int(trap.group(1)) <= code


def test_demo_without_a_program_for_the_host_is_one_clear_error() -> None:
    with pytest.raises(execmem.UnsupportedError, match="no program for riscv64"):
        _demo.program_for(execmem.arch.get("riscv64"))


@pytest.mark.parametrize("arch", sorted(_demo.PROGRAMS))
def test_demo_patch_is_one_whole_concurrently_modifiable_instruction(arch: str) -> None:
    spec = execmem.arch.get(arch)
    program = _demo.PROGRAMS[arch]
    base = 0x7F00_1234_5000
    answer = execmem.asm(program.sources["answer"], arch, base)
    new = execmem.asm(program.patch, arch, base + program.patch_offset)
    old = answer[program.patch_offset : program.patch_offset + len(new)]
    word = spec.patch_rule.word
    assert program.patch_offset // word == (program.patch_offset + len(new) - 1) // word
    old_m = _asm.decode_one(spec, old, base + program.patch_offset)
    new_m = _asm.decode_one(spec, new, base + program.patch_offset)
    assert old_m is not None and new_m is not None, (old.hex(), new.hex())
    if spec.patch_rule.mnemonics:
        assert {old_m, new_m} <= spec.patch_rule.mnemonics


@pytest.mark.parametrize("arch", sorted(_demo.PROGRAMS))
def test_demo_programs_compute_the_right_results_on_the_modeled_machine(arch: str) -> None:
    """The same flow as the demo (size, allocate, assemble in place, one batch, call,
    live update) on the modeled machine, so the arm64 program is checked on any host."""
    from execmem.emu import Machine

    program = _demo.PROGRAMS[arch]
    machine = Machine(arch, cpus=2)
    allocator = execmem.Allocator(backend=machine, pack_size=4096)
    placeholders = dict.fromkeys(program.sources, _demo.PLACEHOLDER)
    sizes = {n: len(execmem.asm(_demo.fill(s, placeholders), arch, _demo.PLACEHOLDER)) for n, s in program.sources.items()}
    texts = {n: allocator.jit_text_alloc(sizes[n]) for n in program.sources}
    addresses = {n: t.address for n, t in texts.items()}
    for name, text in texts.items():
        code = execmem.asm(_demo.fill(program.sources[name], addresses), arch, text.address)
        assert len(code) == text.size, name
        text.write(0, code)
    execmem.publish(texts.values())
    expected = {"add": 42, "fib": 12586269025, "add_plus_one": 42, "answer": program.before}
    for name, arguments in _demo.CALLS:
        assert machine.call(texts[name].address, *arguments) == expected[name], name
    answer = texts["answer"]
    answer.update(program.patch_offset, execmem.asm(program.patch, arch, answer.address + program.patch_offset))
    assert machine.call(answer.address) == program.after
