"""The verification catalog: every scenario and required mutation is present, every
observed verdict matches the expected one, counterexamples replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from execmem.emu import Machine, Step
from execmem.emu._state import STALE
from execmem.emu._trace import culprit, timeline_svg
from execmem.verify import SCENARIOS, find, replay, run_variant, scenarios, show, variants
from execmem.verify._cli import run_many

REQUIRED_SCENARIOS = {
    "jit-publish", "jit-finalize-inplace", "rox-cache-trap-fill", "torn-update", "va-reuse",
    "tlb-batch-remote-dsb", "tlb-async-flush", "alias-write-no-maintenance", "call-gate",
}
REQUIRED_MUTATIONS = {
    "arm64": {"no-dc", "no-ic", "no-dsb", "no-isb", "no-remote-cse", "no-quarantine", "map-before-write",
              "no-gate", "no-gate-barrier", "no-retire-barrier"},
    "x86_64": {"no-serialize", "no-quarantine", "map-before-write", "no-gate", "no-gate-barrier", "no-retire-barrier"},
}


def test_every_required_scenario_and_mutation_is_present() -> None:
    assert {s.name for s in scenarios()} >= REQUIRED_SCENARIOS
    for arch, required in REQUIRED_MUTATIONS.items():
        present = {v.mutation for v in variants(arch=arch) if v.mutation}
        assert present >= required, required - present
        # every required mutation is shown unsafe somewhere
        unsafe = {v.mutation for v in variants(arch=arch) if v.mutation and v.expected == "unsafe"}
        assert unsafe >= required, required - unsafe


def test_the_catalog_is_one_explicit_tuple_and_variants_name_their_scenario() -> None:
    assert isinstance(SCENARIOS, tuple) and scenarios() == list(SCENARIOS)
    assert len({s.name for s in SCENARIOS}) == len(SCENARIOS)
    for sc in SCENARIOS:
        built = sc.variants()
        assert built and {v.scenario for v in built} == {sc.name}, sc.name
    ids = [v.id for v in variants()]
    assert len(ids) == len(set(ids))


def test_mutations_not_required_by_the_configuration_are_expected_safe_and_say_why() -> None:
    safe_mutations = [v for v in variants() if v.mutation and v.expected == "safe"]
    assert {v.id for v in safe_mutations} >= {
        "jit-publish/arm64/no-dc-idc", "jit-publish/arm64/no-ic-dic", "va-reuse/x86_64/no-quarantine",
    }
    assert all(len(v.why) > 20 for v in safe_mutations)


@pytest.mark.slow
def test_catalog_observed_verdicts_match_expected() -> None:
    results = run_many(variants(), jobs=2)
    mismatches = {f"{r.scenario}/{r.arch}/{r.variant}": (r.expected, r.observed, r.error) for r in results if not r.ok}
    assert mismatches == {}
    for r in results:
        if r.observed == "unsafe":
            assert r.counterexample and r.counterexample["schedule"] and r.counterexample["trace"]
            assert "* the culprit: step " in r.counterexample["trace"], r.counterexample["trace"]
        else:
            assert r.complete and r.schedules > 0


@pytest.mark.parametrize("variant_id", ["tlb-batch-remote-dsb/arm64/remote-dsb", "jit-publish/arm64/no-remote-cse",
                                        "torn-update/x86_64/in-place"])
def test_a_replayed_counterexample_reproduces_its_hazard(variant_id: str) -> None:
    variant = find(variant_id)
    result = run_variant(variant)
    assert result.observed == "unsafe" and result.counterexample is not None
    steps, hazard, _case = replay(variant, result.counterexample["schedule"])
    assert hazard == result.hazard
    assert len(steps) == len(result.counterexample["schedule"])


def test_full_exploration_of_an_unsafe_variant_counts_schedules() -> None:
    result = run_variant(find("tlb-async-flush/x86_64/async"), first_witness=False)
    first = run_variant(find("tlb-async-flush/x86_64/async"))
    assert result.observed == "unsafe" and result.complete and result.schedules > 10 * first.schedules


@pytest.mark.parametrize(
    ("variant_id", "cpu", "kind", "says"),
    [
        # CPU1 calls g through the pointer but runs f's instruction, still in flight.
        ("va-reuse/arm64/no-quarantine", 1, "exec", f"{STALE} newest @"),
        # The writer runs the trap filler its I-cache refilled: stale, and fatal.
        ("jit-publish/arm64/no-dc", 0, "fault", f"{STALE} newest @"),
        # The user thread's store goes through the translation the unmap replaced.
        ("tlb-batch-remote-dsb/arm64/remote-dsb", 2, "host", f"{STALE} through a superseded translation"),
    ],
)
def test_the_culprit_is_the_step_that_used_superseded_data(variant_id: str, cpu: int, kind: str, says: str) -> None:
    variant = find(variant_id)
    result = run_variant(variant)
    assert result.counterexample is not None
    steps, _hazard, _case = replay(variant, result.counterexample["schedule"])
    blamed = culprit(steps)
    assert blamed is not None
    assert (steps[blamed].cpu, steps[blamed].kind) == (cpu, kind) and says in steps[blamed].detail
    assert not any(STALE in step.detail for step in steps[:blamed])  # the first one


def test_a_guest_store_through_a_replaced_translation_is_the_culprit() -> None:
    m = Machine("arm64", cpus=2, tlb="broadcast")
    page, frame = m.page("rw")
    m.host(0).pte(page, None, note="unmap, no TLB invalidation")
    m.load(1, "str x1, [x2]")
    m.set_reg(1, "x1", 0xBAD0)
    m.set_reg(1, "x2", page)
    finals = m.explore(lambda st: int.from_bytes(m.read(st, frame, 8), "little")).finals
    assert set(finals) == {0, 0xBAD0}  # faulted, or stored through its cached translation
    steps = finals[0xBAD0].steps
    blamed = culprit(steps)
    assert blamed is not None and steps[blamed].kind == "store" and steps[blamed].cpu == 1
    assert f"{STALE} through a superseded translation" in steps[blamed].detail
    assert not any(STALE in step.detail for step in finals[0].steps)  # the faulting schedule used nothing stale


def _boxes(svg: str) -> list[tuple[str, dict[str, str], list[str]]]:
    """(tooltip, rectangle attributes, text lines) of every step's box (its last text is
    the step's number, under the box)."""
    ns = {"s": "http://www.w3.org/2000/svg"}
    return [
        (g.findtext("s:title", namespaces=ns) or "", g.find("s:rect", ns).attrib,  # type: ignore[union-attr]
         [t.text or "" for t in g.findall("s:text", ns)][:-1])
        for g in ElementTree.fromstring(svg).iter("{http://www.w3.org/2000/svg}g")
    ]


