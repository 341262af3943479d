"""Running a herd7 AArch64 litmus test on the modeled machine.

Layout: thread ``P<n>`` at ``0x100000 + n * 0x10000`` (its fault handler ``P<n>.F``
0x8000 further), mapped read+write+execute (the tests modify their own code);
every memory location in its own 64-byte slot; cache lines are one granule wide,
as herd7's model puts every location on its own line (``aarch64loc.cat``: scl =
loc).  Registers start from the init block (labels resolve to addresses, locations
to their addresses, instruction values to their encodings).

The test runs under exhaustive exploration; the observed locations are the
registers, memory and faults its condition (and ``locations`` clause) names.  The
verdict is ``Allowed`` when some final state satisfies the condition's predicate,
``Forbidden`` when none does (for ``exists``, ``~exists`` and ``forall`` alike: the
quantifier decides what the test *expects*, reported as ``validated``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from execmem._errors import ExecmemError, LitmusError
from execmem.emu import Machine, MachineState
from execmem.emu._layout import CODE_BASE, CODE_STRIDE
from execmem.litmus._ast import (
    Array,
    Atom,
    CodeLabel,
    FaultAtom,
    Instr,
    Int,
    LitmusTest,
    Loc,
    LocAtom,
    Mem,
    Pte,
    Reg,
    Value,
    ValueAtom,
)
from execmem.litmus._herdasm import assemble_thread, encode_instruction_value, process_labels
from execmem.litmus._parse import parse_file

HANDLER_OFFSET = 0x8000
DATA_SLOT = 64
#: herd's fault names for the machine's fault kinds.
FAULT_NAMES = {"UndefinedInstruction": "UndefinedInstruction", "DataAbort": "MMU", "InstructionAbort": "MMU"}


@dataclass
class LitmusResult:
    name: str
    path: str | None
    #: "Allowed", "Forbidden", "unsupported" or "error"
    verdict: str
    #: distinct final states over the observed locations
    states: int = 0
    explored: int = 0
    seconds: float = 0.0
    complete: bool = True
    #: whether herd would print "Ok" (the quantifier applied to the final states)
    validated: bool | None = None
    detail: str = ""
    witness: list[int] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "verdict": self.verdict,
            "states": self.states,
            "explored": self.explored,
            "seconds": round(self.seconds, 4),
            "complete": self.complete,
            "validated": self.validated,
            "detail": self.detail,
        }


class _Unsupported(ExecmemError):
    pass


@dataclass
class Setup:
    """A litmus test laid out on a machine, with how to read its final states."""

    test: LitmusTest
    machine: Machine
    locations: dict[str, int]
    labels: dict[int, dict[str, int]]
    observed: tuple[Atom, ...]

    def resolve(self, value: Value) -> object:
        if isinstance(value, Int):
            return value.as_u64()
        if isinstance(value, Loc):
            return self.locations[value.name]
        if isinstance(value, CodeLabel):
            try:
                return self.labels[value.proc][value.label]
            except KeyError:
                raise LitmusError(f"{self.test.path or self.test.name}:0: no label P{value.proc}:{value.label}") from None
        if isinstance(value, Instr):
            return encode_instruction_value(value, self.test.path)
        raise _Unsupported(f"value {value} is not supported")

    def read(self, st: MachineState, atom: Atom) -> object:
        if isinstance(atom, FaultAtom):
            return self._fault(st, atom)
        location = atom.location if isinstance(atom, ValueAtom) else atom.left
        return self._value(st, location)

    def _value(self, st: MachineState, location: Reg | Mem) -> int:
        if isinstance(location, Reg):
            index = self.machine.isa.register_index(location.name)
            if index is None:
                raise _Unsupported(f"register {location} cannot be observed")
            return st.cpus[location.proc].reg(index)
        return int.from_bytes(self.machine.read(st, self.locations[location.name], 8), "little")

    def _fault(self, st: MachineState, atom: FaultAtom) -> bool:
        faults = st.cpus[atom.proc].faults if atom.proc < len(st.cpus) else ()
        for pc, kind, _ in faults:
            if atom.label is not None and self.labels.get(atom.proc, {}).get(atom.label) != pc:
                continue
            if atom.fault_type is not None and FAULT_NAMES.get(kind, kind) != atom.fault_type:
                continue
            return True
        return False

    def lookup(self, st: MachineState) -> Callable[[Atom], object]:
        def get(atom: Atom) -> object:
            if isinstance(atom, LocAtom):
                return self._value(st, atom.left), self._value(st, atom.right)
            return self.read(st, atom)

        return get

    def observe(self, st: MachineState) -> Hashable:
        get = self.lookup(st)
        return tuple(get(a) for a in self.observed)

    def holds(self, st: MachineState) -> bool:
        return self.test.condition.holds(self.lookup(st), self.resolve)


def setup(test: LitmusTest) -> Setup:
    """Lay ``test`` out on a fresh machine (raises LitmusError / _Unsupported)."""
    where = test.path or test.name
    if test.init.ptes and "vmsa" in test.variants:
        raise _Unsupported("page tables (Variant=vmsa) are not supported by the litmus front end")
    m = Machine("arm64", cpus=test.nprocs, idc=test.idc, dic=test.dic, line_size=4)
    bases = {}
    for th in test.threads:
        bases[th.name] = CODE_BASE + th.proc * CODE_STRIDE + (HANDLER_OFFSET if th.handler else 0)
    labels = process_labels(test, bases)
    # herd's locations: every name in init and condition, each in its own slot.
    names = list(test.locations())
    locations = {}
    for name in names:
        locations[name] = m.alloc(8, value=0)
    st = Setup(test, m, locations, labels, ())
    for th in test.threads:
        words = assemble_thread(test, th, bases[th.name], labels.get(th.proc))
        code = b"".join(w.to_bytes(4, "little") for w in words)
        m.place(
            th.proc, code, bases[th.name],
            labels={k: v for k, v in labels.get(th.proc, {}).items()},
            start=not th.handler, exit_at_end=not th.handler, handler=th.handler, perms="rwx",
        )
    for reg, value in test.init.registers.items():
        if reg.proc >= test.nprocs:
            raise LitmusError(f"{where}:0: register {reg} of a thread that does not exist")
        resolved = _value(st, value)
        m.set_reg(reg.proc, reg.name, resolved)
    for name, value in test.init.memory.items():
        m.poke(locations[name], _value(st, value).to_bytes(8, "little"))
    observed: list[Atom] = list(test.condition.atoms())
    for loc in test.locations_clause:
        if isinstance(loc, (Reg, Mem)):
            observed.append(ValueAtom(loc, Int(0)))
    st.observed = tuple(dict.fromkeys(observed))
    return st


def _value(st: Setup, value: Value) -> int:
    if isinstance(value, (Pte, Array)):
        raise _Unsupported(f"initial value {value} is not supported")
    resolved = st.resolve(value)
    assert isinstance(resolved, int)
    return resolved & (1 << 64) - 1


def run_test(test: LitmusTest, *, max_states: int = 1_000_000) -> LitmusResult:
    """Explore ``test`` exhaustively and give herd's verdict for its condition."""
    started = time.perf_counter()
    result = LitmusResult(test.name, test.path, "error")
    try:
        s = setup(test)
        # Observation: the observed values plus whether the predicate holds there.
        exploration = s.machine.explore(lambda st: (s.observe(st), s.holds(st)), max_states=max_states)
    except _Unsupported as exc:
        result.verdict, result.detail = "unsupported", str(exc)
        result.seconds = time.perf_counter() - started
        return result
    except ExecmemError as exc:
        result.detail = str(exc)
        result.seconds = time.perf_counter() - started
        return result
    finals = exploration.finals
    satisfied = [obs for obs in finals if obs[1]]  # type: ignore[index]
    result.states = len({obs[0] for obs in finals})  # type: ignore[index]
    result.explored = exploration.states
    result.complete = exploration.complete
    result.validated = test.condition.verdict(obs[1] for obs in finals)  # type: ignore[index]
    if exploration.stuck is not None:
        result.detail = "deadlock: every thread blocked"
    if satisfied:
        result.verdict = "Allowed"
        result.witness = finals[satisfied[0]].schedule
    else:
        result.verdict = "Forbidden" if exploration.complete else "error"
        if not exploration.complete:
            result.detail = f"state budget of {max_states} exhausted"
    result.seconds = time.perf_counter() - started
    return result


def run_file(path: str, *, max_states: int = 1_000_000) -> LitmusResult:
    try:
        test = parse_file(path)
    except ExecmemError as exc:
        return LitmusResult(path.rsplit("/", 1)[-1].removesuffix(".litmus"), path, "error", detail=str(exc))
    return run_test(test, max_states=max_states)
