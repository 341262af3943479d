"""Per-CPU state of the modeled machine and the machine state itself.

A CPU runs its instructions in program order; what makes it relaxed is *views*:
timeline positions that bound where its next events may be placed (see
``_timeline``).  Named views (indices into :attr:`CpuState.views`):

====== =====================================================================
rnew    lower bound for the next explicit read
dcnew   lower bound for the next DC
icnew   lower bound for the next IC / TLBI
fnew    lower bound for the next instruction fetch (raised by context synchronization)
rold    join of the post-views of earlier reads
wold    join of the positions of earlier writes (they must have left the store buffer)
dcold   join of the positions of earlier DCs
icold   join of the positions of earlier completed ICs / TLBIs
capc    views of registers earlier branches read (control dependencies)
capa    address views of earlier memory accesses (address dependencies)
dsb     what the last DSB ordered (an ISB extends it to instruction fetch)
fetch   position of the last instruction fetch (fetch is in order and precedes
        every later event of the CPU: Arm's f-ob)
rel     position of the last release store (a later acquire load waits for it)
stold   join of the positions of stores a store-ordering barrier ordered before
        what follows it (a later write's fault waits for them)
hwold   join of the positions of the hardware's page-table updates for this CPU
        (ordered by a DSB only)
====== =====================================================================

States are treated as immutable values once built: a transition copies the CPU it
changes (:meth:`CpuState.copy`).  When an event is inserted in the middle of the
timeline every stored position at or after the insertion point moves by one
(:meth:`CpuState.shifted`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from execmem.emu._timeline import Timeline

VIEW_NAMES = (
    "rnew", "dcnew", "icnew", "fnew", "rold", "wold", "dcold", "icold", "capc", "capa", "dsb", "fetch", "rel",
    "stold", "hwold",
)
VIEW = {name: i for i, name in enumerate(VIEW_NAMES)}
RNEW, DCNEW, ICNEW, FNEW, ROLD, WOLD, DCOLD, ICOLD, CAPC, CAPA, DSB, FETCH, REL, STOLD, HWOLD = range(len(VIEW_NAMES))

RUN, DONE, FAULT, HALT = "run", "done", "fault", "halt"
#: A CPU whose execution is not one the architecture allows (herd discards it).
DISCARD = "discard"


#: Starts the part of a step's detail saying it used superseded data: an instruction
#: whose bytes a newer write has changed, a store through a page-table entry a newer
#: write has replaced.  A counterexample's culprit is its first such step
#: (``_trace.culprit``).
STALE = "stale:"


@dataclass(frozen=True, slots=True)
class Step:
    """What a transition did, for traces and counterexamples."""

    cpu: int
    kind: str  # "exec", "store", "fault", "irq", "host"
    pc: int
    text: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Store:
    """A store waiting in a CPU's store buffer."""

    seq: int
    addr: int  # first granule (physical)
    span: int  # granules
    data: bytes
    mask: int
    #: address and data views (Promising: the store's forwarding view is their join)
    vaddr: int
    vdata: int
    release: bool
    #: must leave the buffer after every store with a smaller ``seq`` than this
    after: int
    va: int  # virtual address, for traces
    pc: int
    #: the hardware's write-back of a page-table entry it walked (HA/HD): atomic with
    #: the walk, so it may leave the buffer only while the write at ``expect`` (the one
    #: the walk read) is still the entry's latest
    hardware: bool = False
    expect: int = -1
    #: the translation it went through: (entry, position of the PTE write used, walk
    #: position), entry 0 for a static mapping (see ``_translate.note_stale``)
    walk: tuple[int, int, int] = (0, 0, 0)

    def shifted(self, at: int) -> Store:
        entry, walked, anchor = self.walk
        return Store(
            self.seq, self.addr, self.span, self.data, self.mask,
            self.vaddr + (self.vaddr >= at), self.vdata + (self.vdata >= at),
            self.release, self.after, self.va, self.pc, self.hardware, self.expect + (self.expect >= at),
            (entry, walked + (walked >= at), anchor + (anchor >= at)),
        )


@dataclass(frozen=True, slots=True)
class Pending:
    """An IC or TLBI issued but not yet completed by a DSB of its CPU."""

    kind: str  # "IC" / "TLBI"
    addr: int  # line or virtual page, or -1 for all lines / all pages
    pre: int
    text: str
    #: TLBI: the only CPU it invalidates (-1: broadcast)
    scope: int = -1

    def shifted(self, at: int) -> Pending:
        return Pending(self.kind, self.addr, self.pre + (self.pre >= at), self.text, self.scope)


def _shift_pairs(pairs: tuple[tuple[int, int], ...], at: int) -> tuple[tuple[int, int], ...]:
    return tuple((k, v + (v >= at)) for k, v in pairs)


def get(pairs: tuple[tuple[int, int], ...], key: int, default: int = 0) -> int:
    for k, v in pairs:
        if k == key:
            return v
    return default


def put(pairs: tuple[tuple[int, int], ...], key: int, value: int) -> tuple[tuple[int, int], ...]:
    """Set ``key`` to ``value`` (pairs stay sorted by key, so equal states compare equal)."""
    out = [(k, v) for k, v in pairs if k != key]
    out.append((key, value))
    out.sort()
    return tuple(out)


def join_into(pairs: tuple[tuple[int, int], ...], key: int, value: int) -> tuple[tuple[int, int], ...]:
    old = get(pairs, key, 0)
    return pairs if old >= value else put(pairs, key, value)


