"""The litmus front end beyond instruction fetch: the VMSA dialect (translation tables)
against herd's kinds, shareability domains, the seed TLB races as litmus tests (one TLB
model for the catalog and the front end), herd-style final states, atomics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paths
import pytest

from execmem.litmus import parse_file, parse_litmus
from execmem.litmus._cli import read_kinds, run_all
from execmem.litmus._run import run_test
from execmem.verify import find, run_variant

DATA = paths.DATA
VMSA = DATA / "herd" / "aarch64-vmsa"  # vendored half of herd's catalogue, see its NOTICE
DOMAINS = DATA / "litmus-domains"  # our own, verdicts argued from the Arm ARM in each file
SEEDS = DATA / "litmus-seeds"  # the seed TLB races of the verification catalog
#: herd says Allowed, the model Forbidden: a walk ahead of program order whose
#: hardware dirty-state update must precede, in coherence, a page-table write the
#: thread made earlier; the model appends writes only (README, "Agreement").
KNOWN_VMSA = {"coRmwWExpNExp", "coWWExp-TLBI-NExp"}
VMSA_VARIANTS = frozenset({"vmsa", "fatal"})


def _disagreements(folder: Path, kinds_file: Path, **kwargs: object) -> dict[str, str]:
    kinds = read_kinds(str(kinds_file))
    files = [str(p) for p in sorted(folder.glob("*.litmus")) if parse_file(p).name in kinds]
    results = run_all(files, jobs=2, **kwargs)  # type: ignore[arg-type]
    assert len(results) == len(kinds)
    return {r.name: f"{kinds[r.name]} vs {r.verdict} {r.detail}" for r in results if not r.agrees(kinds[r.name])}


@pytest.mark.slow
def test_vmsa_half_of_herds_catalogue_agrees_but_for_the_listed_tests() -> None:
    kinds = read_kinds(str(VMSA / "kinds.txt"))
    disagree = _disagreements(VMSA / "tests", VMSA / "kinds.txt", max_states=50_000, variants=VMSA_VARIANTS)
    assert set(disagree) == KNOWN_VMSA, disagree
    assert (len(kinds) - len(disagree)) / len(kinds) >= 0.9


def test_shareability_domains_give_the_verdicts_the_arm_arm_argues() -> None:
    assert _disagreements(DOMAINS, DOMAINS / "kinds.txt") == {}


def test_seed_tlb_races_as_litmus_tests() -> None:
    assert _disagreements(SEEDS, SEEDS / "kinds.txt") == {}


@pytest.mark.parametrize(
    ("catalog", "litmus"),
    [
        ("tlb-batch-remote-dsb/arm64/remote-dsb", "tlb-batch-remote-dsb"),
        ("tlb-batch-remote-dsb/arm64/flush-mm", "tlb-batch-flush-mm"),
        ("tlb-async-flush/x86_64/async", "tlb-async-flush"),
        ("tlb-async-flush/x86_64/sync", "tlb-sync-flush"),
    ],
)
def test_the_catalog_and_the_litmus_front_end_share_one_tlb_model(catalog: str, litmus: str) -> None:
    """An unsafe catalog variant is an Allowed litmus outcome, a safe one Forbidden."""
    result = run_variant(find(catalog))
    verdict = run_test(parse_file(SEEDS / f"{litmus}.litmus")).verdict
    assert result.observed == ("unsafe" if verdict == "Allowed" else "safe")


def test_page_tables_need_the_vmsa_dialect() -> None:
    test = parse_file(VMSA / "tests" / "coWR-pte.litmus")
    plain = run_test(test)
    assert plain.verdict == "unsupported" and "--variant vmsa" in plain.detail
    assert run_test(test, variants=frozenset({"vmsa"})).verdict == "Forbidden"


SB = """AArch64 SB
{ 0:X1=x; 0:X3=y; 1:X1=y; 1:X3=x; }
 P0          | P1          ;
 MOV W0,#1   | MOV W0,#1   ;
 STR W0,[X1] | STR W0,[X1] ;
 LDR W2,[X3] | LDR W2,[X3] ;
