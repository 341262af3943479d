"""Running a herd7 AArch64 litmus test on the modeled machine.

Layout: thread ``P<n>`` at ``0x100000 + n * 0x10000`` (its fault handler ``P<n>.F``
0x8000 further), mapped read+write+execute (the tests modify their own code);
locations as ``_memory`` lays them out (the plain dialect: each in its own slot;
VMSA: each a page with its own page-table entry and frame); cache lines are one
granule wide, as herd7's model puts every location on its own line
(``aarch64loc.cat``: scl = loc).  Registers start from the init block (labels
resolve to addresses, locations to their addresses, instruction values to their
encodings, descriptors to their encodings).

Variants (the test's ``Variant=`` line, and ``variants`` from the command line as
herd's ``-variant``): ``vmsa`` selects the VMSA dialect; ``fatal``/``precise`` (the
default) stop a thread at a fault it has no handler for, ``handled``/``imprecise``
execute the faulting instruction again (a second fault discards the execution).
``TTHM=HA HD`` (or ``P1:HA``...) makes the hardware manage the access flag and the
dirty state (TCR_EL1.HA/HD) on every (the named) thread.

The test runs under exhaustive exploration; the observed locations are the
registers, memory and faults its condition (and ``locations`` clause) names.  The
verdict is ``Allowed`` when some final state satisfies the condition's predicate,
``Forbidden`` when none does; a ``forall`` test is ``Required`` when every final
state satisfies it.  The quantifier decides what the test *expects* (``validated``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from execmem._errors import ExecmemError, LitmusError
from execmem.emu import Machine, MachineState
from execmem.emu._explore import MAX_MEMORY
from execmem.emu._layout import CODE_BASE, CODE_STRIDE, page_of
from execmem.emu._state import DISCARD
from execmem.litmus._ast import (
    TRUE,
    And,
    Array,
    Atom,
    CodeLabel,
    FaultAtom,
    Implies,
    Instr,
    Int,
    LitmusTest,
    Loc,
    LocAtom,
    Mem,
    Not,
    Or,
    Prop,
    Pte,
    Reg,
    Value,
    ValueAtom,
    atoms,
    evaluate_prop,
)
from execmem.litmus._herdasm import assemble_thread, encode_instruction_value, process_labels
from execmem.litmus._memory import Memory, Unsupported, split
from execmem.litmus._parse import parse_file

HANDLER_OFFSET = 0x8000
_HANDLED = frozenset({"handled", "imprecise"})
_FATAL = frozenset({"fatal", "precise"})


@dataclass
class LitmusResult:
    name: str
    path: str | None
    #: "Allowed", "Forbidden", "Required" (a forall test every state satisfies),
    #: "unknown" (a budget ran out first), "unsupported" or "error"
    verdict: str
    #: distinct final states over the observed locations
    states: int = 0
    #: how many of them satisfy the condition's predicate
    satisfied: int = 0
    #: the final states, as herd prints them: {location: value} (sorted)
    final_states: list[dict[str, str]] = field(default_factory=list)
    #: herd's witness counts: executions (schedules through the explored state graph)
    #: ending in a state that satisfies the predicate, and that do not
    positive: int = 0
    negative: int = 0
    #: what the test exercises (``categories``), for agreement by category
    categories: tuple[str, ...] = ()
    #: the test's condition, as herd prints it
    condition: str = ""
    explored: int = 0
    seconds: float = 0.0
    complete: bool = True
    #: whether herd would print "Ok" (the quantifier applied to the final states)
    validated: bool | None = None
    detail: str = ""
    witness: list[int] | None = field(default=None, repr=False)

    def agrees(self, kind: str) -> bool:
        """Does the result match a herd kind (``Allowed``: some final state satisfies
        the predicate; ``Forbidden``: none does; ``Required``: every one does)?"""
        if self.verdict not in ("Allowed", "Forbidden", "Required"):
            return False
        if kind == "Required":
            return self.satisfied == self.states > 0
        return (self.satisfied > 0) == (kind == "Allowed")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "verdict": self.verdict,
            "states": self.final_states,
            "satisfied": self.satisfied,
            "positive": self.positive,
            "negative": self.negative,
            "categories": list(self.categories),
            "condition": self.condition,
            "explored": self.explored,
            "seconds": round(self.seconds, 4),
            "complete": self.complete,
            "validated": self.validated,
            "detail": self.detail,
        }


@dataclass
class Setup:
    """A litmus test laid out on a machine, with how to read its final states."""

    test: LitmusTest
    machine: Machine
    memory: Memory
    labels: dict[int, dict[str, int]]
    #: the locations herd prints in a final state, and the fault atoms
    locations: tuple[Reg | Mem, ...] = ()
    fault_atoms: tuple[FaultAtom, ...] = ()
    #: locations whose values are descriptors, or addresses of locations (to print them)
    descriptors: frozenset[Reg | Mem] = frozenset()
    addresses: frozenset[Reg | Mem] = frozenset()
    #: the condition's predicate, with each entry's own frame as the default output
    #: address of a descriptor compared with it (``pte_x=(af:0)``)
    prop: Prop = TRUE

    def resolve(self, value: Value) -> object:
        if isinstance(value, Int):
            return value.as_u64()
        if isinstance(value, Loc):
            return self.memory.address(value.name)
        if isinstance(value, CodeLabel):
            try:
                return self.labels[value.proc][value.label]
            except KeyError:
                raise LitmusError(f"{self.test.path or self.test.name}:0: no label P{value.proc}:{value.label}") from None
        if isinstance(value, Instr):
            return encode_instruction_value(value, self.test.path)
        if isinstance(value, Pte):
            return self.memory.descriptor(value)
        raise Unsupported(f"value {value} is not supported")

    def read(self, st: MachineState, atom: Atom) -> object:
        if isinstance(atom, FaultAtom):
            return any(True for _ in self.faults(st, atom))
        location = atom.location if isinstance(atom, ValueAtom) else atom.left
        return self.value(st, location)

    def value(self, st: MachineState, location: Reg | Mem) -> int:
        if isinstance(location, Reg):
            index = self.machine.isa.register_index(location.name)
            if index is None:
                raise Unsupported(f"register {location} cannot be observed")
            return st.cpus[location.proc].reg(index)
        return int.from_bytes(self.machine.read(st, self.memory.cell(location.name), 8), "little")

    def faults(self, st: MachineState, atom: FaultAtom) -> Iterator[tuple[int, str, int]]:
        """The faults of ``st`` that ``atom`` names (herd: ``MMU:T`` matches a fault of
        type T on either side, ``D-MMU:T`` only a data abort)."""
        for pc, kind, va in st.cpus[atom.proc].faults if atom.proc < len(st.cpus) else ():
            if atom.label is not None and self.labels.get(atom.proc, {}).get(atom.label) != pc:
                continue
            if atom.location is not None and page_of(va) != page_of(self.memory.address(atom.location)):
                continue
            expected = atom.fault_type
            if expected is not None and kind != expected and not (
                expected.startswith("MMU:") and kind in (f"D-{expected}", f"I-{expected}")
            ):
                continue
            yield pc, kind, va

    def lookup(self, st: MachineState) -> Callable[[Atom], object]:
        def get(atom: Atom) -> object:
            if isinstance(atom, LocAtom):
                return self.value(st, atom.left), self.value(st, atom.right)
            return self.read(st, atom)

        return get

    def observe(self, st: MachineState) -> Hashable:
        """The final state herd would print (values of the locations, faults seen), or
        None for an execution herd discards."""
        if any(c.status == DISCARD for c in st.cpus):
            return None
        values = tuple(self.value(st, loc) for loc in self.locations)
        faults = tuple(any(True for _ in self.faults(st, f)) for f in self.fault_atoms)
        return values, faults

    def describe(self, state: Hashable) -> dict[str, str]:
        """A state from :meth:`observe` in herd's notation (``[PTE(x)]``, ``(oa:PA(x))``)."""
        assert isinstance(state, tuple)
        values: tuple[int, ...] = state[0]
        faults: tuple[bool, ...] = state[1]
        out: dict[str, str] = {}
        for loc, value in zip(self.locations, values, strict=True):
            if isinstance(loc, Mem):
                kind, base = split(loc.name) if self.memory.vmsa else ("va", loc.name)
                key = {"va": base, "pte": f"[PTE({base})]", "pa": f"[PA({base})]"}[kind]
            else:
                key = str(loc)
            if loc in self.descriptors:
                text = self.memory.describe(value)
            elif loc in self.addresses and (name := self.memory.name_of(value)) is not None:
                text = name
            else:
                text = str(value - (1 << 64) if value >= 1 << 63 else value)
            out[key] = text
        for atom, seen in zip(self.fault_atoms, faults, strict=True):
            out[str(atom)] = "1" if seen else "0"
        return out

    def holds(self, st: MachineState) -> bool:
        return evaluate_prop(self.prop, self.lookup(st), self.resolve)


