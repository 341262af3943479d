"""The machine model agrees with Arm's model (herd7) on the aarch64-ifetch catalogue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paths
import pytest

from execmem.litmus import parse_file
from execmem.litmus._cli import read_kinds, run_all
from execmem.litmus._run import run_test, setup

SUITE = paths.DATA / "herd" / "aarch64-ifetch"  # vendored, see its NOTICE


@pytest.mark.slow
def test_every_catalogue_test_agrees_with_herd() -> None:
    kinds = read_kinds(str(SUITE / "kinds.txt"))
    files = sorted(str(p) for p in SUITE.glob("*.litmus"))
    assert len(files) == len(kinds) == 106
    results = run_all(files, jobs=2)
    disagreements = {r.name: (kinds[r.name], r.verdict, r.detail) for r in results if not r.agrees(kinds[r.name])}
    assert disagreements == {}
    assert all(r.complete for r in results)


def test_a_witness_replays_to_a_state_that_satisfies_the_condition() -> None:
    test = parse_file(str(SUITE / "miniJit01.litmus"))
    result = run_test(test)
    assert result.verdict == "Allowed" and result.witness is not None
    s = setup(test)
    _, final = s.machine.replay(result.witness)
    assert s.holds(final)


def test_forbidden_outcome_is_reachable_once_the_synchronization_is_removed() -> None:
    """SM.B+cachesync-isb is Forbidden; the same program without the IC is Allowed."""
    text = (SUITE / "SM.B+cachesync-isb.litmus").read_text()
    assert run_test(parse_file(str(SUITE / "SM.B+cachesync-isb.litmus"))).verdict == "Forbidden"
    from execmem.litmus import parse_litmus

    weakened = parse_litmus(text.replace("    IC IVAU,X1  ;\n", ""), "weakened")
    assert run_test(weakened).verdict == "Allowed"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "execmem", "litmus", *args], capture_output=True, text=True)


def test_cli_reports_disagreements_and_exits_non_zero(tmp_path: Path) -> None:
    kinds = tmp_path / "kinds.txt"
    kinds.write_text("SM.B+isb Forbidden\n")  # wrong on purpose: herd says Allowed
    out = run_cli("--kinds", str(kinds), "-j", "1", str(SUITE / "SM.B+isb.litmus"))
    assert out.returncode == 1
    assert "DISAGREE SM.B+isb" in out.stdout and "agree 0/1" in out.stdout


def test_cli_json_output() -> None:
    out = run_cli("--json", "-j", "1", str(SUITE / "coFF.litmus"))
    assert out.returncode == 0
    (row,) = json.loads(out.stdout)
    assert row["name"] == "coFF" and row["verdict"] == "Allowed"
    assert {"name", "verdict", "states", "seconds"} <= set(row)


def test_cli_malformed_file_is_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.litmus"
    bad.write_text("AArch64 bad\n{ 0:X0=; }\nP0 ;\nNOP ;\nexists 0:X0=1\n")
    out = run_cli("-j", "1", str(bad))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "bad.litmus:2" in out.stdout
