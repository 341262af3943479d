"""Exploring the machine's behaviours.

* :func:`exhaustive` - every interleaving and every non-deterministic choice of the
  model (fetch values, read values, placements of maintenance operations, store
  propagation order), with state hashing so each distinct machine state is expanded
  once.  Bounded by a budget of states *and* of memory (the process's resident set
  may grow by at most ``max_memory`` bytes, and running out of memory ends the
  search too): the result says whether it was complete and, if not, which budget
  it exceeded, with the figures (``Exploration.exceeded``).
* :func:`random_runs` - seeded random schedules for programs too big to enumerate.
* :func:`replay` - re-executes a schedule (a list of choice indices); a
  counterexample is such a schedule plus the per-CPU event trace it produces.

Everything is deterministic: successor lists are ordered, seeds are explicit.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import resource
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
    #: "" or why an exhaustive search stopped early: "budget exceeded: ..." with figures
    exceeded: str = ""
    #: ``schedules`` split by ``classify(observation)`` (exhaustive and complete only)
    schedules_by: dict[Hashable, int] = field(default_factory=dict)

    @property
    def outcomes(self) -> list[Hashable]:
        return list(self.finals)


Progress = Callable[[int], None]
#: Default memory budget of one exhaustive search (growth of the resident set).
MAX_MEMORY = 2 << 30
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set (peak resident set where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _digest(key: Hashable) -> bytes:
    """A 128-bit digest standing for a state's key: the search keeps digests, not the
    keys themselves (several kilobytes each), so its memory per state is fixed."""
    return hashlib.blake2b(pickle.dumps(key, protocol=5), digest_size=16).digest()


def exhaustive(
    model: Model,
    observe: Observe,
    *,
    max_states: int = 2_000_000,
    max_memory: int = MAX_MEMORY,
    max_depth: int = 10_000,
    progress: Progress | None = None,
    stop: Callable[[Hashable], bool] | None = None,
    classify: Callable[[Hashable], Hashable] | None = None,
) -> Exploration:
    """Depth-first search of every reachable state (see the module docstring).

    ``stop``: end the search at the first final observation it accepts (a witness
    is all an "unsafe" verdict needs); the result is then marked incomplete.
    ``classify``: count the schedules per class of final observation (herd's
    positive and negative witnesses) in ``Exploration.schedules_by``.
    """
    started = time.perf_counter()
    result = Exploration()
    baseline = resident_bytes()
    root = model.initial()
    root_key = _digest(root.key())
    seen: set[bytes] = {root_key}
    # Successor digests per expanded state, to count the executions covered afterwards.
    edges: dict[bytes, list[bytes]] = {}
    #: final states, with the index of their class in ``classes``
    finals: dict[bytes, int] = {}
    classes: dict[Hashable, int] = {}
    path: list[int] = []
    steps: list[Step] = []
    stopped: list[bool] = []

    def over_budget() -> bool:
        grown = resident_bytes() - baseline
        if grown <= max_memory:
            return False
        result.exceeded = (
            f"budget exceeded: memory grew by {grown >> 20} MB (budget {max_memory >> 20} MB) "
            f"after {result.states:,} states"
        )
        return True

    def expand(st: MachineState, key: bytes) -> list[tuple[Step, MachineState, bytes]] | None:
        result.states += 1
        if progress is not None and result.states % 1000 == 0:
            progress(result.states)
        if result.states % 256 == 0 and over_budget():
            stopped.append(True)
            return None
        if model.done(st):
            obs = observe(st)
            finals[key] = classes.setdefault(classify(obs) if classify else None, len(classes))
            if obs not in result.finals:
                result.finals[obs] = Witness(list(path), list(steps))
            if stop is not None and stop(obs):
                stopped.append(True)
            return None
        succ = [(step, nxt, _digest(nxt.key())) for step, nxt in model.successors(st)]
        edges[key] = [k for _, _, k in succ]
        if not succ and result.stuck is None:
            result.stuck = Witness(list(path), list(steps))
        return succ

    try:
        _search(result, root, root_key, seen, path, steps, stopped, expand, max_states, max_depth)
    except MemoryError:
        # Release what the search holds before reporting (MemoryError must not escape).
        seen.clear()
        edges.clear()
        stopped.append(True)
        result.exceeded = f"budget exceeded: out of memory after {result.states:,} states"
    if stopped:
        result.complete = False
    if result.complete:
        counts = _count_paths(root_key, edges, finals, len(classes))
        result.schedules = sum(counts)
        result.schedules_by = {c: counts[i] for c, i in classes.items()}
    else:
        result.schedules = len(finals)
    result.seconds = time.perf_counter() - started
    return result


def _search(
    result: Exploration,
    root: MachineState,
    root_key: bytes,
    seen: set[bytes],
    path: list[int],
    steps: list[Step],
    stopped: list[bool],
    expand: Callable[[MachineState, bytes], list[tuple[Step, MachineState, bytes]] | None],
    max_states: int,
    max_depth: int,
) -> None:
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
        if result.states >= max_states:
            result.complete = False
            result.exceeded = f"budget exceeded: {max_states:,} states"
            continue
        if len(path) >= max_depth:
            result.complete = False
            result.exceeded = result.exceeded or f"budget exceeded: a schedule of {max_depth:,} steps"
            continue
        path.append(i)
        steps.append(step)
        nsucc = expand(nxt, key)
        if nsucc:
            stack.append([nsucc, 0])
        else:
            path.pop()
            steps.pop()


def _count_paths(root: bytes, edges: dict[bytes, list[bytes]], finals: dict[bytes, int], classes: int) -> list[int]:
    """Number of paths from ``root`` to a final state of each class (the graph may have
    cycles: a cycle contributes its acyclic unrollings only once, by memoizing on entry)."""
    zero = (0,) * classes
    memo: dict[bytes, tuple[int, ...]] = {}
    stack: list[tuple[bytes, int]] = [(root, 0)]
    on_stack: set[bytes] = {root}
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
        counts = [0] * classes
        if node in finals:
            counts[finals[node]] += 1
        for n in succ:
            for i, k in enumerate(memo.get(n, zero)):
                counts[i] += k
        memo[node] = tuple(counts)
    return list(memo.get(root, zero))


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
