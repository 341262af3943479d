"""Host-program steps and interrupt delivery (see ``_kernel`` for the semantics)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from execmem._errors import ModelError
from execmem.emu import _maintenance
from execmem.emu._execute import read_choices, store_entry
from execmem.emu._kernel import pte_value
from execmem.emu._layout import RETURN_MAGIC, page_of
from execmem.emu._state import (
    DCNEW,
    DCOLD,
    FETCH,
    FNEW,
    ICNEW,
    ICOLD,
    RNEW,
    ROLD,
    STALE,
    WOLD,
    CpuState,
    MachineState,
    Step,
    Transition,
    join_into,
)
from execmem.emu._timeline import IC, TLBI, Event
from execmem.emu._translate import superseded, tlb_usable, translate

if TYPE_CHECKING:
    from execmem.emu._semantics import Model


def _sender_view(cpu: CpuState) -> int:
    """What an interrupt carries: everything the sender did before sending it."""
    v = cpu.views
    return max(v[ROLD], v[WOLD], v[DCOLD], v[ICOLD], v[FETCH], v[RNEW])


def is_local(model: Model, cpu: CpuState) -> bool:
    """Does the CPU's next host action touch only its own state?

    Such an action commutes with every step of every other CPU and changes nothing
    they can observe until a later (global) step, so the explorer may take it
    eagerly as the only successor (a one-transition ample set).  Buffering a store
    through a static mapping, a barrier that completes no pending maintenance,
    issuing an IC/TLBI, and calls/records qualify; anything that reads or extends
    the timeline, sends or waits for interrupts, does not.
    """
    actions = model.hosts[cpu.index]
    if cpu.host >= len(actions) or cpu.irq:
        return False
    action = actions[cpu.host]
    kind, args = action.kind, action.args
    if kind == "store":
        va = args[0]
        assert isinstance(va, int)
        return page_of(va) in model.config.static_map
    if kind in ("pte", "record"):
        return True
    if kind == "ic" or (kind == "tlbi" and (len(args) < 2 or args[1] != "local")):
        return True
    if kind == "fence":
        rule = model.rules.fences[str(args[0])]
        return not (rule.drain and cpu.sb) and not (rule.complete and cpu.pending)
    if kind == "call":
        _, pushes = model.isa.prepare_call(cpu.regs, 0, args[1], 0)
        return all(page_of(va) in model.config.static_map for va, _ in pushes)
    return False


def host_step(model: Model, st: MachineState, c: int) -> Iterator[Transition]:
    """Perform the next host action of CPU ``c`` (``cpu.pc == HOST``)."""
    cpu = st.cpus[c]
    actions = model.hosts[c]
    if cpu.host >= len(actions):
        return  # only waiting for acknowledgements
    action = actions[cpu.host]
    new = cpu.copy()
    new.host += 1
    kind, args = action.kind, action.args
    text = action.note or f"{kind} {', '.join(_fmt(a) for a in args)}"
    if kind == "store":
        va, data, release = args
        assert isinstance(va, int) and isinstance(data, bytes)
        for walk in translate(model, st, new, va, "w", new.views[RNEW], at=st.timeline.end):
            one = new.copy()
            if walk.fault or walk.update is not None:
                yield model.fault(st, c, one, 0, f"D-MMU:{walk.fault or 'AccessFlag'}", f"{text} ({walk.fault})", va)
                continue
            entry = store_entry(model, one, data, walk.pa, va, _Plain(bool(release)), 0)
            one.sb = (*one.sb, entry)
            model.settle(one)
            stale = superseded(model, st.timeline, walk.entry, walk.walked)
            detail = f"buffered; {STALE} through a superseded translation" if stale else "buffered"
            yield Step(c, "host", 0, text, detail), model.replace(st, c, one)
        return
    if kind == "pte":
        vpage, ppage, perms = args
        assert isinstance(vpage, int)
        pte = model.config.pte_addr.get(vpage)
        if pte is None:
            raise ModelError(f"page {vpage:#x} has no page-table entry in this machine")
        value = pte_value(model.rules.descriptor, ppage if isinstance(ppage, int) else None, str(perms))
        entry = store_entry(model, new, value.to_bytes(8, "little"), pte, pte, _Plain(False), 0)
        new.sb = (*new.sb, entry)
        model.settle(new)
        yield Step(c, "host", 0, text, "page-table store buffered"), model.replace(st, c, new)
        return
    if kind == "dc":
        (va,) = args
        assert isinstance(va, int)
        yield from _maintenance.clean(model, st, c, new, va, 0, text, 0)
        return
    if kind in ("ic", "tlbi"):
        va = args[0]
        scope = str(args[1]) if len(args) > 1 else "broadcast"
        if kind == "tlbi" and scope == "local":
            yield _local_tlbi(model, st, c, new, va if isinstance(va, int) else None, text)
            return
        yield _maintenance.issue(model, st, c, new, IC if kind == "ic" else TLBI, va if isinstance(va, int) else None, 0, scope, text, 0)
        return
    if kind == "fence":
        (name,) = args
        yield from model.fence(st, c, new, str(name), text, 0, 0)
        return
    if kind == "ipi":
        targets, what, arg = args
        if new.sb:
            return  # the kernel orders its earlier stores before sending (smp_mb / DSB)
        view = _sender_view(new)
        cpus = list(st.cpus)
        tags = []
        for t in targets:  # type: ignore[attr-defined]
            new.seq += 1
            tag = (c << 24) | new.seq
            tags.append(tag)
            target = cpus[t].copy() if t != c else new
            target.irq = (*target.irq, (str(what), view, tag, int(arg) if isinstance(arg, int) else -1))
            cpus[t] = target
        new.acks = (*new.acks, *tags)
        cpus[c] = new
        model.settle(new)
        yield Step(c, "host", 0, text, f"to CPUs {','.join(map(str, targets))}"), MachineState(st.timeline, tuple(cpus))  # type: ignore[call-overload]
        return
    if kind == "await":
        # A kernel thread polling a flag with acquire semantics (smp_cond_load_acquire).
        va, expected = args
        assert isinstance(va, int) and isinstance(expected, int)
        for walk in translate(model, st, new, va, "r", new.views[RNEW]):
            if walk.fault or walk.update is not None:
                raise ModelError(f"await: {va:#x} is not readable ({walk.fault})")
            for data, post, gs in read_choices(model, st, new, walk.pa, 8, max(new.views[RNEW], walk.walked)):
                if int.from_bytes(data, "little") != expected or not tlb_usable(model, st, new, va, walk.walked, post):
                    continue  # keeps polling: not a transition
                one = new.copy()
                for g in gs:
                    one.coh = join_into(one.coh, g, post)
                model.raise_view(one, ROLD, post)
                for index in (RNEW, DCNEW, ICNEW):
                    model.raise_view(one, index, post)
                model.settle(one)
                yield Step(c, "host", 0, text, f"read {expected:#x} (acquire)"), model.replace(st, c, one)
        return
    if kind == "wait":
        if new.acks:
            return
        model.settle(new)
        yield Step(c, "host", 0, text), model.replace(st, c, new)
        return
    if kind == "call":
        target, call_args = args
        assert isinstance(target, int) and isinstance(call_args, tuple)
        regs, pushes = model.isa.prepare_call(new.regs, target, call_args, RETURN_MAGIC)
        new.regs = regs
        for va, data in pushes:
            for walk in translate(model, st, new, va, "w", 0, at=st.timeline.end):
                if walk.fault:
                    raise ModelError(f"call: stack at {va:#x} is not mapped writable")
                new.sb = (*new.sb, store_entry(model, new, data, walk.pa, va, _Plain(False), 0))
                break
        new.pc = target
        model.settle(new)
        yield Step(c, "host", 0, text, f"enter {target:#x}"), model.replace(st, c, new)
        return
    if kind == "record":
        (reg,) = args
        new.results = (*new.results, new.reg(int(reg)))  # type: ignore[call-overload]
        model.settle(new)
        yield Step(c, "host", 0, text, f"= {new.results[-1]:#x}"), model.replace(st, c, new)
        return
    raise ModelError(f"unknown host action {kind!r}")


def _local_tlbi(model: Model, st: MachineState, c: int, cpu: CpuState, vpage: int | None, text: str) -> Transition:
    """A TLB invalidation of this CPU's own TLB, complete at once (x86 INVLPG)."""
    addr = -1 if vpage is None else page_of(vpage)
    tl = st.timeline.append(Event(TLBI, c, addr, page=c, note="local"))
    for index in (ICOLD, RNEW, DCNEW, ICNEW, FNEW):
        model.raise_view(cpu, index, tl.end)
    model.settle(cpu)
    return Step(c, "host", 0, text, f"@{tl.end}"), model.replace(st, c, cpu, tl)