def test_timeline_highlights_the_culprit_alone_and_greys_the_retried_fault() -> None:
    variant = find("va-reuse/arm64/no-quarantine")
    _text, svg = show(variant, run_variant(variant))
    boxes = _boxes(svg)
    highlighted = [tip for tip, rect, _ in boxes if rect["stroke-width"] != "1"]
    assert len(highlighted) == 1 and STALE in highlighted[0]
    retried = [rect for tip, rect, _ in boxes if "retried" in tip]
    assert retried and all(rect["fill"] == "#f2f2f2" for rect in retried)  # not the red of a fatal fault


def test_timeline_wraps_long_labels_instead_of_cutting_them() -> None:
    words = [f"word{k}" for k in range(40)]
    steps = [Step(0, "host", 0, " ".join(words)), Step(1, "exec", 0x1000, "nop"), Step(0, "exec", 0x2000, "ret")]
    boxes = _boxes(timeline_svg(steps, 2))
    _tip, long_rect, long_lines = boxes[0]
    assert " ".join(long_lines).split() == words  # every word, in order
    assert len(long_lines) > 3 and float(long_rect["height"]) >= 12 * len(long_lines)
    # The next lane starts below the tall box.
    assert float(boxes[1][1]["y"]) > float(long_rect["y"]) + float(long_rect["height"])


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "execmem", "verify", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_json_fields_and_exit_code() -> None:
    out = cli("--json", "--scenario", "tlb-async-flush", "-j", "1")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {(r["variant"], r["observed"]) for r in rows} == {("async", "unsafe"), ("sync", "safe")}
    for r in rows:
        assert {"scenario", "arch", "variant", "expected", "observed", "schedules"} <= set(r)
    assert next(r for r in rows if r["observed"] == "unsafe")["counterexample"]["schedule"]


