"""Instructions Unicorn executes for the model: loads and stores with the values the
memory model allows, and the dependency views they carry.

``read_choices`` is the read rule (Promising-ARM without promises, with forwarding
from the CPU's own store buffer); ``execute`` runs one instruction for every
combination of allowed load values; ``views_after`` propagates address, data and
control dependencies through registers; ``store_entry`` builds a store-buffer entry.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from execmem._errors import ModelError
from execmem.emu._state import (
    CAPA,
    CAPC,
    FETCH,
    REL,
    RNEW,
    ROLD,
    STOLD,
    CpuState,
    MachineState,
    Step,
    Store,
    Transition,
    get,
    join_into,
)
from execmem.emu._timeline import Timeline
from execmem.emu._translate import (
    Walk,
    buffer_update,
    note,
    note_order,
    tlb_usable,
    translate,
    update_pending,
)

if TYPE_CHECKING:
    from execmem.emu._semantics import Model


def read_choices(model: Model, st: MachineState, cpu: CpuState, pa: int, size: int, pre: int) -> list[tuple[bytes, int, list[int]]]:
    """(value, post-view, granules) for every value a read of ``size`` bytes may return."""
    tl: Timeline = st.timeline
    gs = model.granules(pa, size)
    if len(gs) > 2:
        raise ModelError(f"access of {size} bytes at {pa:#x} is not single-copy atomic in the model")
    offset = pa - gs[0]
    # (the hardware's flag updates are not forwarded to explicit reads: not explicit)
    own = [s for s in cpu.sb if not s.hardware and any(s.addr <= g < s.addr + s.span * model.granule for g in gs)]
    bound = {g: max(pre, get(cpu.coh, g)) for g in gs}
    base = max(tl.latest_write_at(g, bound[g]) for g in gs)
    sigmas = sorted({base, *(p for g in gs for p in tl.write_positions(g) if p > base)})
    fwd = dict(cpu.fwd)
    covered = bool(own) and _covers(own, pa, size, model.granule)
    own_view = max((max(s.vaddr, s.vdata) for s in own), default=0)
    out: list[tuple[bytes, int, list[int]]] = []
    seen: set[tuple[bytes, int]] = set()
    for sigma in sigmas:
        whole = b"".join(tl.value_at(g, sigma) for g in gs)
        read_pos = [tl.latest_write_at(g, sigma) for g in gs]
        own_fwd = [fwd.get(g) for g in gs]
        if all(f is not None and f[0] == rp for f, rp in zip(own_fwd, read_pos, strict=True)):
            post = max(pre, *(f[1] for f in own_fwd if f is not None))
        else:
            post = max(pre, *read_pos)
        if own:
            whole = overlay(whole, gs[0], own, model.granule)
            post = max(pre, own_view) if covered else max(post, own_view)
        value = whole[offset : offset + size]
        if (value, post) not in seen:
            seen.add((value, post))
            out.append((value, post, gs))
        if covered:
            break  # fully forwarded from the store buffer: memory is irrelevant
    return out

def _lower_bounds(model: Model, cpu: CpuState, d: Any, vaddr: int) -> tuple[int, int, int]:
    """(read lower bound, walk lower bound, write-fault lower bound) of a memory instruction."""
    v = cpu.views
    read_pre = max(v[RNEW], v[FETCH], vaddr)
    if model.rules.ordered_reads:
        read_pre = max(read_pre, v[ROLD])
    if d.acquire == "A":
        read_pre = max(read_pre, v[REL])
    # Barriers do not order translation-table walks on Arm (herd's DSB-ob and bob leave
    # translation reads out): only the fetch (so a context-synchronization event) and
    # address dependencies do.
    walk_pre = read_pre if model.rules.barriers_order_walks else max(v[FETCH], vaddr)
    return read_pre, walk_pre, max(v[RNEW], v[FETCH], vaddr, v[STOLD])


def _write_fault_blocked(cpu: CpuState) -> bool:
    """A write's fault is ordered after stores a DMB ST ordered before it (herd's bob:
    [W]; po; [dmb.st]; po; [MMU & FAULT]): it waits until they are visible, and is
    placed after them (``STOLD``)."""
    return any(s.seq < cpu.store_fence and not s.hardware for s in cpu.sb)


def _buffered(model: Model, cpu: CpuState, granules: Sequence[int]) -> bool:
    """Has the CPU a store to one of ``granules`` still in its buffer?"""
    return any(s.addr <= g < s.addr + s.span * model.granule for s in cpu.sb for g in granules)


def _fault(
    model: Model, st: MachineState, c: int, cpu: CpuState, pc: int, d: Any, va: int, walk: Walk, access: str,
    walk_pre: int, at: int,
) -> list[Transition]:
    """The fault ``walk`` takes, placed at ``at``."""
    note(model, st, cpu, va, walk, walk_pre, at)
    kind = f"D-MMU:{walk.fault}"
    return model.fault_or_retry(st, c, cpu, pc, kind, f"{d.text} ({walk.fault})", va, walk.walked, access)


def execute(model: Model, st: MachineState, c: int, cpu: CpuState, insn: bytes, d: Any) -> Iterator[Transition]:
    """Loads and stores: every combination of allowed translations and load values."""
    if d.op in ("atomic", "rmw"):
        yield from _rmw(model, st, c, cpu, insn, d)
        return
    if d.op == "store_exclusive":
        yield from _store_exclusive(model, st, c, cpu, d)
        return
    ex = model.executor
    pc = cpu.pc
    pci = model.pc_index
    # The state keeps PC in ``cpu.pc`` only (its register slot is zero, so equal
    # states compare equal); Unicorn needs it in the register file.
    regs = cpu.regs[: 8 * pci] + pc.to_bytes(8, "little") + cpu.regs[8 * pci + 8 :]
    memory_op = d.op in ("load", "store")
    if d.acquire == "A" and any(s.release for s in cpu.sb):
        return  # LDAR waits for an earlier STLR to become visible
    probe = ex.run(c, regs, insn, None) if memory_op else None
    vaddr = model.va_view(cpu, d.addr_regs)
    read_pre, walk_pre, write_pre = _lower_bounds(model, cpu, d, vaddr)
    accesses = list(probe.accesses) if probe else []
    per_access: list[list[tuple[Walk, tuple[bytes, int, list[int]] | None]]] = []
    for a in accesses:
        options: list[tuple[Walk, tuple[bytes, int, list[int]] | None]] = []
        access = "r" if a.kind == "R" else "w"
        at = None if a.kind == "R" else st.timeline.end
        for walk in translate(model, st, cpu, a.addr, access, walk_pre, at=at):
            if walk.fault:
                if access == "w" and _write_fault_blocked(cpu):
                    continue
                if tlb_usable(model, st, cpu, a.addr, walk.walked, read_pre if access == "r" else write_pre):
                    options.append((walk, None))
            elif a.kind == "R":
                line = st.timeline.line_of(walk.pa - walk.pa % model.granule)
                pre = max(read_pre, walk.walked, get(cpu.dcl, line))
                options.extend(
                    (walk, ch)
                    for ch in read_choices(model, st, cpu, walk.pa, a.size, pre)
                    if tlb_usable(model, st, cpu, a.addr, walk.walked, ch[1])
                )
            else:
                options.append((walk, None))
        per_access.append(options)
    for combo in itertools.product(*per_access):
        new = cpu.copy()
        faulting = [(a, walk) for a, (walk, _) in zip(accesses, combo, strict=True) if walk.fault]
        if faulting:
            a, walk = faulting[0]
            access = "r" if a.kind == "R" else "w"
            yield from _fault(
                model, st, c, new, pc, d, a.addr, walk, access, walk_pre, read_pre if access == "r" else write_pre
            )
            continue
        plan = tuple(ch[0] for _, ch in combo if ch is not None)
        out = ex.run(c, regs, insn, plan if memory_op else ())
        if not memory_op and out.accesses:
            raise ModelError(f"{d.text}: unexpected memory access")
        if out.fault:
            yield model.fault(st, c, new, pc, "Exception", f"{d.text} ({out.fault})", pc)
            continue
        new.pc = int.from_bytes(out.regs[8 * pci : 8 * pci + 8], "little")
        new.regs = out.regs[: 8 * pci] + bytes(8) + out.regs[8 * pci + 8 :]
        reads = [(a, walk, ch) for a, (walk, ch) in zip(accesses, combo, strict=True) if a.kind == "R"]
        views_after(model, new, d, vaddr, [ch for _, _, ch in reads if ch is not None])
        detail = []
        tl = st.timeline
        for _, (walk, _) in zip(accesses, combo, strict=True):
            buffer_update(model, new, walk, pc)
        for a, walk, ch in reads:
            assert ch is not None
            value, post, gs = ch
            _observe_read(model, st, new, d, post, gs)
            note(model, st, new, a.addr, walk, walk_pre, post)
            if d.exclusive:
                new.monitor = () if _buffered(model, new, gs) else tuple((g, tl.latest_write_at(g, post)) for g in gs)
            detail.append(f"read {a.addr:#x} = {int.from_bytes(value, 'little'):#x}")
        writes = [(a, walk) for a, (walk, _) in zip(accesses, combo, strict=True) if a.kind == "W"]
        out_writes = [a for a in out.accesses if a.kind == "W"]
        for (a, walk), done in zip(writes, out_writes, strict=True):
            through = (walk.entry, walk.walked, max(walk_pre, walk.walked))
            note_order(model, st, new, a.addr, walk)
            new.sb = (*new.sb, store_entry(model, new, done.data, walk.pa, a.addr, d, pc, through))
            detail.append(f"{a.addr:#x} := {int.from_bytes(done.data, 'little'):#x} (buffered)")
        if memory_op:
            model.raise_view(new, CAPA, vaddr)
        model.settle(new)
        yield Step(c, "exec", pc, d.text, "; ".join(detail)), model.replace(st, c, new, tl)


def _observe_read(model: Model, st: MachineState, cpu: CpuState, d: Any, post: int, gs: Sequence[int]) -> None:
    """The views a read with post-view ``post`` of granules ``gs`` raises."""
    for g in gs:
        cpu.coh = join_into(cpu.coh, g, post)
        cpu.scl = join_into(cpu.scl, st.timeline.line_of(g), post)
    model.raise_view(cpu, ROLD, post)
    if d.acquire or model.rules.ordered_reads or d.op in ("atomic", "rmw"):
        model.raise_view(cpu, RNEW, post)


def _rmw(model: Model, st: MachineState, c: int, cpu: CpuState, insn: bytes, d: Any) -> Iterator[Transition]:
    """A single-copy-atomic read-modify-write (Arm LSE atomics, x86 locked instructions).

    The write is coherence-immediately after the write the read returns (herd's
    ``atomic`` axiom), so the read returns the location's latest write and the write
    is appended to the timeline at once.  The read may still be ordered early with
    respect to other locations: its post-view is that latest write, not the present.
    x86 locked instructions are also full barriers (the store buffer drains first);
    an Arm release form waits for the earlier stores.  A failed compare-and-swap
    writes nothing.
    """
    ex = model.executor
    pc = cpu.pc
    pci = model.pc_index
    if cpu.sb and (d.op == "atomic" or d.release):
        return
    if d.acquire == "A" and any(s.release for s in cpu.sb):
        return
    regs = cpu.regs[: 8 * pci] + pc.to_bytes(8, "little") + cpu.regs[8 * pci + 8 :]
    probe = ex.run(c, regs, insn, None)
    reads = [a for a in probe.accesses if a.kind == "R"]
    if len(reads) != 1 or any(a.addr != reads[0].addr for a in probe.accesses):
        raise ModelError(f"{d.text}: an atomic access the model does not know")
    (r,) = reads
    vaddr = model.va_view(cpu, d.addr_regs)
    read_pre, walk_pre, write_pre = _lower_bounds(model, cpu, d, vaddr)
    tl0 = st.timeline
    for walk in translate(model, st, cpu, r.addr, "w", walk_pre, at=tl0.end):
        new = cpu.copy()
        if walk.fault:
            if tlb_usable(model, st, cpu, r.addr, walk.walked, max(read_pre, write_pre)) and not _write_fault_blocked(cpu):
                yield from _fault(model, st, c, new, pc, d, r.addr, walk, "w", walk_pre, max(read_pre, write_pre))
            continue
        gs = model.granules(walk.pa, r.size)
        if len(gs) > 2:
            raise ModelError(f"access of {r.size} bytes at {walk.pa:#x} is not single-copy atomic in the model")
        if _buffered(model, cpu, gs) or update_pending(st, c, gs):
            continue  # the CPU's own earlier store to the location, or a hardware update, comes first
        whole = b"".join(tl0.value_at(g, tl0.end) for g in gs)
        offset = walk.pa - gs[0]
        value = whole[offset : offset + r.size]
        post = max(read_pre, walk.walked, *(tl0.latest_write_at(g, tl0.end) for g in gs))
        out = ex.run(c, regs, insn, (value,))
        if out.fault:
            yield model.fault(st, c, new, pc, "Exception", f"{d.text} ({out.fault})", pc)
            continue
        new.pc = int.from_bytes(out.regs[8 * pci : 8 * pci + 8], "little")
        new.regs = out.regs[: 8 * pci] + bytes(8) + out.regs[8 * pci + 8 :]
        views_after(model, new, d, vaddr, [(value, post, gs)])
        _observe_read(model, st, new, d, post, gs)
        tl = tl0
        buffer_update(model, new, walk, pc)
        detail = [f"read {r.addr:#x} = {int.from_bytes(value, 'little'):#x}"]
        written = [a for a in out.accesses if a.kind == "W"]
        mask = (1 << 8 * r.size) - 1
        failed = d.compare_reg is not None and int.from_bytes(value, "little") != cpu.reg(d.compare_reg) & mask
        if written and not failed:
            entry = store_entry(model, new, written[0].data, walk.pa, r.addr, d, pc)
            tl = model.commit(tl, new, entry)
            detail.append(f"{r.addr:#x} := {int.from_bytes(written[0].data, 'little'):#x} (atomic)")
        if d.fence:
            # A barrier after the write as well (x86 locked instructions, SDM Vol. 3
            # 9.2.3.8: not reordered with later loads): later accesses follow it, so
            # store buffering with another CPU's fence (SB+mfences) stays forbidden.
            for target, sources in model.rules.fences[d.fence].joins:
                model.join(new, target, sources)
        note(model, MachineState(tl, st.cpus), new, r.addr, walk, walk_pre, tl.end)
        model.raise_view(new, CAPA, vaddr)
        model.settle(new)
        yield Step(c, "exec", pc, d.text, "; ".join(detail)), model.replace(st, c, new, tl)


def _store_exclusive(model: Model, st: MachineState, c: int, cpu: CpuState, d: Any) -> Iterator[Transition]:
    """STXR: the write succeeds (status 0) only when no write came between the one its
    load-exclusive read and it (Arm ARM B2.9: the exclusive monitor; herd's ``atomic``
    axiom), and only to the location that load read; it may always fail (status 1)."""
    pc = cpu.pc
    if d.release and cpu.sb:
        return
    va = cpu.reg(d.addr_regs[0])
    data = (cpu.reg(d.data_regs[0]) & (1 << 8 * d.size) - 1).to_bytes(d.size, "little")
    vaddr = model.va_view(cpu, d.addr_regs)
    _, walk_pre, write_pre = _lower_bounds(model, cpu, d, vaddr)
    tl0 = st.timeline

    def finish(new: CpuState, status: int, tl: Timeline, detail: str) -> Transition:
        new.monitor = ()
        new.regs = new.with_reg(d.status_reg, status)
        rview = list(new.rview)
        rview[d.status_reg] = max(vaddr, model.va_view(cpu, d.data_regs))
        new.rview = tuple(rview)
        new.pc = pc + d.length
        model.raise_view(new, CAPA, vaddr)
        model.settle(new)
        return Step(c, "exec", pc, d.text, detail), model.replace(st, c, new, tl)

    yield finish(cpu.copy(), 1, tl0, "exclusive store fails")
    if not cpu.monitor:
        return
    for walk in translate(model, st, cpu, va, "w", walk_pre, at=tl0.end):
        new = cpu.copy()
        if walk.fault:
            if tlb_usable(model, st, cpu, va, walk.walked, write_pre) and not _write_fault_blocked(cpu):
                yield from _fault(model, st, c, new, pc, d, va, walk, "w", walk_pre, write_pre)
            continue
        gs = model.granules(walk.pa, d.size)
        monitored = dict(cpu.monitor)
        if any(monitored.get(g) != tl0.latest_write_at(g, tl0.end) for g in gs):
            continue  # another write came in between, or another location
        if _buffered(model, cpu, gs) or update_pending(st, c, gs):
            continue
        buffer_update(model, new, walk, pc)
        tl = model.commit(tl0, new, store_entry(model, new, data, walk.pa, va, d, pc))
        note(model, MachineState(tl, st.cpus), new, va, walk, walk_pre, tl.end)
        yield finish(new, 0, tl, f"{va:#x} := {int.from_bytes(data, 'little'):#x} (exclusive)")


def views_after(model: Model, new: CpuState, d: Any, vaddr: int, reads: Sequence[tuple[bytes, int, list[int]]]) -> None:
    if not model.rules.track_dependencies:
        return
    rview = list(new.rview)
    if d.op in ("load", "rmw", "atomic"):
        posts = [post for _, post, _ in reads] or [0]
        dests = [r for r in d.writes if r not in d.addr_regs]
        for i, r in enumerate(dests):
            rview[r] = posts[min(i, len(posts) - 1)]
        for r in d.writes:
            if r in d.addr_regs:
                rview[r] = vaddr
    elif d.op == "store":
        for r in d.writes:
            rview[r] = vaddr
    elif d.op == "branch":
        model.raise_view(new, CAPC, max((new.rview[r] for r in d.cond_regs), default=0))
        for r in d.writes:
            rview[r] = 0
    else:
        out = max((new.rview[r] for r in d.reads), default=0)
        for r in d.writes:
            rview[r] = out
    new.rview = tuple(rview)

def store_entry(
    model: Model, cpu: CpuState, value: bytes, pa: int, va: int, d: Any, pc: int, walk: tuple[int, int, int] = (0, 0, 0)
) -> Store:
    gs = model.granules(pa, len(value))
    if len(gs) > 2:
        raise ModelError(f"store of {len(value)} bytes at {va:#x} is not modelled")
    offset = pa - gs[0]
    data = bytearray(len(gs) * model.granule)
    data[offset : offset + len(value)] = value
    full = offset == 0 and len(value) == len(gs) * model.granule
    mask = -1 if full else ((1 << len(value)) - 1) << offset
    seq = cpu.seq
    cpu.seq += 1
    release = bool(getattr(d, "release", False))
    after = seq if release or model.rules.fifo_stores else cpu.store_fence
    vdata = model.va_view(cpu, getattr(d, "data_regs", ()))
    vaddr = model.va_view(cpu, getattr(d, "addr_regs", ()))
    return Store(seq, gs[0], len(gs), bytes(data), mask, vaddr, vdata, release, after, va, pc, walk=walk)

def overlay(value: bytes, first: int, stores: Sequence[Store], granule: int) -> bytes:
    """``value`` (granules from ``first``) overwritten by buffered stores, oldest first."""
    out = bytearray(value)
    end = first + len(value)
    for s in stores:
        for b in range(s.span * granule):
            addr = s.addr + b
            if first <= addr < end and (s.mask == -1 or s.mask >> b & 1):
                out[addr - first] = s.data[b]
    return bytes(out)


def _covers(stores: Sequence[Store], addr: int, size: int, granule: int) -> bool:
    covered = set()
    for s in stores:
        for b in range(s.span * granule):
            if s.mask == -1 or s.mask >> b & 1:
                covered.add(s.addr + b)
    return all(addr + i in covered for i in range(size))