def deliveries(model: Model, st: MachineState, t: int) -> Iterator[Transition]:
    """CPU ``t`` takes its oldest pending interrupt (between two instructions, or idle)."""
    target = st.cpus[t]
    kind, view, tag, arg = target.irq[0]
    rule = model.rules.fences["exception"]
    if rule.drain and target.sb:
        return  # x86: interrupt delivery is serializing; the store buffer drains first
    new = target.copy()
    new.irq = target.irq[1:]
    # Exception entry and return are context-synchronizing; the handler runs after
    # the sender's earlier events, so everything later on this CPU is too.
    for name, sources in rule.joins:
        model.join(new, name, sources)
    for index in (RNEW, DCNEW, ICNEW, FNEW):
        model.raise_view(new, index, view)
    tl = st.timeline
    detail = ""
    cpus = list(st.cpus)
    if kind == "tlb":
        # The handler invalidates this CPU's TLB; everything after it (the interrupt
        # return, the retried instruction) comes after that invalidation.
        tl = tl.append(Event(TLBI, t, arg, page=t, note="ipi"))
        for index in (ICOLD, RNEW, DCNEW, ICNEW, FNEW):
            model.raise_view(new, index, tl.end)
        detail = f"local TLB invalidation @{tl.end}"
    elif kind == "dsb":
        # The handler executes a DSB: it completes this CPU's pending TLBIs/ICs.
        if new.sb:
            return
        completing = model.isa.STEP_FENCES["complete_tlbi"][0]
        here = MachineState(tl, (*cpus[:t], new, *cpus[t + 1 :]))
        completions = list(model.fence(here, t, new, completing, f"{completing} (IPI handler)", new.pc, new.pc))
        if not completions:
            return
        for step, nst in completions:
            yield from _finish_delivery(model, nst, t, tag, kind, f"handler ran DSB: {step.detail}")
        return
    cpus[t] = new
    yield from _finish_delivery(model, MachineState(tl, tuple(cpus)), t, tag, kind, detail)


def _finish_delivery(model: Model, st: MachineState, t: int, tag: int, kind: str, detail: str) -> Iterator[Transition]:
    cpus = list(st.cpus)
    sender = tag >> 24
    if tag in cpus[sender].acks:
        s = cpus[sender].copy()
        s.acks = tuple(a for a in s.acks if a != tag)
        model.settle(s)
        cpus[sender] = s
    yield Step(t, "irq", cpus[t].pc, f"IPI ({kind}) from CPU{sender}", detail), MachineState(st.timeline, tuple(cpus))


class _Plain:
    """Decoded-instruction stand-in for host stores (no register dependencies)."""

    data_regs: tuple[int, ...] = ()
    addr_regs: tuple[int, ...] = ()

    def __init__(self, release: bool) -> None:
        self.release = release


def _fmt(value: object) -> str:
    if isinstance(value, int):
        return f"{value:#x}"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)
