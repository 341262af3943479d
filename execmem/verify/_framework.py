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
    """One hazard of the catalog (``_catalog.SCENARIOS``): ``variants`` builds its
    variants, per architecture, when asked."""

    name: str
    summary: str
    #: The seed text it comes from (``seeds/NNN``).
    seed: str
    variants: Callable[[], list[Variant]] = field(compare=False, repr=False)


def run_variant(
    variant: Variant,
    *,
    max_states: int = 500_000,
    first_witness: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Explore one variant exhaustively and compare with its expected verdict.

    With ``first_witness`` the search stops at the first hazard (one counterexample
    settles "unsafe"; the schedule count is then a lower bound).  A "safe" verdict
    always needs the complete search.  ``progress`` is told the number of states
    explored so far, every thousand.
    """
    started = time.perf_counter()
    result = Result(variant.scenario, variant.arch, variant.name, variant.expected, "error", variant.why)
    try:
        case = variant.build()
        exploration = case.machine.explore(
            case.hazard, max_states=max_states, stop=bool if first_witness else None, progress=progress
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
    caption = f"expected {variant.expected}: {variant.why}"
    return text, timeline_svg(steps, case.machine.ncpus, title=title, caption=caption, names=names)