class CpuState:
    """Everything the model knows about one CPU (see the module docstring)."""

    __slots__ = (
        "acks",
        "coh",
        "dcl",
        "faults",
        "fetches",
        "fwd",
        "host",
        "index",
        "irq",
        "monitor",
        "pc",
        "pending",
        "regs",
        "results",
        "retrying",
        "rview",
        "sb",
        "scl",
        "seq",
        "stale",
        "status",
        "store_fence",
        "views",
        "walk_floor",
    )

    def __init__(self, index: int, pc: int, regs: bytes, nregs: int) -> None:
        self.index = index
        self.pc = pc
        self.regs = regs
        self.rview: tuple[int, ...] = (0,) * nregs
        self.views: list[int] = [0] * len(VIEW_NAMES)
        #: per granule: coherence view (the CPU never reads older than this)
        self.coh: tuple[tuple[int, int], ...] = ()
        #: per granule: (position of this CPU's last write, its forwarding view)
        self.fwd: tuple[tuple[int, tuple[int, int]], ...] = ()
        #: per line: po-scl-ob view (DC vs same-line accesses)
        self.scl: tuple[tuple[int, int], ...] = ()
        #: per line: position of this CPU's last DC (later same-line accesses follow it)
        self.dcl: tuple[tuple[int, int], ...] = ()
        self.sb: tuple[Store, ...] = ()
        self.seq = 0
        #: seq of the first store after the last store-ordering barrier
        self.store_fence = 0
        self.pending: tuple[Pending, ...] = ()
        #: fetches that a later DC/IC placed in the past must respect:
        #: (granule, anchor position, position of the write read)
        self.fetches: tuple[tuple[int, int, int], ...] = ()
        self.status = RUN
        #: (pc, kind, address accessed) of every fault taken
        self.faults: tuple[tuple[int, str, int], ...] = ()
        #: executing again an instruction that faulted (``on_fault="handled"``)
        self.retrying = False
        #: the exclusive monitor: (granule, position of the write the load-exclusive read)
        self.monitor: tuple[tuple[int, int], ...] = ()
        #: translations through superseded entries: (entry, position of the PTE write
        #: used, walk position, access position) - where a later-placed TLB
        #: invalidation may not go (``_translate.note_stale``)
        self.stale: tuple[tuple[int, int, int, int], ...] = ()
        #: per (page-table entry, offset in the page): the oldest PTE write this CPU's
        #: translations may still use, after one was ordered after an invalidation
        self.walk_floor: tuple[tuple[int, int], ...] = ()
        #: index of the next host action (CPUs that run a host program)
        self.host = 0
        #: pending interrupts: (kind, view carried by the sender, tag, argument)
        self.irq: tuple[tuple[str, int, int, int], ...] = ()
        #: tags of interrupts this CPU sent and still waits to be acknowledged
        self.acks: tuple[int, ...] = ()
        #: values recorded by host ``record`` actions
        self.results: tuple[int, ...] = ()

    def copy(self) -> CpuState:
        new = CpuState.__new__(CpuState)
        for name in CpuState.__slots__:
            setattr(new, name, getattr(self, name))
        new.views = list(self.views)
        return new

    def shifted(self, at: int) -> CpuState:
        """Positions ``>= at`` move up by one (an event was inserted at ``at``)."""
        new = self.copy()
        new.rview = tuple(v + (v >= at) for v in self.rview)
        new.views = [v + (v >= at) for v in self.views]
        new.coh = _shift_pairs(self.coh, at)
        new.fwd = tuple((g, (p + (p >= at), v + (v >= at))) for g, (p, v) in self.fwd)
        new.scl = _shift_pairs(self.scl, at)
        new.dcl = _shift_pairs(self.dcl, at)
        new.sb = tuple(s.shifted(at) for s in self.sb)
        new.pending = tuple(p.shifted(at) for p in self.pending)
        new.fetches = tuple((g, a + (a >= at), m + (m >= at)) for g, a, m in self.fetches)
        new.monitor = tuple((g, p + (p >= at)) for g, p in self.monitor)
        new.stale = tuple((e, w + (w >= at), a + (a >= at), p + (p >= at)) for e, w, a, p in self.stale)
        new.walk_floor = _shift_pairs(self.walk_floor, at)
        new.irq = tuple((k, v + (v >= at), t, a) for k, v, t, a in self.irq)
        return new

    def key(self) -> tuple[object, ...]:
        return (
            self.pc, self.regs, self.rview, tuple(self.views), self.coh, self.fwd, self.scl, self.dcl,
            tuple(
                (s.addr, s.span, s.data, s.mask, s.vaddr, s.vdata, s.release, s.seq - self.seq, s.after - self.seq,
                 s.hardware, s.expect, s.walk)
                for s in self.sb
            ),
            self.store_fence - self.seq, self.pending, self.fetches, self.status,
            self.faults, self.retrying, self.monitor, self.stale, self.walk_floor, self.host, self.irq, self.acks, self.results,
        )

    def reg(self, index: int) -> int:
        return int.from_bytes(self.regs[8 * index : 8 * index + 8], "little")

    def with_reg(self, index: int, value: int) -> bytes:
        return self.regs[: 8 * index] + (value & (1 << 64) - 1).to_bytes(8, "little") + self.regs[8 * index + 8 :]


class MachineState:
    """The timeline plus every CPU.  Immutable by convention (keys are cached)."""

    __slots__ = ("_key", "cpus", "timeline")

    def __init__(self, timeline: Timeline, cpus: tuple[CpuState, ...]) -> None:
        self.timeline = timeline
        self.cpus = cpus
        self._key: tuple[object, ...] | None = None

    def key(self) -> tuple[object, ...]:
        if self._key is None:
            self._key = (self.timeline.key(), tuple(c.key() for c in self.cpus))
        return self._key


#: One successor of a state: what was done, and the state it leads to.
Transition = tuple[Step, MachineState]
