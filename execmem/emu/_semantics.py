"""Transition rules of the modeled machine.

A machine state has successors of three kinds:

* **instruction steps** - a CPU fetches the instruction at its PC (choosing among the
  values its instruction cache may return), then either performs it itself (barriers,
  ISB, DC, IC, ERET, traps) or has Unicorn execute it with the load values the model
  chose (every value the memory model allows);
* **propagation steps** - a store leaves a CPU's store buffer and becomes a write on
  the timeline (any eligible store: program order is kept only where barriers,
  release semantics, same-location coherence or TSO require it);
* (``_machine``) host actions and interrupt delivery.

The read rule is Promising-ARM's (Pulte et al., PLDI 2019) without promises: a read
may return any write to its location that is not older than the latest write at its
lower bound (the join of its views), with store forwarding from the CPU's own store
buffer.  Instruction fetch follows Arm's model of instruction caches (herd7
aarch64.cat, Instr-obs / IC-ca; Simner et al., ESOP 2020): a fetch may return any
write to the location that no completed IC (placed before the fetch, after a DC that
cleaned a newer write) excludes; with DIC, and on x86, fetch is coherent but may
still happen as early as the last context-synchronization event allows.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from execmem._errors import ModelError
from execmem.emu._state import (
    CAPA,
    CAPC,
    DCNEW,
    DCOLD,
    DONE,
    FAULT,
    FETCH,
    FNEW,
    HALT,
    ICNEW,
    ICOLD,
    REL,
    RNEW,
    ROLD,
    RUN,
    VIEW,
    WOLD,
    CpuState,
    MachineState,
    Pending,
    Store,
    get,
    join_into,
    put,
)
from execmem.emu._timeline import ALL_LINES, DC, IC, Event, Timeline, W
from execmem.emu._unicorn import Executor


@dataclass(frozen=True, slots=True)
class Step:
    """What a transition did, for traces and counterexamples."""

    cpu: int
    kind: str  # "exec", "store", "fault", "irq", "host"
    pc: int
    text: str
    detail: str = ""


@dataclass
class ModelConfig:
    """Static description of one modeled machine run (built by ``Machine``)."""

    isa: ModuleType
    engine: tuple[int, int]
    cpus: int
    line: int
    idc: bool
    dic: bool
    eis: bool
    regs: list[bytes]
    pcs: list[int]
    exits: list[frozenset[int]]
    handlers: list[int | None]
    memory: dict[int, bytes]
    regions: list[tuple[int, int]]
    symbols: dict[int, str] = field(default_factory=dict)


Transition = tuple[Step, MachineState]


class Model:
    """Successor function over :class:`MachineState` (see the module docstring)."""

    def __init__(self, config: ModelConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.isa = config.isa
        self.rules = config.isa.MODEL
        self.granule = self.rules.granule
        self.pc_index = config.isa.PC
        self.coherent_fetch = self.rules.coherent_fetch or config.dic
        # herd7 (like the architecture) treats DIC as implying IDC.
        self.idc = config.idc or config.dic
        self.executor = executor or Executor(
            config.engine, config.regions, config.isa.REGISTERS, self.pc_index, config.cpus
        )
        self.nregs = len(config.isa.REGISTERS)

    # ------------------------------------------------------------------ setup
    def initial(self) -> MachineState:
        tl = Timeline.start(self.granule, self.config.line, dict(self.config.memory))
        cpus = []
        pci = self.pc_index
        for i in range(self.config.cpus):
            regs = self.config.regs[i]
            regs = regs[: 8 * pci] + bytes(8) + regs[8 * pci + 8 :]
            cpu = CpuState(i, self.config.pcs[i], regs, self.nregs)
            if cpu.pc in self.config.exits[i]:
                cpu.status = DONE
            cpus.append(cpu)
        return MachineState(tl, tuple(cpus))

    def done(self, st: MachineState) -> bool:
        return all(c.status != RUN and not c.sb for c in st.cpus)

    # -------------------------------------------------------------- successors
    def successors(self, st: MachineState) -> list[Transition]:
        out: list[Transition] = []
        for c, cpu in enumerate(st.cpus):
            if cpu.sb:
                out.extend(self._propagations(st, c))
            if cpu.status == RUN:
                out.extend(self._instruction(st, c))
        return out

    # ---------------------------------------------------------------- helpers
    def _granules(self, pa: int, size: int) -> list[int]:
        g0 = pa - pa % self.granule
        end = pa + size
        return list(range(g0, end + (-end % self.granule), self.granule))

    def _replace_cpu(self, st: MachineState, c: int, cpu: CpuState, tl: Timeline | None = None) -> MachineState:
        cpus = list(st.cpus)
        cpus[c] = cpu
        return MachineState(tl if tl is not None else st.timeline, tuple(cpus))

    def _finish(self, cpu: CpuState) -> None:
        if cpu.status == RUN and cpu.pc in self.config.exits[cpu.index]:
            cpu.status = DONE

    def _join(self, cpu: CpuState, target: str, sources: Sequence[str]) -> None:
        v = cpu.views
        t = VIEW[target]
        for s in sources:
            val = v[VIEW[s]]
            if val > v[t]:
                v[t] = val

    # ------------------------------------------------------------- propagation
    def _eligible(self, cpu: CpuState, k: int) -> bool:
        entry = cpu.sb[k]
        for earlier in cpu.sb[:k]:
            if earlier.seq < entry.after:
                return False
            if earlier.addr < entry.addr + entry.span * self.granule and entry.addr < earlier.addr + earlier.span * self.granule:
                return False
        return True

    def _propagations(self, st: MachineState, c: int) -> Iterator[Transition]:
        cpu = st.cpus[c]
        for k, entry in enumerate(cpu.sb):
            if not self._eligible(cpu, k):
                continue
            tl = st.timeline.append(Event(W, c, entry.addr, entry.data, entry.mask, entry.span, note=f"{entry.va:#x}"))
            pos = tl.end
            new = cpu.copy()
            new.sb = cpu.sb[:k] + cpu.sb[k + 1 :]
            fwd_view = max(entry.vaddr, entry.vdata)
            for i in range(entry.span):
                g = entry.addr + i * self.granule
                new.coh = put(new.coh, g, pos)
                new.fwd = tuple(sorted([*((gg, pv) for gg, pv in new.fwd if gg != g), (g, (pos, fwd_view))]))
                new.scl = join_into(new.scl, tl.line_of(g), pos)
            if pos > new.views[WOLD]:
                new.views[WOLD] = pos
            if entry.release:
                new.views[REL] = pos
            yield (
                Step(c, "store", entry.pc, f"store {entry.data.hex()} to {entry.va:#x} becomes visible", f"@{pos}"),
                self._replace_cpu(st, c, new, tl),
            )

    # ------------------------------------------------------------------ fetch
    def _fetch(self, st: MachineState, cpu: CpuState) -> list[tuple[bytes, int, tuple[int, int, int] | None, str]]:
        """(instruction bytes, new fetch view, fetch record, note) for every allowed fetch."""
        tl: Timeline = st.timeline
        pre = max(cpu.views[FNEW], cpu.views[FETCH])
        size = self.isa.FETCH_SIZE
        pa = cpu.pc  # identity translation (page tables: _machine)
        g = pa - pa % self.granule
        if pa + size > g + self.granule:
            raise ModelError(f"instruction fetch at {pa:#x} crosses a granule")
        offset = pa - g
        writes = tl.write_positions(g)
        own = [s for s in cpu.sb if s.addr <= g < s.addr + s.span * self.granule]
        choices: list[tuple[bytes, int, tuple[int, int, int] | None, str]] = []
        if self.coherent_fetch:
            bound = pre
            if self.rules.own_stores_visible_to_fetch:
                bound = max(bound, get(cpu.coh, g))
            base = tl.latest_write_at(g, bound)
            for w in (base, *[p for p in writes if p > base]):
                value = tl.value_at(g, w)
                if own and self.rules.own_stores_visible_to_fetch:
                    value = _overlay(value, g, own, self.granule)
                choices.append((value[offset : offset + size], max(pre, w), None, f"@{w}"))
            return choices
        for w in (0, *writes):
            anchor = max(pre, w)
            if w < tl.floor_before(g, anchor, idc=self.idc):
                continue  # a completed IC removed this value from every instruction cache
            value = tl.value_at(g, w)
            record = (g, anchor, w) if writes else None
            choices.append((value[offset : offset + size], anchor, record, f"@{w}"))
        return choices

    # ------------------------------------------------------------ instruction
    def _instruction(self, st: MachineState, c: int) -> list[Transition]:
        cpu = st.cpus[c]
        out: list[Transition] = []
        seen: set[tuple[bytes, int, object]] = set()
        for insn, anchor, record, note in self._fetch(st, cpu):
            if (insn, anchor, record) in seen:
                continue
            seen.add((insn, anchor, record))
            base = cpu.copy()
            base.views[FETCH] = anchor
            if record is not None and record not in base.fetches:
                base.fetches = (*base.fetches, record)
            d = self.isa.decode_bytes(insn)
            for step, new_st in self._perform(st, c, base, insn, d):
                if record is not None:
                    step = Step(step.cpu, step.kind, step.pc, step.text, _detail(note, step.detail))
                out.append((step, new_st))
        return out

    def _perform(self, st: MachineState, c: int, cpu: CpuState, insn: bytes, d: Any) -> Iterator[Transition]:
        pc = cpu.pc
        op = d.op
        if op in ("undefined", "trap"):
            yield self._fault(st, c, cpu, pc, "UndefinedInstruction" if op == "undefined" else "Breakpoint", d.text)
            return
        if op == "nop":
            cpu.pc = pc + d.length
            self._finish(cpu)
            yield Step(c, "exec", pc, d.text), self._replace_cpu(st, c, cpu)
            return
        if op == "halt":
            cpu.pc = pc + d.length
            cpu.status = HALT
            yield Step(c, "exec", pc, d.text), self._replace_cpu(st, c, cpu)
            return
        if op in ("fence", "isb"):
            yield from self._fence(st, c, cpu, d.fence or "isb", d.text, pc, pc + d.length)
            return
        if op == "eret":
            # Exception return is context-synchronizing (Arm's model: EXC-RET in IFB).
            yield from self._fence(st, c, cpu, "exception", d.text, pc, self.isa.exception_return(cpu))
            return
        if op == "dc":
            yield from self._dc(st, c, cpu, d)
            return
        if op in ("ic", "tlbi"):
            yield self._issue_maintenance(st, c, cpu, d)
            return
        if op == "svc":
            raise ModelError(f"{d.text}: system calls are not modelled in this program")
        yield from self._execute(st, c, cpu, insn, d)

    # ------------------------------------------------------------------ faults
    def _fault(self, st: MachineState, c: int, cpu: CpuState, pc: int, kind: str, text: str) -> Transition:
        cpu.faults = (*cpu.faults, (pc, kind))
        handler = self.config.handlers[c]
        if handler is None:
            cpu.status = FAULT
            return Step(c, "fault", pc, text, kind), self._replace_cpu(st, c, cpu)
        cpu.regs = self.isa.exception_entry(cpu, pc)
        cpu.pc = handler
        if self.config.eis:
            for target, sources in self.rules.fences["exception"].joins:
                self._join(cpu, target, sources)
        return Step(c, "fault", pc, text, f"{kind}: enter handler"), self._replace_cpu(st, c, cpu)

    # ------------------------------------------------------------------ fences
    def _fence(self, st: MachineState, c: int, cpu: CpuState, name: str, text: str, pc: int, next_pc: int) -> Iterator[Transition]:
        rule = self.rules.fences[name]
        if rule.drain and cpu.sb:
            return  # blocked until the store buffer drains
        cpu.pc = next_pc
        if rule.order_stores:
            cpu.store_fence = cpu.seq
        if rule.complete and cpu.pending:
            for tl, cpus, placed in self._complete(st, c, cpu):
                new = cpus[c]
                for pos in placed:
                    if pos > new.views[ICOLD]:
                        new.views[ICOLD] = pos
                for target, sources in rule.joins:
                    self._join(new, target, sources)
                self._finish(new)
                yield Step(c, "exec", pc, text, "completes " + ", ".join(f"@{p}" for p in placed)), MachineState(tl, cpus)
            return
        for target, sources in rule.joins:
            self._join(cpu, target, sources)
        self._finish(cpu)
        yield Step(c, "exec", pc, text), self._replace_cpu(st, c, cpu)

    # ------------------------------------------------------ cache maintenance
    def _va_view(self, cpu: CpuState, regs: Sequence[int]) -> int:
        if not self.rules.track_dependencies:
            return 0
        return max((cpu.rview[r] for r in regs), default=0)

    def _dc(self, st: MachineState, c: int, cpu: CpuState, d: Any) -> Iterator[Transition]:
        va = cpu.reg(d.va_reg)
        line = st.timeline.line_of(va - va % self.granule)
        # po-scl-ob: earlier same-line stores must be visible before the clean.
        for s in cpu.sb:
            if st.timeline.line_of(s.addr) == line:
                return
        v = cpu.views
        pre = max(v[DCNEW], v[CAPC], v[FETCH], self._va_view(cpu, d.addr_regs), get(cpu.scl, line))
        cpu.pc += d.length
        for tl, cpus, pos in self._place(st, c, cpu, DC, line, pre):
            new = cpus[c]
            if pos > new.views[DCOLD]:
                new.views[DCOLD] = pos
            new.scl = join_into(new.scl, line, pos)
            self._finish(new)
            yield Step(c, "exec", cpu.pc - d.length, d.text, f"clean @{pos}"), MachineState(tl, cpus)

    def _issue_maintenance(self, st: MachineState, c: int, cpu: CpuState, d: Any) -> Transition:
        v = cpu.views
        pre = max(v[ICNEW], v[CAPC], v[FETCH], self._va_view(cpu, d.addr_regs))
        if d.va_reg is None:
            addr = ALL_LINES
        else:
            va = cpu.reg(d.va_reg)
            addr = st.timeline.line_of(va - va % self.granule)
        cpu.pending = (*cpu.pending, Pending(IC if d.op == "ic" else "TLBI", addr, pre, d.text))
        cpu.pc += d.length
        self._finish(cpu)
        return Step(c, "exec", cpu.pc - d.length, d.text, "issued"), self._replace_cpu(st, c, cpu)

    def _complete(self, st: MachineState, c: int, cpu: CpuState) -> Iterator[tuple[Timeline, tuple[CpuState, ...], list[int]]]:
        """Place every pending IC of ``cpu`` (its DSB completes them), in program order."""
        pending = cpu.pending
        cpu.pending = ()
        states: list[tuple[MachineState, list[int]]] = [(self._replace_cpu(st, c, cpu), [])]
        for p in pending:
            if p.kind != IC:
                raise ModelError("TLB maintenance needs page tables (not modelled in this program)")
            nxt: list[tuple[MachineState, list[int]]] = []
            for cur, placed in states:
                shifted_pre = p.pre
                for at in placed:
                    if shifted_pre >= at:
                        shifted_pre += 1
                for tl, cpus, pos in self._place(cur, c, cur.cpus[c], IC, p.addr, shifted_pre):
                    nxt.append((MachineState(tl, cpus), [*[q + (q >= pos) for q in placed], pos]))
            states = nxt
        for s, placed in states:
            yield s.timeline, s.cpus, placed

    def _place(self, st: MachineState, c: int, cpu: CpuState, kind: str, line: int, pre: int) -> Iterator[tuple[Timeline, tuple[CpuState, ...], int]]:
        """Insert a DC/IC at every distinct position >= ``pre`` that no fetch contradicts."""
        tl: Timeline = st.timeline
        cpus = list(st.cpus)
        cpus[c] = cpu
        relevant: set[int] = set()
        every = line == ALL_LINES
        for g, ws in tl.writes.items():
            if every or tl.line_of(g) == line:
                relevant.update(ws)
        for addr, ps in tl.maint.items():
            if every or addr in (line, ALL_LINES):
                relevant.update(ps)
        for other in cpus:
            for g, anchor, _ in other.fetches:
                if every or tl.line_of(g) == line:
                    relevant.add(anchor)
        candidates = sorted({pre, *(p for p in relevant if p > pre)})
        for k in candidates:
            at = k + 1
            new_tl = tl.insert_after(k, Event(kind, c, line))
            new_cpus = tuple(x.shifted(at) for x in cpus)
            if self._consistent(new_tl, new_cpus, line):
                yield new_tl, new_cpus, at

    def _consistent(self, tl: Timeline, cpus: Sequence[CpuState], line: int) -> bool:
        if self.coherent_fetch:
            return True
        every = line == ALL_LINES
        for cpu in cpus:
            for g, anchor, msg in cpu.fetches:
                if (every or tl.line_of(g) == line) and msg < tl.floor_before(g, anchor, idc=self.idc):
                    return False
        return True

    # ------------------------------------------------------- Unicorn-executed
    def _read_choices(self, st: MachineState, cpu: CpuState, pa: int, size: int, pre: int) -> list[tuple[bytes, int, list[int]]]:
        """(value, post-view, granules) for every value a read of ``size`` bytes may return."""
        tl: Timeline = st.timeline
        gs = self._granules(pa, size)
        if len(gs) > 2:
            raise ModelError(f"access of {size} bytes at {pa:#x} is not single-copy atomic in the model")
        offset = pa - gs[0]
        own = [s for s in cpu.sb if any(s.addr <= g < s.addr + s.span * self.granule for g in gs)]
        bound = {g: max(pre, get(cpu.coh, g)) for g in gs}
        base = max(tl.latest_write_at(g, bound[g]) for g in gs)
        sigmas = sorted({base, *(p for g in gs for p in tl.write_positions(g) if p > base)})
        fwd = dict(cpu.fwd)
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
                whole = _overlay(whole, gs[0], own, self.granule)
                covered = _covers(own, gs[0] + offset, size, self.granule)
                post = max(pre, *(max(s.vaddr, s.vdata) for s in own)) if covered else max(post, *(max(s.vaddr, s.vdata) for s in own))
            value = whole[offset : offset + size]
            if (value, post) in seen:
                continue
            seen.add((value, post))
            out.append((value, post, gs))
            if own and _covers(own, gs[0] + offset, size, self.granule):
                break  # fully forwarded: memory is irrelevant
        return out

    def _execute(self, st: MachineState, c: int, cpu: CpuState, insn: bytes, d: Any) -> Iterator[Transition]:
        ex = self.executor
        pc = cpu.pc
        pci = self.pc_index
        # The state keeps PC in ``cpu.pc`` only (its register slot is zero, so equal
        # states compare equal); Unicorn needs it in the register file.
        regs = cpu.regs[: 8 * pci] + pc.to_bytes(8, "little") + cpu.regs[8 * pci + 8 :]
        memory_op = d.op in ("load", "store")
        probe = ex.run(c, regs, insn, None) if memory_op else None
        reads = [a for a in probe.accesses if a.kind == "R"] if probe else []
        v = cpu.views
        vaddr = self._va_view(cpu, d.addr_regs)
        read_pre = max(v[RNEW], v[FETCH], vaddr)
        if self.rules.ordered_reads:
            read_pre = max(read_pre, v[ROLD])
        if d.acquire == "A":
            if any(s.release for s in cpu.sb):
                return  # LDAR waits for an earlier STLR to become visible
            read_pre = max(read_pre, v[REL])
        per_read = []
        for a in reads:
            line = st.timeline.line_of(a.addr - a.addr % self.granule)
            per_read.append(self._read_choices(st, cpu, a.addr, a.size, max(read_pre, get(cpu.scl, line))))
        for combo in itertools.product(*per_read):
            plan = tuple(value for value, _, _ in combo)
            out = ex.run(c, regs, insn, plan if memory_op else ())
            if not memory_op and out.accesses:
                raise ModelError(f"{d.text}: unexpected memory access")
            new = cpu.copy()
            if out.fault:
                yield self._fault(st, c, new, pc, "DataAbort" if "access" in out.fault else "Exception", f"{d.text} ({out.fault})")
                continue
            new.pc = int.from_bytes(out.regs[8 * pci : 8 * pci + 8], "little")
            new.regs = out.regs[: 8 * pci] + bytes(8) + out.regs[8 * pci + 8 :]
            detail = []
            self._views_after(new, d, vaddr, combo)
            for (value, post, gs), a in zip(combo, reads, strict=True):
                for g in gs:
                    new.coh = join_into(new.coh, g, post)
                    new.scl = join_into(new.scl, st.timeline.line_of(g), post)
                nv = new.views
                if post > nv[ROLD]:
                    nv[ROLD] = post
                if (d.acquire or self.rules.ordered_reads) and post > nv[RNEW]:
                    nv[RNEW] = post
                detail.append(f"read {a.addr:#x} = {int.from_bytes(value, 'little'):#x}")
            for a in out.accesses:
                if a.kind == "W":
                    self._buffer(new, a, d, pc)
                    detail.append(f"store {a.addr:#x} = {int.from_bytes(a.data, 'little'):#x} (buffered)")
            if memory_op and vaddr > new.views[CAPA]:
                new.views[CAPA] = vaddr
            self._finish(new)
            yield Step(c, "exec", pc, d.text, "; ".join(detail)), self._replace_cpu(st, c, new)

    def _views_after(self, new: CpuState, d: Any, vaddr: int, combo: Sequence[tuple[bytes, int, list[int]]]) -> None:
        if not self.rules.track_dependencies:
            return
        rview = list(new.rview)
        if d.op == "load":
            posts = [post for _, post, _ in combo] or [0]
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
            ctrl = max((new.rview[r] for r in d.cond_regs), default=0)
            if ctrl > new.views[CAPC]:
                new.views[CAPC] = ctrl
            for r in d.writes:
                rview[r] = 0
        else:
            out = max((new.rview[r] for r in d.reads), default=0)
            for r in d.writes:
                rview[r] = out
        new.rview = tuple(rview)

    def _buffer(self, cpu: CpuState, a: Any, d: Any, pc: int) -> None:
        gs = self._granules(a.addr, a.size)
        if len(gs) > 2:
            raise ModelError(f"store of {a.size} bytes at {a.addr:#x} is not modelled")
        span = len(gs)
        offset = a.addr - gs[0]
        data = bytearray(span * self.granule)
        data[offset : offset + a.size] = a.data
        full = offset == 0 and a.size == span * self.granule
        mask = -1 if full else ((1 << a.size) - 1) << offset
        vdata = self._va_view(cpu, d.data_regs)
        vaddr = self._va_view(cpu, d.addr_regs)
        seq = cpu.seq
        cpu.seq += 1
        after = cpu.store_fence
        if d.release or self.rules.fifo_stores:
            after = seq
        cpu.sb = (*cpu.sb, Store(seq, gs[0], span, bytes(data), mask, vaddr, vdata, d.release, after, a.addr, pc))


def _overlay(value: bytes, first: int, stores: Sequence[Store], granule: int) -> bytes:
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


def _detail(note: str, detail: str) -> str:
    return f"fetch {note}" + (f"; {detail}" if detail else "")
