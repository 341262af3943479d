"""The data model of a parsed herd7 AArch64 litmus test.

Everything is immutable (frozen dataclasses, tuples, :class:`FrozenMap`) so a parsed
test can be shared between worker processes, hashed and compared.  Equality ignores
source line numbers, so ``parse(format(parse(f))) == parse(f)``.

Overview::

    LitmusTest
      name, path, doc, texname
      info          FrozenMap[str, str]   every ``Key=value`` line before ``{`` (in order)
      variants      frozenset[str]        ``Variant=`` words, lower-case (``self``, ``fatal``)
      cache_type    frozenset[str]        ``CacheType=`` words, upper-case (``IDC``, ``DIC``)
      init          Init
      threads       tuple[Thread, ...]    main threads P0..Pn-1, then fault handlers Pn.F
      condition     Condition             quantifier + Prop
      locations_clause  tuple[Reg | Mem | FaultAtom, ...]   herd's ``locations [...]``
      filter        Prop | None           herd's ``filter`` clause

Values (:data:`Value`) are :class:`Int`, :class:`Loc` (address of a memory location),
:class:`CodeLabel` (address of a code label), :class:`Instr` (the encoding of an
instruction; ``NOP`` is ``Instr("NOP")``), :class:`Pte` (a page-table entry value) and
:class:`Array`.  A register is :class:`Reg` ``(proc, "X9")`` (a named tuple, so plain
``(1, "X9")`` tuples work as keys); ``W9`` and ``x9`` are stored as ``X9``.  A memory
location is a plain name in :class:`Init` (``"x"``, ``"PTE(x)"``) and :class:`Mem` in
conditions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, NamedTuple, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V], Generic[K, V]):
    """An immutable, hashable, insertion-ordered mapping (equality ignores order)."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._d: dict[K, V] = dict(items)
        self._h: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._d == other._d
        if isinstance(other, Mapping):
            return self._d == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def __reduce__(self) -> tuple[type[FrozenMap[K, V]], tuple[list[tuple[K, V]]]]:
        # the cached hash is not pickled: string hashes differ between processes
        return (type(self), (list(self._d.items()),))


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Int:
    """An integer as written (may be negative; the runner decides the width)."""

    value: int

    def __str__(self) -> str:
        return str(self.value)

    def as_u64(self) -> int:
        return self.value & 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Loc:
    """The address of a memory location (``x``, ``&x``, ``PTE(x)``)."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class CodeLabel:
    """The address of label ``label`` of thread ``P<proc>`` (``P1:L0``, ``label:"P1:L0"``)."""

    proc: int
    label: str

    def __str__(self) -> str:
        return f"P{self.proc}:{self.label}"


@dataclass(frozen=True)
class Instr:
    """The encoding of one instruction (``NOP``, ``instr:"B .+4"``).

    ``text`` is the herd spelling with blanks collapsed; ``NOP`` is always ``"NOP"``.
    Encode it with :func:`execmem.litmus.encode_instruction_value`.
    """

    text: str

    def __str__(self) -> str:
        return "NOP" if self.text == "NOP" else f'instr:"{self.text}"'


@dataclass(frozen=True)
class Pte:
    """A page-table entry value ``(oa:phy_x, valid:0, af:1, db:0, attrs:(...))``.

    ``oa`` is the output address as written (``phy_x``, ``PA(x)``, ``PTE(x)``) or None;
    ``fields`` other ``key:value`` pairs; ``attrs`` bare attribute names and the names
    of an ``attrs:(...)`` list.  No defaults are filled in (herd adds ``oa:PA(x)`` for
    ``[PTE(x)]`` when absent).
    """

    oa: str | None
    fields: tuple[tuple[str, str], ...] = ()
    attrs: tuple[str, ...] = ()

    def __str__(self) -> str:
        parts = []
        if self.oa is not None:
            parts.append(f"oa:{self.oa}")
        parts.extend(f"{k}:{v}" for k, v in self.fields)
        parts.extend(self.attrs)
        return "(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class Array:
    """An array value ``{1,2}`` (``int t[2] = {1,2};``)."""

    items: tuple[Value, ...]

    def __str__(self) -> str:
        return "{" + ",".join(str(v) for v in self.items) + "}"


Value = Int | Loc | CodeLabel | Instr | Pte | Array


# ------------------------------------------------------------------------ locations


class Reg(NamedTuple):
    """Register ``name`` (canonical: ``X0``..``X30``, ``SP``, system registers) of ``P<proc>``."""

    proc: int
    name: str

    def __str__(self) -> str:
        return f"{self.proc}:{self.name}"


@dataclass(frozen=True)
class Mem:
    """The contents of memory location ``name`` in a condition (``x=1``, ``[x]=1``)."""

    name: str

    def __str__(self) -> str:
        return f"[{self.name}]"


Location = Reg | Mem


# ---------------------------------------------------------------------- propositions


@dataclass(frozen=True)
class ValueAtom:
    """``location = value``."""

    location: Location
    value: Value

    def __str__(self) -> str:
        v = self.value
        text = f'label:"{v}"' if isinstance(v, CodeLabel) else str(v)
        return f"{_loc_text(self.location)}={text}"


@dataclass(frozen=True)
class LocAtom:
    """``location = location`` (both sides observed)."""

    left: Location
    right: Location

    def __str__(self) -> str:
        return f"{_loc_text(self.left)}={self.right}"


@dataclass(frozen=True)
class FaultAtom:
    """``fault(P0:L0,UndefinedInstruction)``: thread ``proc`` faulted (at ``label``,
    accessing ``location``, with ``fault_type``); None fields match anything."""

    proc: int
    label: str | None = None
    location: str | None = None
    fault_type: str | None = None

    def __str__(self) -> str:
        parts = [f"P{self.proc}" + (f":{self.label}" if self.label else "")]
        if self.location is not None:
            parts.append(self.location)
        if self.fault_type is not None:
            parts.append(self.fault_type)
        return "fault(" + ",".join(parts) + ")"


@dataclass(frozen=True)
class Not:
    prop: Prop

    def __str__(self) -> str:
        return "~" + _wrap(self.prop, 3)


@dataclass(frozen=True)
class And:
    """Conjunction; ``And(())`` is ``true``."""

    items: tuple[Prop, ...]

    def __str__(self) -> str:
        if not self.items:
            return "true"
        return " /\\ ".join(_wrap(p, 2) for p in self.items)


@dataclass(frozen=True)
class Or:
    """Disjunction; ``Or(())`` is ``false``."""

    items: tuple[Prop, ...]

    def __str__(self) -> str:
        if not self.items:
            return "false"
        return " \\/ ".join(_wrap(p, 1) for p in self.items)


@dataclass(frozen=True)
class Implies:
    left: Prop
    right: Prop

    def __str__(self) -> str:
        return f"{_wrap(self.left, 3)} => {_wrap(self.right, 2)}"


Atom = ValueAtom | LocAtom | FaultAtom
Prop = ValueAtom | LocAtom | FaultAtom | Not | And | Or | Implies
TRUE: Prop = And(())
FALSE: Prop = Or(())


def _loc_text(loc: Location) -> str:
    return str(loc) if isinstance(loc, Reg) else loc.name


def _level(p: Prop) -> int:
    # herd: OR < AND < IMPLIES < NOT (atoms highest)
    if isinstance(p, Or) and p.items:
        return 1
    if isinstance(p, And) and p.items:
        return 2
    if isinstance(p, Implies):
        return 3
    return 4


def _wrap(p: Prop, above: int) -> str:
    return str(p) if _level(p) > above else f"({p})"


def atoms(p: Prop) -> Iterator[Atom]:
    """Every atom of ``p``, left to right."""
    if isinstance(p, (ValueAtom, LocAtom, FaultAtom)):
        yield p
    elif isinstance(p, Not):
        yield from atoms(p.prop)
    elif isinstance(p, Implies):
        yield from atoms(p.left)
        yield from atoms(p.right)
    else:
        for q in p.items:
            yield from atoms(q)


def _default_resolve(v: Value) -> object:
    return v.value if isinstance(v, Int) else v


def evaluate_prop(
    p: Prop,
    lookup: Callable[[Atom], object],
    resolve: Callable[[Value], object] | None = None,
) -> bool:
    """Evaluate ``p`` on one final state.

    ``lookup(atom)``: for a :class:`ValueAtom` the observed value of ``atom.location``,
    for a :class:`LocAtom` a pair ``(left, right)`` of observed values, for a
    :class:`FaultAtom` whether that fault was observed.  ``resolve(value)`` turns the
    expected :data:`Value` into something comparable with observed values (label ->
    address, instruction -> encoding, ``Loc`` -> address); the default maps ``Int`` to
    ``int`` and leaves other values as they are.
    """
    res = resolve or _default_resolve

    def ev(q: Prop) -> bool:
        if isinstance(q, ValueAtom):
            return bool(lookup(q) == res(q.value))
        if isinstance(q, LocAtom):
            got = lookup(q)
            if not (isinstance(got, tuple) and len(got) == 2):
                raise TypeError("lookup(LocAtom) must return a (left, right) pair")
            return bool(got[0] == got[1])
        if isinstance(q, FaultAtom):
            return bool(lookup(q))
        if isinstance(q, Not):
            return not ev(q.prop)
        if isinstance(q, Implies):
            return (not ev(q.left)) or ev(q.right)
        if isinstance(q, And):
            return all(ev(x) for x in q.items)
        return any(ev(x) for x in q.items)

    return ev(p)


def _prop_registers(p: Prop) -> Iterator[Reg]:
    for a in atoms(p):
        if isinstance(a, ValueAtom) and isinstance(a.location, Reg):
            yield a.location
        elif isinstance(a, LocAtom):
            for loc in (a.left, a.right):
                if isinstance(loc, Reg):
                    yield loc


def _prop_memory(p: Prop) -> Iterator[str]:
    for a in atoms(p):
        if isinstance(a, ValueAtom):
            if isinstance(a.location, Mem):
                yield a.location.name
            yield from _value_locs(a.value)
        elif isinstance(a, LocAtom):
            for loc in (a.left, a.right):
                if isinstance(loc, Mem):
                    yield loc.name
        elif isinstance(a, FaultAtom) and a.location is not None:
            yield a.location


def _value_locs(v: Value) -> Iterator[str]:
    if isinstance(v, Loc):
        yield v.name
    elif isinstance(v, Array):
        for x in v.items:
            yield from _value_locs(x)


def _value_labels(v: Value) -> Iterator[CodeLabel]:
    if isinstance(v, CodeLabel):
        yield v
    elif isinstance(v, Array):
        for x in v.items:
            yield from _value_labels(x)


def _unique(xs: Iterable[K]) -> tuple[K, ...]:
    return tuple(dict.fromkeys(xs))


Quantifier = Literal["exists", "~exists", "forall"]


@dataclass(frozen=True)
class Condition:
    """The final condition: ``exists P``, ``~exists P`` or ``forall P``.

    A test without a condition gets ``forall true`` (as herd does); ``final P`` is
    ``exists P``.
    """

    quantifier: Quantifier
    prop: Prop
    line_no: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.quantifier} ({self.prop})"

    def atoms(self) -> tuple[Atom, ...]:
        return tuple(atoms(self.prop))

    def registers(self) -> tuple[Reg, ...]:
        """Every register the condition observes (first-appearance order)."""
        return _unique(_prop_registers(self.prop))

    def memory(self) -> tuple[str, ...]:
        """Every memory location named by the condition (observed or as a value)."""
        return _unique(_prop_memory(self.prop))

    def faults(self) -> tuple[FaultAtom, ...]:
        return tuple(a for a in atoms(self.prop) if isinstance(a, FaultAtom))

    def code_labels(self) -> tuple[CodeLabel, ...]:
        out: list[CodeLabel] = []
        for a in atoms(self.prop):
            if isinstance(a, ValueAtom):
                out.extend(_value_labels(a.value))
        return _unique(out)

    def holds(
        self,
        lookup: Callable[[Atom], object],
        resolve: Callable[[Value], object] | None = None,
    ) -> bool:
        """Whether the proposition holds on one final state (see :func:`evaluate_prop`)."""
        return evaluate_prop(self.prop, lookup, resolve)

    evaluate = holds

    def verdict(self, outcomes: Iterable[bool]) -> bool:
        """Whether the test's condition is validated, given ``holds`` per final state:
        ``exists``: some state; ``~exists``: no state; ``forall``: every state."""
        seen = list(outcomes)
        if self.quantifier == "exists":
            return any(seen)
        if self.quantifier == "~exists":
            return not any(seen)
        return all(seen)


# ----------------------------------------------------------------------------- code


@dataclass(frozen=True)
class CodeLine:
    """One non-empty cell of a thread's column: labels, then at most one instruction.

    ``instruction`` is the herd text with blanks collapsed (``"STR W0,[X1]"``); None
    for a cell holding labels only (they name the next instruction, or the end of the
    thread).  ``line_no`` is the source line (not compared).
    """

    labels: tuple[str, ...]
    instruction: str | None
    line_no: int = field(default=0, compare=False)

    def __str__(self) -> str:
        parts = [f"{lab}:" for lab in self.labels]
        if self.instruction is not None:
            parts.append(self.instruction)
        return " ".join(parts)


@dataclass(frozen=True)
class Thread:
    """A thread column: ``P1`` (main, ``handler=False``) or ``P1.F`` (the fault handler
    of P1; a fault in P1 branches to it, ``ERET`` returns to ``ELR_EL1``).

    Labels are per process: P1 and P1.F share one namespace (a handler may name a
    label of its thread, as in ``ADR X9,l1``).
    """

    name: str
    proc: int
    handler: bool
    lines: tuple[CodeLine, ...]
    annotations: tuple[str, ...] = ()

    def instructions(self) -> tuple[CodeLine, ...]:
        """The lines holding an instruction, in order (one 4-byte word each)."""
        return tuple(ln for ln in self.lines if ln.instruction is not None)

    def label_offsets(self) -> dict[str, int]:
        """Byte offset from the thread's first instruction of every label defined here
        (a label at the end gets ``4 * len(instructions())``)."""
        out: dict[str, int] = {}
        n = 0
        for ln in self.lines:
            for lab in ln.labels:
                out[lab] = 4 * n
            if ln.instruction is not None:
                n += 1
        return out

    def labels(self) -> tuple[str, ...]:
        return tuple(lab for ln in self.lines for lab in ln.labels)


# ----------------------------------------------------------------------------- init


@dataclass(frozen=True)
class Init:
    """The initial state.

    ``registers``: ``Reg(proc, "X9") -> Value`` (registers not named start at 0).
    ``memory``: location name -> initial value (locations not named start at 0).
    ``types``: declared C-like types, ``Reg`` or location name -> ``"ins_t *"``,
    ``"void *"``, ``"int"``, ``"uint64_t"``, ``"int[2]"``, ``"*"`` (herd's untyped
    pointer).  A declaration without ``=`` only appears here.
    ``ptes``: memory locations initialised with a page-table entry value
    (``pte_x=(oa:phy_x)``, ``[PTE(x)]=(oa:PA(y))``); they are not in ``memory``.
    """

    registers: FrozenMap[Reg, Value] = field(default_factory=FrozenMap)
    memory: FrozenMap[str, Value] = field(default_factory=FrozenMap)
    types: FrozenMap[Reg | str, str] = field(default_factory=FrozenMap)
    ptes: FrozenMap[str, Pte] = field(default_factory=FrozenMap)

    def values(self) -> Iterator[Value]:
        yield from self.registers.values()
        yield from self.memory.values()


LocationsItem = Reg | Mem | FaultAtom


@dataclass(frozen=True)
class LitmusTest:
    """A parsed test; see the module documentation for the fields."""

    name: str
    path: str | None = field(compare=False)
    info: FrozenMap[str, str]
    variants: frozenset[str]
    cache_type: frozenset[str]
    init: Init
    threads: tuple[Thread, ...]
    condition: Condition
    locations_clause: tuple[LocationsItem, ...] = ()
    filter: Prop | None = None
    doc: str | None = None
    texname: str | None = None

    @property
    def dic(self) -> bool:
        """``CacheType=DIC``: instruction fetch is coherent with data, no IC IVAU needed."""
        return "DIC" in self.cache_type

    @property
    def idc(self) -> bool:
        """``CacheType=IDC`` (or DIC, which implies it, as in herd7): no DC CVAU needed."""
        return "IDC" in self.cache_type or "DIC" in self.cache_type

    @property
    def nprocs(self) -> int:
        """Number of main threads (P0..P<n-1>)."""
        return sum(1 for t in self.threads if not t.handler)

    def thread(self, proc: int, handler: bool = False) -> Thread | None:
        for t in self.threads:
            if t.proc == proc and t.handler == handler:
                return t
        return None

    def handler_of(self, proc: int) -> Thread | None:
        return self.thread(proc, handler=True)

    def code_labels(self) -> tuple[CodeLabel, ...]:
        """Every code label used as a value (init registers/memory, condition, filter),
        first-appearance order: the labels whose addresses the runner must resolve."""
        out: list[CodeLabel] = []
        for v in self.init.values():
            out.extend(_value_labels(v))
        out.extend(self.condition.code_labels())
        if self.filter is not None:
            for a in atoms(self.filter):
                if isinstance(a, ValueAtom):
                    out.extend(_value_labels(a.value))
        return _unique(out)

    def locations(self) -> tuple[str, ...]:
        """Every memory location named in the init block (as a location or as a value),
        the condition, the ``locations`` clause or the filter, first-appearance order."""
        out: list[str] = []
        for reg_value in self.init.registers.values():
            out.extend(_value_locs(reg_value))
        for name, v in self.init.memory.items():
            out.append(name)
            out.extend(_value_locs(v))
        out.extend(k for k in self.init.types if isinstance(k, str))
        out.extend(self.init.ptes)
        out.extend(self.condition.memory())
        for item in self.locations_clause:
            if isinstance(item, Mem):
                out.append(item.name)
            elif isinstance(item, FaultAtom) and item.location is not None:
                out.append(item.location)
        if self.filter is not None:
            out.extend(_prop_memory(self.filter))
        return _unique(out)

    def registers(self) -> tuple[Reg, ...]:
        """Every register named in the init block, the condition, the ``locations``
        clause or the filter."""
        out: list[Reg] = list(self.init.registers)
        out.extend(k for k in self.init.types if isinstance(k, Reg))
        out.extend(self.condition.registers())
        out.extend(i for i in self.locations_clause if isinstance(i, Reg))
        if self.filter is not None:
            out.extend(_prop_registers(self.filter))
        return _unique(out)