def _dialect(test: LitmusTest, variants: frozenset[str]) -> tuple[bool, str]:
    """(VMSA?, the machine's fault policy) from the test's and the command line's variants."""
    vmsa = "vmsa" in test.variants or "vmsa" in variants
    for words in (test.variants, variants):
        if words & _HANDLED:
            return vmsa, "handled"
        if words & _FATAL:
            return vmsa, "fatal"
    return vmsa, "fatal"


def _uses_page_tables(test: LitmusTest) -> bool:
    """Does the run depend on translation tables?  Initial entries alone do not: without
    the VMSA dialect nothing translates through them (herd's other models), so they are
    inert unless a thread or the condition names an entry or a descriptor."""
    names = [*test.condition.memory(), *(v.name for v in test.init.values() if isinstance(v, Loc))]
    values = [*test.init.values(), *(a.value for a in atoms(test.condition.prop) if isinstance(a, ValueAtom))]
    return (
        any(split(n)[0] != "va" for n in names)
        or any(isinstance(v, Pte) for v in values)
        or "TTHM" in test.info
    )


def _hardware(test: LitmusTest, m: Machine) -> None:
    """``TTHM=HA HD`` or ``TTHM=P0:HA P1:HD``: TCR_EL1.HA/HD per thread."""
    flags: dict[int, set[str]] = {}
    for word in test.info.get("TTHM", "").split():
        proc, _, flag = word.rpartition(":")
        if flag not in ("HA", "HD") or (proc and not (proc[:1] == "P" and proc[1:].isdigit())):
            raise Unsupported(f"TTHM={test.info['TTHM']} is not understood")
        for p in [int(proc[1:])] if proc else range(test.nprocs):
            flags.setdefault(p, set()).add(flag)
    for p, on in flags.items():
        if p < test.nprocs:
            m.set_hardware_updates(p, access_flag="HA" in on or "HD" in on, dirty="HD" in on)


