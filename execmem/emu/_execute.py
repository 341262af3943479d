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
    CpuState,
    MachineState,
    Step,
    Store,
    Transition,
    get,
    join_into,
)
from execmem.emu._timeline import Timeline

if TYPE_CHECKING:
    from execmem.emu._semantics import Model


def read_choices(model: Model, st: MachineState, cpu: CpuState, pa: int, size: int, pre: int) -> list[tuple[bytes, int, list[int]]]:
    """(value, post-view, granules) for every value a read of ``size`` bytes may return."""
    tl: Timeline = st.timeline
    gs = model.granules(pa, size)
    if len(gs) > 2:
        raise ModelError(f"access of {size} bytes at {pa:#x} is not single-copy atomic in the model")
    offset = pa - gs[0]
    own = [s for s in cpu.sb if any(s.addr <= g < s.addr + s.span * model.granule for g in gs)]
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

def execute(model: Model, st: MachineState, c: int, cpu: CpuState, insn: bytes, d: Any) -> Iterator[Transition]:
    ex = model.executor
    pc = cpu.pc
    pci = model.pc_index
    # The state keeps PC in ``cpu.pc`` only (its register slot is zero, so equal
    # states compare equal); Unicorn needs it in the register file.
    regs = cpu.regs[: 8 * pci] + pc.to_bytes(8, "little") + cpu.regs[8 * pci + 8 :]
    atomic = d.op == "atomic"
    memory_op = d.op in ("load", "store") or atomic
    if atomic and cpu.sb:
        return  # locked instructions drain the store buffer first
    probe = ex.run(c, regs, insn, None) if memory_op else None
    v = cpu.views
    vaddr = model.va_view(cpu, d.addr_regs)
    read_pre = max(v[RNEW], v[FETCH], vaddr)
    if model.rules.ordered_reads:
        read_pre = max(read_pre, v[ROLD])
    if atomic:
        read_pre = st.timeline.end  # a locked read-modify-write reads the latest value
    if d.acquire == "A":
        if any(s.release for s in cpu.sb):
            return  # LDAR waits for an earlier STLR to become visible
        read_pre = max(read_pre, v[REL])
    accesses = list(probe.accesses) if probe else []
    per_access: list[list[tuple[int, int, str, tuple[bytes, int, list[int]] | None]]] = []
    for a in accesses:
        options: list[tuple[int, int, str, tuple[bytes, int, list[int]] | None]] = []
        at = None if a.kind == "R" else st.timeline.end
        for pa, walked, fault in model.translate(st, cpu, a.addr, "r" if a.kind == "R" else "w", read_pre, at=at):
            if fault:
                options.append((pa, walked, fault, None))
            elif a.kind == "R":
                line = st.timeline.line_of(pa - pa % model.granule)
                pre = max(read_pre, walked, get(cpu.scl, line))
                options.extend(
                    (pa, walked, "", ch)
                    for ch in read_choices(model, st, cpu, pa, a.size, pre)
                    if model.tlb_usable(st, cpu, a.addr, walked, ch[1])
                )
            else:
                options.append((pa, walked, "", None))
        per_access.append(options)
    for combo in itertools.product(*per_access):
        faults = [(a, f, walked) for a, (_, walked, f, _) in zip(accesses, combo, strict=True) if f]
        new = cpu.copy()
        if faults:
            a, f, walked = faults[0]
            if model.spurious(st, a.addr, "r" if a.kind == "R" else "w", walked):
                yield model.retry(st, c, new, pc, d.text)
            else:
                yield model.fault(st, c, new, pc, "DataAbort", f"{d.text} ({f})")
            continue
        plan = tuple(ch[0] for (_, _, _, ch) in combo if ch is not None)
        out = ex.run(c, regs, insn, plan if memory_op else ())
        if not memory_op and out.accesses:
            raise ModelError(f"{d.text}: unexpected memory access")
        if out.fault:
            yield model.fault(st, c, new, pc, "Exception", f"{d.text} ({out.fault})")
            continue
        new.pc = int.from_bytes(out.regs[8 * pci : 8 * pci + 8], "little")
        new.regs = out.regs[: 8 * pci] + bytes(8) + out.regs[8 * pci + 8 :]
        reads = [(a, pa, walked, ch) for a, (pa, walked, _, ch) in zip(accesses, combo, strict=True) if a.kind == "R"]
        views_after(model, new, d, vaddr, [ch for _, _, _, ch in reads if ch is not None])
        detail = []
        for a, _pa, _walked, ch in reads:
            assert ch is not None
            value, post, gs = ch
            for g in gs:
                new.coh = join_into(new.coh, g, post)
                new.scl = join_into(new.scl, st.timeline.line_of(g), post)
            model.raise_view(new, ROLD, post)
            if d.acquire or model.rules.ordered_reads or atomic:
                model.raise_view(new, RNEW, post)
            detail.append(f"read {a.addr:#x} = {int.from_bytes(value, 'little'):#x}")
        tl = st.timeline
        writes = [(a, pa) for a, (pa, _, _, _) in zip(accesses, combo, strict=True) if a.kind == "W"]
        out_writes = [a for a in out.accesses if a.kind == "W"]
        for (a, pa), done in zip(writes, out_writes, strict=True):
            entry = store_entry(model, new, done.data, pa, a.addr, d, pc)
            if atomic:
                tl = model.commit(tl, new, entry)
                detail.append(f"{a.addr:#x} := {int.from_bytes(done.data, 'little'):#x} (atomic)")
            else:
                new.sb = (*new.sb, entry)
                detail.append(f"{a.addr:#x} := {int.from_bytes(done.data, 'little'):#x} (buffered)")
        if memory_op:
            model.raise_view(new, CAPA, vaddr)
        model.settle(new)
        yield Step(c, "exec", pc, d.text, "; ".join(detail)), model.replace(st, c, new, tl)

def views_after(model: Model, new: CpuState, d: Any, vaddr: int, reads: Sequence[tuple[bytes, int, list[int]]]) -> None:
    if not model.rules.track_dependencies:
        return
    rview = list(new.rview)
    if d.op == "load":
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

def store_entry(model: Model, cpu: CpuState, value: bytes, pa: int, va: int, d: Any, pc: int) -> Store:
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
    return Store(seq, gs[0], len(gs), bytes(data), mask, vaddr, vdata, release, after, va, pc)

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
