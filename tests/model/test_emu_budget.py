"""An exhaustive exploration is bounded in states and in memory: past either budget it
stops and says so with figures ("budget exceeded"), never with MemoryError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from execmem.emu import Machine
from execmem.emu._semantics import Model

#: A loop that stores an ever larger counter: every state is new and bigger than the
#: last (its timeline grows), so nothing but a budget ends the search.
GROWING = "l0: add x0, x0, #1\nstr x0, [x1]\nb l0"


def growing() -> Machine:
    m = Machine("arm64", cpus=1)
    m.load(0, GROWING)
    m.set_reg(0, "x1", m.alloc(8))
    return m


def test_the_memory_budget_stops_a_search_that_grows_forever() -> None:
    result = growing().explore(lambda st: 0, max_states=10_000_000, max_memory=64 << 20)
    assert not result.complete
    assert result.exceeded.startswith("budget exceeded: memory grew by ")
    assert "(budget 64 MB) after " in result.exceeded and result.states < 10_000_000


def test_the_state_budget_is_reported_with_its_figure() -> None:
    result = growing().explore(lambda st: 0, max_states=500)
    assert not result.complete and result.exceeded == "budget exceeded: 500 states"


def test_running_out_of_memory_is_a_budget_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    real = Model.successors

    def scarce(self: Model, st: object) -> object:
        calls[0] += 1
        if calls[0] > 50:
            raise MemoryError
        return real(self, st)  # type: ignore[arg-type]

    monkeypatch.setattr(Model, "successors", scarce)
    result = growing().explore(lambda st: 0)
    assert not result.complete and result.exceeded == "budget exceeded: out of memory after 51 states"


def test_cli_reports_the_exceeded_budget_and_fails(tmp_path: Path) -> None:
    loop = tmp_path / "loop.litmus"
    loop.write_text("AArch64 loop\n{ 0:X1=x; }\n P0 ;\n L0: ADD X0,X0,#1 ;\n STR X0,[X1] ;\n B L0 ;\nexists (x=1)\n")
    out = subprocess.run(
        [sys.executable, "-m", "execmem", "litmus", "--summary", "--max-memory", "32", "--max-states", "10000000",
         "-j", "1", str(loop)],
        capture_output=True, text=True,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "unknown" in out.stdout and "budget exceeded: memory grew by" in out.stdout