def _el0(test: LitmusTest, m: Machine) -> None:
    """``EL0=P0,P2``: those threads run at EL0 (herd's -procs-user)."""
    for word in test.info.get("EL0", "").replace(",", " ").split():
        if not (word[:1] == "P" and word[1:].isdigit() and int(word[1:]) < test.nprocs):
            raise LitmusError(f"{test.path or test.name}:0: EL0={test.info['EL0']}: {word} is not a thread")
        if test.handler_of(int(word[1:])) is not None:
            raise Unsupported("a thread at EL0 with a fault handler (which runs at EL1) is not modelled")
        m.set_user(int(word[1:]))


def _names(test: LitmusTest) -> list[str]:
    """Every location the test names, including output addresses of descriptors."""
    names = list(test.locations())
    values = [*test.init.values(), *test.init.ptes.values()]
    values += [a.value for a in atoms(test.condition.prop) if isinstance(a, ValueAtom)]
    for v in values:
        if isinstance(v, Pte) and v.oa is not None:
            names.append(v.oa)
        elif isinstance(v, Loc):
            names.append(v.name)
    return list(dict.fromkeys(names))


def setup(test: LitmusTest, variants: frozenset[str] = frozenset()) -> Setup:
    """Lay ``test`` out on a fresh machine (raises LitmusError / Unsupported)."""
    where = test.path or test.name
    vmsa, on_fault = _dialect(test, variants)
    if not vmsa and _uses_page_tables(test):
        raise Unsupported("the test uses translation tables: run it in the VMSA dialect (--variant vmsa)")
    m = Machine("arm64", cpus=test.nprocs, idc=test.idc, dic=test.dic, line_size=4, on_fault=on_fault)
    _hardware(test, m)
    bases = {}
    for th in test.threads:
        bases[th.name] = CODE_BASE + th.proc * CODE_STRIDE + (HANDLER_OFFSET if th.handler else 0)
    labels = process_labels(test, bases)
    sizes = {name: _element_size(ty) * int(ty[ty.index("[") + 1 : -1]) for name, ty in test.init.types.items()
             if isinstance(name, str) and ty.endswith("]")}
    memory = Memory.lay_out(m, _names(test), vmsa=vmsa, sizes=sizes)
    st = Setup(test, m, memory, labels, ())
    for th in test.threads:
        words = assemble_thread(test, th, bases[th.name], labels.get(th.proc))
        code = b"".join(w.to_bytes(4, "little") for w in words)
        m.place(
            th.proc, code, bases[th.name],
            labels={k: v for k, v in labels.get(th.proc, {}).items()},
            start=not th.handler, exit_at_end=not th.handler, handler=th.handler, perms="rwx",
        )
    _el0(test, m)
    for reg, value in test.init.registers.items():
        if reg.proc >= test.nprocs:
            raise LitmusError(f"{where}:0: register {reg} of a thread that does not exist")
        m.set_reg(reg.proc, reg.name, _value(st, value))
    for name, value in test.init.memory.items():
        if isinstance(value, Array):
            size = _element_size(test.init.types.get(name, "int"))
            for i, item in enumerate(value.items):
                m.poke(memory.cell(name) + i * size, _value(st, item).to_bytes(size, "little"))
        else:
            m.poke(memory.cell(name), _value(st, value).to_bytes(8, "little"))
    for name, pte in test.init.ptes.items() if vmsa else ():
        kind, base = split(name)
        if kind != "pte":
            raise Unsupported(f"a descriptor as the value of {name}, which is not a page-table entry")
        m.poke(memory.cell(name), memory.descriptor(pte, owner=base).to_bytes(8, "little"))
    _observed(st)
    st.prop = _owned(test.condition.prop)
    return st