def test_cli_show_prints_the_trace_and_writes_the_timeline(tmp_path: Path) -> None:
    svg = tmp_path / "va.svg"
    out = cli("--show", "va-reuse/arm64/no-quarantine", "--svg", str(svg))
    assert out.returncode == 0, out.stderr
    assert "ran f's old instructions" in out.stdout and "CPU1 caller" in out.stdout
    assert svg.read_text().startswith("<svg") and "CPU0 JIT" in svg.read_text()


def test_cli_errors_are_one_line() -> None:
    for args in (["--scenario", "nope"], ["--show", "nope/x"], ["--arch", "mips"]):
        out = cli(*args)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr and out.stderr.count("\n") <= 2


@pytest.mark.slow
def test_runs_on_a_dask_cluster() -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        results = run_many(variants(scenario_name="tlb-async-flush"), scheduler=cluster.scheduler_address)
    assert [(r.variant, r.observed) for r in results] == [("async", "unsafe"), ("sync", "safe")]


@pytest.mark.parametrize("arch", ["arm64", "x86_64"])
def test_the_call_gate_scenario_runs_the_shipped_gate_and_retire(arch: str) -> None:
    """The catalog's gate accounting is the template's own instructions, in order, and
    its free side is the architecture's gate_retire routine itself."""
    from execmem import arch as _arch
    from execmem.verify._gate import GATE_ACCOUNTING

    def lines(source: str) -> list[str]:
        return [" ".join(line.split()) for line in source.replace(";", "\n").splitlines() if line.strip()]

    template, accounting = lines(_arch.get(arch).call_gate), lines(GATE_ACCOUNTING[arch])
    start = template.index(accounting[0])
    assert template[start : start + len(accounting)] == accounting
    execmem_variant = find(f"call-gate/{arch}/execmem")
    result = run_variant(execmem_variant)
    assert result.observed == "safe" and result.complete, result
    unsafe = run_variant(find(f"call-gate/{arch}/no-gate"))
    assert unsafe.observed == "unsafe" and "recycled" in unsafe.hazard


def test_x86_locked_instructions_are_full_barriers_in_the_model() -> None:
    """SB with MFENCE on one side and a locked increment on the other: both loads
    reading 0 is forbidden (SDM Vol. 3 9.2.3.8); with a plain store it is allowed.
    The call gate's Dekker handshake on x86-64 rests on this."""
    from execmem.emu import Machine

    def outcomes(increment: str) -> set[str]:
        m = Machine("x86_64", cpus=2)
        x, y = m.alloc(8), m.alloc(8)
        m.load(0, "mov qword ptr [rbx], 1\nmfence\nmov rax, [rbp]")
        m.load(1, f"{increment}\nmov rax, [rbx]")
        for c in (0, 1):
            m.set_reg(c, "rbx", x)
            m.set_reg(c, "rbp", y)
        return set(m.explore(lambda st: f"{m.reg(st, 0, 'rax')},{m.reg(st, 1, 'rax')}").finals)

    assert outcomes("lock inc qword ptr [rbp]") == {"0,1", "1,0", "1,1"}
    assert outcomes("mov qword ptr [rbp], 1") == {"0,0", "0,1", "1,0", "1,1"}
