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
from execmem.emu._semantics import Model
from execmem.emu._state import MachineState, Step

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
    #: Complete executions covered: paths from the initial state to a final state
    #: through the explored state graph (exhaustive), or runs that finished (random).
    schedules: int = 0

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
    stop: Callable[[Hashable], bool] | None = None,
) -> Exploration:
    """Depth-first search of every reachable state (see the module docstring).

    ``stop``: end the search at the first final observation it accepts (a witness
    is all an "unsafe" verdict needs); the result is then marked incomplete.
    """
    started = time.perf_counter()
    result = Exploration()
    root = model.initial()
    root_key = root.key()
    seen: set[Hashable] = {root_key}
    # Successor keys per expanded state, to count the executions covered afterwards.
    edges: dict[Hashable, list[Hashable]] = {}
    finals: set[Hashable] = set()
    path: list[int] = []
    steps: list[Step] = []
    stopped: list[bool] = []

    def expand(st: MachineState, key: Hashable) -> list[tuple[Step, MachineState, tuple[object, ...]]] | None:
        result.states += 1
        if progress is not None and result.states % 1000 == 0:
            progress(result.states)
        if model.done(st):
            finals.add(key)
            obs = observe(st)
            if obs not in result.finals:
                result.finals[obs] = Witness(list(path), list(steps))
            if stop is not None and stop(obs):
                stopped.append(True)
            return None
        succ = [(step, nxt, nxt.key()) for step, nxt in model.successors(st)]
        edges[key] = [k for _, _, k in succ]
        if not succ and result.stuck is None:
            result.stuck = Witness(list(path), list(steps))
        return succ

    # Each frame: successors of a state and the index of the next one to try.
    stack: list[list[object]] = []
    first = expand(root, root_key)
    if first:
        stack.append([first, 0])
    while stack and not stopped:
        frame = stack[-1]
        succ, i = frame[0], frame[1]
        assert isinstance(succ, list) and isinstance(i, int)
        if i >= len(succ):
            stack.pop()
            if path:
                path.pop()
                steps.pop()
            continue
        frame[1] = i + 1
        step, nxt, key = succ[i]
        result.transitions += 1
        if key in seen:
            continue
        seen.add(key)
        if result.states >= max_states or len(path) >= max_depth:
            result.complete = False
            continue
        path.append(i)
        steps.append(step)
        nsucc = expand(nxt, key)
        if nsucc:
            stack.append([nsucc, 0])
        else:
            path.pop()
            steps.pop()
    if stopped:
        result.complete = False
    result.schedules = _count_paths(root_key, edges, finals) if result.complete else len(finals)
    result.seconds = time.perf_counter() - started
    return result


def _count_paths(root: Hashable, edges: dict[Hashable, list[Hashable]], finals: set[Hashable]) -> int:
    """Number of paths from ``root`` to a final state (the graph may have cycles:
    a cycle contributes its acyclic unrollings only once, by memoizing on entry)."""
    memo: dict[Hashable, int] = {}
    stack: list[tuple[Hashable, int]] = [(root, 0)]
    on_stack: set[Hashable] = {root}
    while stack:
        node, i = stack[-1]
        succ = edges.get(node, [])
        if i < len(succ):
            stack[-1] = (node, i + 1)
            nxt = succ[i]
            if nxt not in memo and nxt not in on_stack:
                stack.append((nxt, 0))
                on_stack.add(nxt)
            continue
        stack.pop()
        on_stack.discard(node)
        memo[node] = (1 if node in finals else 0) + sum(memo.get(n, 0) for n in succ)
    return memo.get(root, 0)


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
            result.schedules += 1
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
