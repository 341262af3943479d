"""Exploring the machine's behaviours.

* :func:`exhaustive` - every interleaving and every non-deterministic choice of the
  model (fetch values, read values, placements of maintenance operations, store
  propagation order), with state hashing so each distinct machine state is expanded
  once.  Bounded by a state budget; the result says whether it was complete.
* :func:`random_runs` - seeded random schedules for programs too big to enumerate.
* :func:`replay` - re-executes a schedule (a list of choice indices); a
  counterexample is such a schedule plus the per-CPU event trace it produces.

Everything is deterministic: successor lists are ordered, seeds are explicit.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from execmem._errors import ModelError
from execmem.emu._semantics import Model, Step
from execmem.emu._state import MachineState

Observe = Callable[[MachineState], Hashable]


@dataclass
class Witness:
    """A schedule (choice index per step) that reaches a final state, and its steps."""

    schedule: list[int]
    steps: list[Step]


@dataclass
class Exploration:
    finals: dict[Hashable, Witness] = field(default_factory=dict)
    states: int = 0
    transitions: int = 0
    complete: bool = True
    #: The first path found that could not be finished (deadlock or bound), if any.
    stuck: Witness | None = None
    seconds: float = 0.0
    runs: int = 0

    @property
    def outcomes(self) -> list[Hashable]:
        return list(self.finals)


Progress = Callable[[int], None]


def exhaustive(
    model: Model,
    observe: Observe,
    *,
    max_states: int = 2_000_000,
    max_depth: int = 10_000,
    progress: Progress | None = None,
) -> Exploration:
    """Depth-first search of every reachable state (see the module docstring)."""
    started = time.perf_counter()
    result = Exploration()
    root = model.initial()
    seen: set[Hashable] = {root.key()}
    # Each frame: state, its successors, index of the next successor to try.
    stack: list[tuple[MachineState, list[tuple[Step, MachineState]], int]] = []
    path: list[int] = []
    steps: list[Step] = []

    def expand(st: MachineState) -> list[tuple[Step, MachineState]] | None:
        result.states += 1
        if progress is not None and result.states % 1000 == 0:
            progress(result.states)
        if model.done(st):
            obs = observe(st)
            if obs not in result.finals:
                result.finals[obs] = Witness(list(path), list(steps))
            return None
        succ = model.successors(st)
        if not succ and result.stuck is None:
            result.stuck = Witness(list(path), list(steps))
        return succ

    succ = expand(root)
    if succ:
        stack.append((root, succ, 0))
    while stack:
        st, succ, i = stack[-1]
        if i >= len(succ):
            stack.pop()
            if path:
                path.pop()
                steps.pop()
            continue
        stack[-1] = (st, succ, i + 1)
        step, nxt = succ[i]
        result.transitions += 1
        key = nxt.key()
        if key in seen:
            continue
        seen.add(key)
        if result.states >= max_states or len(path) >= max_depth:
            result.complete = False
            continue
        path.append(i)
        steps.append(step)
        nsucc = expand(nxt)
        if nsucc:
            stack.append((nxt, nsucc, 0))
        else:
            path.pop()
            steps.pop()
    result.seconds = time.perf_counter() - started
    return result


def random_runs(
    model: Model,
    observe: Observe,
    *,
    runs: int,
    seed: int = 0,
    max_steps: int = 100_000,
    choose: Callable[[random.Random, list[tuple[Step, MachineState]]], int] | None = None,
    progress: Progress | None = None,
) -> Exploration:
    """``runs`` seeded random schedules; every run is replayable from its witness."""
    started = time.perf_counter()
    result = Exploration(complete=False)
    rng = random.Random(seed)
    for run in range(runs):
        st = model.initial()
        schedule: list[int] = []
        steps: list[Step] = []
        for _ in range(max_steps):
            if model.done(st):
                break
            succ = model.successors(st)
            result.transitions += 1
            if not succ:
                break
            i = choose(rng, succ) if choose else rng.randrange(len(succ))
            schedule.append(i)
            steps.append(succ[i][0])
            st = succ[i][1]
        result.states += len(schedule)
        result.runs += 1
        if model.done(st):
            obs = observe(st)
            if obs not in result.finals:
                result.finals[obs] = Witness(schedule, steps)
        elif result.stuck is None:
            result.stuck = Witness(schedule, steps)
        if progress is not None:
            progress(run + 1)
    result.seconds = time.perf_counter() - started
    return result


def replay(model: Model, schedule: list[int]) -> tuple[list[Step], MachineState]:
    """Re-run ``schedule``; raises ModelError if it does not fit the model."""
    st = model.initial()
    steps: list[Step] = []
    for n, i in enumerate(schedule):
        succ = model.successors(st)
        if not 0 <= i < len(succ):
            raise ModelError(f"schedule step {n}: choice {i} but only {len(succ)} successors")
        step, st = succ[i]
        steps.append(step)
    return steps, st