def _observed(st: Setup) -> None:
    """What a final state shows (herd: the condition's locations, then ``locations``):
    registers by thread and number, then memory, then faults."""
    test = st.test
    locs: list[Reg | Mem] = []
    faults: list[FaultAtom] = []
    typed: dict[Reg | Mem, set[type]] = {}
    for a in [*test.condition.atoms(), *test.locations_clause]:
        if isinstance(a, FaultAtom):
            faults.append(a)
        elif isinstance(a, LocAtom):
            locs += [a.left, a.right]
        elif isinstance(a, ValueAtom):
            locs.append(a.location)
            typed.setdefault(a.location, set()).add(type(a.value))
        else:
            locs.append(a)
    for reg, value in test.init.registers.items():
        typed.setdefault(reg, set()).add(type(value))
    for name, value in test.init.memory.items():
        typed.setdefault(Mem(name), set()).add(type(value))
    for key, ty in test.init.types.items():
        loc = key if isinstance(key, Reg) else Mem(key)
        typed.setdefault(loc, set()).add(Pte if ty.startswith("pteval") else Loc if ty.endswith("*") else Int)
    unique = list(dict.fromkeys(locs))
    regs = sorted((x for x in unique if isinstance(x, Reg)), key=lambda r: (r.proc, len(r.name), r.name))
    st.locations = (*regs, *(x for x in unique if isinstance(x, Mem)))
    st.fault_atoms = tuple(dict.fromkeys(faults))
    vmsa = st.memory.vmsa
    st.descriptors = frozenset(
        x for x in st.locations
        if vmsa and (Pte in typed.get(x, ()) or (isinstance(x, Mem) and split(x.name)[0] == "pte"))
    )
    st.addresses = frozenset(x for x in st.locations if Loc in typed.get(x, ()))


def _owned(p: Prop) -> Prop:
    """``p`` with ``PA(x)`` as the output address of descriptors compared with
    ``PTE(x)`` that give none (herd's default)."""
    if isinstance(p, ValueAtom):
        v = p.value
        if isinstance(v, Pte) and v.oa is None and isinstance(p.location, Mem):
            kind, base = split(p.location.name)
            if kind == "pte":
                return ValueAtom(p.location, Pte(f"PA({base})", v.fields, v.attrs))
        return p
    if isinstance(p, Not):
        return Not(_owned(p.prop))
    if isinstance(p, Implies):
        return Implies(_owned(p.left), _owned(p.right))
    if isinstance(p, And):
        return And(tuple(_owned(q) for q in p.items))
    if isinstance(p, Or):
        return Or(tuple(_owned(q) for q in p.items))
    return p


def _element_size(ty: str) -> int:
    """Bytes of one element of a C-like type herd accepts (``int`` is 4, as in herd)."""
    base = ty.split("[")[0].strip()
    if base.endswith("*") or base in ("int64_t", "uint64_t", "long", "pteval_t", "intptr_t"):
        return 8
    return {"char": 1, "int8_t": 1, "uint8_t": 1, "short": 2, "int16_t": 2, "uint16_t": 2}.get(base, 4)


