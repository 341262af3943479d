"""Scenarios, variants and results of the verification catalog.

A *scenario* is one hazard from the seed texts (``shared/seeds``); it has *variants*
per architecture: the execmem recipe (expected ``safe``), each named mutation of it
(expected ``unsafe`` - or ``safe`` where the configuration makes the step
unnecessary, and the catalog says why), and the fixes the seed texts discuss.  A
variant builds a :class:`~execmem.emu.Machine` whose final states are classified by
a *hazard* function (empty string: fine).  Running a variant explores the machine
exhaustively; ``unsafe`` comes with a replayable counterexample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from execmem._errors import ExecmemError
from execmem.emu import Machine, MachineState, Step
from execmem.emu._trace import format_trace, timeline_svg

SAFE, UNSAFE = "safe", "unsafe"


@dataclass
class Case:
    """A built variant: the machine and how to judge its final states."""

    machine: Machine
    #: What went wrong in a final state ("" when nothing did).
    hazard: Callable[[MachineState], str]
    #: Lane names for traces (default CPU0..).
    names: tuple[str, ...] = ()


def first_fault(st: MachineState, cpus: range | tuple[int, ...], what: str) -> str:
    """Hazard text for the first CPU (of ``cpus``) that faulted, or ""."""
    for c in cpus:
        if st.cpus[c].faults:
            pc, kind, _ = st.cpus[c].faults[0]
            return f"CPU{c} {kind} at {pc:#x}: {what}"
    return ""


@dataclass(frozen=True)
class Variant:
    scenario: str
    arch: str
    name: str
    expected: str
    why: str
    build: Callable[[], Case] = field(compare=False, repr=False)
    #: Mutation name this variant exercises, if any (``no-dc``, ``no-quarantine``...).
    mutation: str = ""

    @property
    def id(self) -> str:
        return f"{self.scenario}/{self.arch}/{self.name}"


@dataclass
class Result:
    scenario: str
    arch: str
    variant: str
    expected: str
    observed: str
    why: str
    schedules: int = 0
    states: int = 0
    seconds: float = 0.0
    complete: bool = True
    hazard: str = ""
    #: For ``unsafe``: the schedule (choice index per step) and its trace.
    counterexample: dict[str, Any] | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.observed == self.expected

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "arch": self.arch,
            "variant": self.variant,
            "expected": self.expected,
            "observed": self.observed,
            "schedules": self.schedules,
            "states": self.states,
            "seconds": round(self.seconds, 3),
            "complete": self.complete,
            "why": self.why,
            "hazard": self.hazard,
            "counterexample": self.counterexample,
            "error": self.error,
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    seed: str
    variants: Callable[[], list[Variant]] = field(compare=False, repr=False)


_SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, summary: str, seed: str) -> Callable[[Callable[[], list[Variant]]], Callable[[], list[Variant]]]:
    """Register a function returning a scenario's variants."""

    def register(fn: Callable[[], list[Variant]]) -> Callable[[], list[Variant]]:
        _SCENARIOS[name] = Scenario(name, summary, seed, fn)
        return fn

    return register


def scenarios() -> list[Scenario]:
    from execmem.verify import _gate, _jit, _reuse, _tlb, _update  # noqa: F401  (registration)

    return list(_SCENARIOS.values())


def variants(*, scenario_name: str | None = None, arch: str | None = None) -> list[Variant]:
    out: list[Variant] = []
    for sc in scenarios():
        if scenario_name and sc.name != scenario_name:
            continue
        out.extend(v for v in sc.variants() if not arch or v.arch == arch)
    return out


def find(variant_id: str) -> Variant:
    """``scenario/variant`` or ``scenario/arch/variant``."""
    parts = variant_id.strip("/").split("/")
    matches = [
        v
        for v in variants(scenario_name=parts[0])
        if (len(parts) == 2 and v.name == parts[1]) or (len(parts) == 3 and (v.arch, v.name) == (parts[1], parts[2]))
    ]
    if len(matches) != 1:
        known = ", ".join(v.id for v in variants(scenario_name=parts[0])) or "none"
        raise ExecmemError(
            f"{'ambiguous' if matches else 'no'} variant {variant_id!r}; give scenario/arch/variant (known: {known})"
        )
    return matches[0]


def run_variant(variant: Variant, *, max_states: int = 500_000, first_witness: bool = True) -> Result:
    """Explore one variant exhaustively and compare with its expected verdict.

    With ``first_witness`` the search stops at the first hazard (one counterexample
    settles "unsafe"; the schedule count is then a lower bound).  A "safe" verdict
    always needs the complete search.
    """
    started = time.perf_counter()
    result = Result(variant.scenario, variant.arch, variant.name, variant.expected, "error", variant.why)
    try:
        case = variant.build()
        exploration = case.machine.explore(
            case.hazard, max_states=max_states, stop=bool if first_witness else None
        )
    except ExecmemError as exc:
        result.error = str(exc)
        result.seconds = time.perf_counter() - started
        return result
    result.states = exploration.states
    result.schedules = exploration.schedules
    result.complete = exploration.complete
    hazards = sorted(str(obs) for obs in exploration.finals if obs)
    if exploration.stuck is not None:
        result.error = "deadlock: every CPU blocked"
    if hazards:
        result.observed = UNSAFE
        result.hazard = hazards[0]
        witness = exploration.finals[hazards[0]]
        result.counterexample = {
            "schedule": witness.schedule,
            "trace": format_trace(witness.steps, case.machine.ncpus, names=case.names or None),
        }
    else:
        result.observed = SAFE if exploration.complete else "unknown (state budget exhausted)"
    result.seconds = time.perf_counter() - started
    return result


def replay(variant: Variant, schedule: list[int]) -> tuple[list[Step], str, Case]:
    """Re-run a counterexample: its steps and the hazard it ends in."""
    case = variant.build()
    steps, final = case.machine.replay(schedule)
    return steps, case.hazard(final), case


def show(variant: Variant, result: Result) -> tuple[str, str]:
    """(text trace, SVG timeline) of an unsafe result's counterexample."""
    if not result.counterexample:
        raise ExecmemError(f"{variant.id} is {result.observed}: no counterexample to show")
    steps, hazard, case = replay(variant, result.counterexample["schedule"])
    names = case.names or None
    title = f"{variant.id}: {hazard}"
    text = f"{title}\n{format_trace(steps, case.machine.ncpus, names=names)}"
    return text, timeline_svg(steps, case.machine.ncpus, title=title, names=names)