exists (0:X2=0 /\\ 1:X2=0)
"""


def test_final_states_and_witnesses_as_herd_prints_them() -> None:
    r = run_test(parse_litmus(SB, "sb.litmus"))
    pairs = {(s["0:X2"], s["1:X2"]) for s in r.final_states}
    assert pairs == {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}
    assert r.verdict == "Allowed" and r.validated and r.positive > 0 and r.negative > 0


def test_descriptors_and_faults_in_final_states(tmp_path: Path) -> None:
    r = run_test(parse_file(VMSA / "tests" / "coRR-pte8-dmb.litmus"), variants=VMSA_VARIANTS)
    assert {"0:X2", "fault(P0:L0,x)"} <= set(r.final_states[0])
    text = tmp_path / "t.litmus"
    text.write_text("AArch64 T\nVariant=vmsa\n{ pte_x=(af:0); 0:X1=pte_x; }\n P0 ;\n LDR X0,[X1] ;\n"
                    "exists (0:X0=(oa:phy_x, af:0))\n")
    r = run_test(parse_file(text))
    assert r.verdict == "Allowed" and r.final_states == [{"0:X0": "(oa:PA(x), af:0)"}]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "execmem", "litmus", *args], capture_output=True, text=True)


def test_cli_prints_herds_format_and_json_carries_the_states(tmp_path: Path) -> None:
    path = tmp_path / "sb.litmus"
    path.write_text(SB)
    out = run_cli("-j", "1", str(path))
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[:2] == ["Test SB Allowed", "States 4"]
    assert "0:X2=0; 1:X2=0;" in lines and "Ok" in lines and "Witnesses" in lines
    assert any(line.startswith("Positive: ") and " Negative: " in line for line in lines)
    assert "Condition exists (0:X2=0 /\\ 1:X2=0)" in lines
    assert any(line.startswith("Observation SB Sometimes ") for line in lines)
    (row,) = json.loads(run_cli("--json", "-j", "1", str(path)).stdout)
    assert {"0:X2": "0", "1:X2": "0"} in row["states"] and len(row["states"]) == 4
    assert row["positive"] > 0 and row["negative"] > 0


def test_cli_agreement_by_category() -> None:
    out = run_cli("--summary", "-j", "2", "--kinds", str(SEEDS / "kinds.txt"), str(SEEDS))
    assert out.returncode == 0
    assert "agree 4/4" in out.stdout and "  TLBI    agree 4/4" in out.stdout


def test_cli_rejects_an_unknown_variant() -> None:
    out = run_cli("--variant", "vmsa,bogus", str(SEEDS))
    assert out.returncode != 0 and "unknown bogus" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


def _single(code: str, init: str, condition: str, cpus: int = 1) -> str:
    head = " | ".join(f"P{i}" for i in range(cpus))
    rows = "\n".join(f" {row} ;" for row in code.strip().splitlines())
    return f"AArch64 T\n{{ {init} }}\n {head} ;\n{rows}\n{condition}\n"


@pytest.mark.parametrize(
    ("code", "init", "condition", "verdict"),
    [
        # LD<op> and SWP return the old value and store the new one
        ("LDADD X1,X0,[X2]", "x=5; 0:X1=3; 0:X2=x;", "forall (0:X0=5 /\\ x=8)", "Required"),
        ("SWPAL X1,X0,[X2]", "x=5; 0:X1=3; 0:X2=x;", "forall (0:X0=5 /\\ x=3)", "Required"),
        # CAS stores only when memory equals the expected value (Arm ARM C6.2.48)
        ("CAS X0,X1,[X2]", "x=5; 0:X0=5; 0:X1=9; 0:X2=x;", "forall (0:X0=5 /\\ x=9)", "Required"),
        ("CAS X0,X1,[X2]", "x=5; 0:X0=4; 0:X1=9; 0:X2=x;", "forall (0:X0=5 /\\ x=5)", "Required"),
    ],
)
def test_armv8_1_atomics(code: str, init: str, condition: str, verdict: str) -> None:
    assert run_test(parse_litmus(_single(code, init, condition))).verdict == verdict


def test_atomic_increments_are_never_lost() -> None:
    text = _single("LDADD X1,X0,[X2] | LDADD X1,X0,[X2]", "0:X1=1; 0:X2=x; 1:X1=1; 1:X2=x;", "exists (x=1)", cpus=2)
    assert run_test(parse_litmus(text)).verdict == "Forbidden"


def test_exclusive_pairs_are_atomic_and_may_fail() -> None:
    code = "LDXR X0,[X2] | LDXR X0,[X2]\nADD X0,X0,#1 | ADD X0,X0,#1\nSTXR W3,X0,[X2] | STXR W3,X0,[X2]"
    both = _single(code, "0:X2=x; 1:X2=x;", "exists (0:X3=0 /\\ 1:X3=0 /\\ x=1)", cpus=2)
    assert run_test(parse_litmus(both)).verdict == "Forbidden"  # both succeed: one saw the other
    fails = _single(code, "0:X2=x; 1:X2=x;", "exists (0:X3=1)", cpus=2)
    assert run_test(parse_litmus(fails)).verdict == "Allowed"


def test_runs_on_a_dask_cluster() -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        files = [str(p) for p in sorted(SEEDS.glob("*.litmus"))]
        results = run_all(files, scheduler=cluster.scheduler_address)
    kinds = read_kinds(str(SEEDS / "kinds.txt"))
    assert [r.name for r in results] == [parse_file(f).name for f in files]
    assert all(r.agrees(kinds[r.name]) for r in results)