def _value(st: Setup, value: Value) -> int:
    if isinstance(value, Array):
        raise Unsupported(f"initial value {value} is not supported")
    resolved = st.resolve(value)
    assert isinstance(resolved, int)
    return resolved & (1 << 64) - 1


def run_test(
    test: LitmusTest,
    *,
    max_states: int = 1_000_000,
    max_memory: int = MAX_MEMORY,
    variants: frozenset[str] = frozenset(),
) -> LitmusResult:
    """Explore ``test`` exhaustively and give herd's verdict for its condition."""
    started = time.perf_counter()
    result = LitmusResult(test.name, test.path, "error")
    try:
        result.categories = categories(test)
        result.condition = str(test.condition)
        s = setup(test, variants)
        # Observation: the final state plus whether the predicate holds there.
        exploration = s.machine.explore(
            lambda st: None if (obs := s.observe(st)) is None else (obs, s.holds(st)),
            max_states=max_states,
            max_memory=max_memory,
            classify=lambda obs: None if obs is None else obs[1],  # type: ignore[index]
        )
    except Unsupported as exc:
        result.verdict, result.detail = "unsupported", str(exc)
        result.seconds = time.perf_counter() - started
        return result
    except ExecmemError as exc:
        result.detail = str(exc)
        result.seconds = time.perf_counter() - started
        return result
    finals = {obs: w for obs, w in exploration.finals.items() if obs is not None}
    satisfied = [obs for obs in finals if obs[1]]  # type: ignore[index]
    result.states = len({obs[0] for obs in finals})  # type: ignore[index]
    result.satisfied = len({obs[0] for obs in satisfied})  # type: ignore[index]
    result.final_states = sorted(
        (s.describe(state) for state in {obs[0] for obs in finals}),  # type: ignore[index]
        key=lambda d: list(d.items()),
    )
    result.positive = exploration.schedules_by.get(True, 0)
    result.negative = exploration.schedules_by.get(False, 0)
    result.explored = exploration.states
    result.complete = exploration.complete
    result.validated = test.condition.verdict(obs[1] for obs in finals)  # type: ignore[index]
    if exploration.stuck is not None and not finals:
        result.detail = "deadlock: every thread blocked"
    if not exploration.complete:
        # A satisfying state is a witness; without one, nothing is known.
        result.verdict = "Allowed" if satisfied else "unknown"
        result.detail = exploration.exceeded
    elif test.condition.quantifier == "forall" and result.satisfied == result.states > 0:
        result.verdict = "Required"
    else:
        result.verdict = "Allowed" if satisfied else "Forbidden"
    if satisfied:
        result.witness = finals[satisfied[0]].schedule
    result.seconds = time.perf_counter() - started
    return result


def categories(test: LitmusTest) -> tuple[str, ...]:
    """What a test exercises, for agreement by category (a test may be in several):

    * ``faults``: its outcome names a fault;
    * ``TLBI``: it invalidates TLB entries;
    * ``BBM``: it installs a valid entry mapping another location's frame (a remap,
      the case break-before-make is about);
    * ``AF/DB``: hardware access-flag or dirty-state management, or descriptors that
      set those bits;
    * ``other`` if none applies.
    """
    out = []
    if any(isinstance(a, FaultAtom) for a in [*test.condition.atoms(), *test.locations_clause]):
        out.append("faults")
    if any(ln.instruction.upper().startswith("TLBI") for th in test.threads for ln in th.instructions() if ln.instruction):
        out.append("TLBI")
    ptes = [v for v in [*test.init.values(), *test.init.ptes.values()] if isinstance(v, Pte)]
    owners = {split(v.name)[1] for v in test.init.registers.values() if isinstance(v, Loc) and split(v.name)[0] == "pte"}
    if any(v.oa and ("valid", "0") not in v.fields and owners - {split(v.oa)[1]} for v in ptes):
        out.append("BBM")
    if "TTHM" in test.info or any(k in ("af", "db", "dbm") for v in ptes for k, _ in v.fields):
        out.append("AF/DB")
    return tuple(out) or ("other",)


def run_file(
    path: str, *, max_states: int = 1_000_000, max_memory: int = MAX_MEMORY, variants: frozenset[str] = frozenset()
) -> LitmusResult:
    try:
        test = parse_file(path)
    except ExecmemError as exc:
        return LitmusResult(path.rsplit("/", 1)[-1].removesuffix(".litmus"), path, "error", detail=str(exc))
    return run_test(test, max_states=max_states, max_memory=max_memory, variants=variants)
