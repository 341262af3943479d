"""Cache and TLB maintenance on the timeline: DC, IC and TLBI.

A DC may be placed in the past, not before the views that order it; an IC or TLBI is
issued by its CPU and placed when a DSB of that CPU completes it (for that CPU only
when the DSB is non-shareable).  A placement must not contradict what already
happened: an IC may not go where it would have removed a value a fetch returned
(``_consistent``), a TLBI not where it would have removed an entry a translation
used (``_translate.invalidation_allowed``), nor before stores still buffered with
the entry it removes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from execmem.emu._layout import page_of
from execmem.emu._state import (
    CAPC,
    DCNEW,
    DCOLD,
    FETCH,
    ICNEW,
    CpuState,
    MachineState,
    Pending,
    Step,
    Transition,
    get,
    join_into,
)
from execmem.emu._timeline import ALL_LINES, DC, IC, TLBI, Event, Timeline
from execmem.emu._translate import invalidation_allowed, translate

if TYPE_CHECKING:
    from execmem.emu._semantics import Model


def line_of_va(model: Model, st: MachineState, cpu: CpuState, va: int, pre: int) -> list[tuple[int, int]]:
    """(line, walk position) for each translation of ``va`` (cache maintenance by VA)."""
    out = []
    for walk in translate(model, st, cpu, va, "r", pre):
        if not walk.fault:
            out.append((st.timeline.line_of(walk.pa - walk.pa % model.granule), walk.walked))
    return out

def clean(model: Model, st: MachineState, c: int, cpu: CpuState, va: int, vaddr: int, text: str, pc: int) -> Iterator[Transition]:
    """DC CVAU: may be placed in the past, not before the views that order it."""
    v = cpu.views
    pre0 = max(v[DCNEW], v[CAPC], v[FETCH], vaddr)
    for line, walked in line_of_va(model, st, cpu, va, pre0):
        # po-scl-ob: earlier same-line stores must be visible before the clean.
        if any(st.timeline.line_of(s.addr) == line for s in cpu.sb):
            continue
        pre = max(pre0, walked, get(cpu.scl, line))
        for tl, cpus, pos in place(model, st, c, cpu, DC, line, pre):
            new = cpus[c]
            model.raise_view(new, DCOLD, pos)
            new.scl = join_into(new.scl, line, pos)
            new.dcl = join_into(new.dcl, line, pos)
            model.settle(new)
            yield Step(c, "exec", pc, text, f"clean @{pos}"), MachineState(tl, cpus)

def issue(model: Model, st: MachineState, c: int, cpu: CpuState, kind: str, va: int | None, vaddr: int, scope: str, text: str, pc: int) -> Transition:
    """IC / TLBI: issued now, placed on the timeline when the CPU's DSB completes it."""
    v = cpu.views
    pre = max(v[ICNEW], v[CAPC], v[FETCH], vaddr)
    if va is None:
        addr = ALL_LINES
    elif kind == IC:
        lines = line_of_va(model, st, cpu, va, pre)
        if not lines:
            return model.fault(st, c, cpu, pc, "D-MMU:Translation", text, va)
        addr = lines[0][0]
    else:
        addr = page_of(va)
    target = -1 if scope == "broadcast" else c
    cpu.pending = (*cpu.pending, Pending(kind, addr, pre, text, target))
    model.settle(cpu)
    return Step(c, "exec", pc, text, "issued"), model.replace(st, c, cpu)

def complete(
    model: Model, st: MachineState, c: int, cpu: CpuState, *, local: bool = False
) -> Iterator[tuple[Timeline, tuple[CpuState, ...], list[int]]]:
    """Place every pending IC/TLBI of ``cpu`` (its DSB completes them), in program order.

    A ``local`` (non-shareable) DSB completes them for this CPU only: a broadcast
    one is placed for this CPU and stays pending for the others, until a DSB of a
    domain that includes them (Arm ARM D7.5.9.3 and D8.13.5: the DSB's
    shareability domain must contain the PEs the maintenance must reach).
    """
    pending = cpu.pending
    cpu.pending = tuple(p for p in pending if local and p.scope == -1)
    states: list[tuple[MachineState, list[int]]] = [(model.replace(st, c, cpu), [])]
    for p in pending:
        if local:
            p = Pending(p.kind, p.addr, p.pre, p.text, c)
        nxt: list[tuple[MachineState, list[int]]] = []
        for cur, placed in states:
            pre = p.pre
            for at in placed:
                if pre >= at:
                    pre += 1
            for tl, cpus, pos in place(model, cur, c, cur.cpus[c], p.kind, p.addr, pre, scope=p.scope):
                nxt.append((MachineState(tl, cpus), [*[q + (q >= pos) for q in placed], pos]))
        states = nxt
    for s, placed in states:
        yield s.timeline, s.cpus, placed

def place(model: Model, st: MachineState, c: int, cpu: CpuState, kind: str, addr: int, pre: int, *, scope: int = -1) -> Iterator[tuple[Timeline, tuple[CpuState, ...], int]]:
    """Insert a DC/IC/TLBI at every distinct position >= ``pre`` that no fetch contradicts."""
    tl: Timeline = st.timeline
    cpus = list(st.cpus)
    cpus[c] = cpu
    every = addr == ALL_LINES
    relevant: set[int] = set()
    reached = cpus if scope == -1 else [cpus[scope]]
    if kind == TLBI and any(every or page_of(s.va) == addr for x in reached for s in x.sb):
        # A completed TLB invalidation guarantees that accesses translated through
        # the old entry are complete (Arm ARM D8.13; ESOP 2022 TLBI-ob): stores
        # still buffered with the old translation must become visible first.
        return
    if kind == TLBI:
        ptes = [g for page, g in model.config.pte_addr.items() if every or page == addr]
        for g in ptes:
            relevant.update(tl.write_positions(g))
        relevant.update(p for ps in tl.tlbis.values() for p in ps)
        # Just after a stale translation: the earliest place that leaves it alone.
        relevant.update(bound for x in cpus for _, _, a, p in x.stale for bound in (a, p))
    else:
        for g, ws in tl.writes.items():
            if every or tl.line_of(g) == addr:
                relevant.update(ws)
        for line, ps in tl.maint.items():
            if every or line in (addr, ALL_LINES):
                relevant.update(ps)
        for other in cpus:
            for g, anchor, _ in other.fetches:
                if every or tl.line_of(g) == addr:
                    relevant.add(anchor)
    for k in sorted({pre, *(p for p in relevant if p > pre)}):
        at = k + 1
        if kind == TLBI and not invalidation_allowed(model, tl, cpus, c, scope, addr, k):
            continue
        new_tl = tl.insert_after(k, Event(kind, c, addr, page=scope))
        new_cpus = tuple(x.shifted(at) for x in cpus)
        if kind == TLBI or _consistent(model, new_tl, new_cpus, addr):
            yield new_tl, new_cpus, at

def _consistent(model: Model, tl: Timeline, cpus: Sequence[CpuState], line: int) -> bool:
    if model.coherent_fetch:
        return True
    every = line == ALL_LINES
    for cpu in cpus:
        for g, anchor, msg in cpu.fetches:
            if (every or tl.line_of(g) == line) and msg < tl.floor_before(g, anchor, cpu.index, idc=model.idc):
                return False
    return True
