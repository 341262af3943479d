"""Transition rules of the modeled machine.

A machine state has successors of five kinds:

* **instruction steps** - a CPU fetches the instruction at its PC (choosing among the
  values its instruction cache may return), then either performs it itself (barriers,
  ISB, DC, IC, TLBI, ERET, traps) or has Unicorn execute it with the load values the
  model chose (every value the memory model allows);
* **propagation steps** - a store leaves a CPU's store buffer and becomes a write on
  the timeline (any eligible store: program order is kept only where barriers,
  release semantics, same-location coherence or TSO require it);
* **host steps** and **interrupt deliveries** (``_host``);
* **spontaneous hardware updates** of page-table entries (``_translate``).

Translation is ``_translate``, cache and TLB maintenance ``_maintenance``, loads,
stores and atomics ``_execute``.

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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from execmem._errors import ModelError
from execmem.emu import _execute, _host, _maintenance
from execmem.emu._kernel import HostAction
from execmem.emu._layout import RETURN_MAGIC
from execmem.emu._state import (
    CAPA,
    CAPC,
    DCNEW,
    DISCARD,
    DONE,
    FAULT,
    FETCH,
    FNEW,
    HALT,
    HWOLD,
    ICNEW,
    ICOLD,
    REL,
    RNEW,
    RUN,
    STALE,
    STOLD,
    VIEW,
    WOLD,
    CpuState,
    MachineState,
    Step,
    Store,
    Transition,
    get,
    join_into,
    put,
)
from execmem.emu._timeline import IC, TLBI, Event, Timeline, W
from execmem.emu._translate import (
    note_stale,
    spontaneous_updates,
    spurious,
    tlb_usable,
    translate,
    update_pending,
)
from execmem.emu._unicorn import Executor

#: ``cpu.pc`` of a CPU that is running its host program rather than guest code.
HOST = 0


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
    #: virtual page -> (physical page, permissions "rwx") for pages mapped all run long
    static_map: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: virtual page -> physical address of its 8-byte page-table entry
    pte_addr: dict[int, int] = field(default_factory=dict)
    hosts: list[tuple[HostAction, ...]] = field(default_factory=list)
    symbols: dict[int, str] = field(default_factory=dict)
    #: per CPU: does the hardware set (access flag, dirty state) in page-table entries
    hardware: list[tuple[bool, bool]] = field(default_factory=list)
    #: what a fault does (see ``Machine``): "kernel", "fatal" or "handled"
    on_fault: str = "kernel"
    #: per CPU: runs at EL0 (user mode)
    user: list[bool] = field(default_factory=list)
    #: static pages out of reach from EL0: page tables, the linear map of frames
    kernel_pages: frozenset[int] = frozenset()


#: (instruction bytes, fetch view, fetch records, note, fault)
Fetched = tuple[bytes, int, tuple[tuple[int, int, int], ...], str, str]


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
            config.engine, config.regions, config.isa.REGISTERS, self.pc_index, config.cpus,
            cpu_model=getattr(config.isa, "UNICORN_CPU", None),
        )
        self.nregs = len(config.isa.REGISTERS)
        self.hosts = config.hosts or [() for _ in range(config.cpus)]
        #: granules holding page-table entries
        self.table_granules = frozenset(g for pte in config.pte_addr.values() for g in self.granules(pte, 8))

    # ------------------------------------------------------------------ setup
    def initial(self) -> MachineState:
        tl = Timeline.start(self.granule, self.config.line, dict(self.config.memory))
        cpus = []
        pci = self.pc_index
        for i in range(self.config.cpus):
            regs = self.config.regs[i]
            regs = regs[: 8 * pci] + bytes(8) + regs[8 * pci + 8 :]
            cpu = CpuState(i, self.config.pcs[i], regs, self.nregs)
            self.settle(cpu)
            cpus.append(cpu)
        return MachineState(tl, tuple(cpus))

    def done(self, st: MachineState) -> bool:
        return all(c.status != RUN and not c.sb and not c.irq and not c.acks for c in st.cpus)

    def settle(self, cpu: CpuState) -> None:
        """Mark a CPU finished when it reached an exit (or ran out of host actions)."""
        if cpu.status != RUN:
            return
        if cpu.pc == RETURN_MAGIC:
            cpu.pc = HOST
        if cpu.pc == HOST:
            if cpu.host >= len(self.hosts[cpu.index]) and not cpu.acks:
                cpu.status = DONE
        elif cpu.pc in self.config.exits[cpu.index]:
            cpu.status = DONE

    # -------------------------------------------------------------- successors
    #: Take CPU-local host actions eagerly (partial-order reduction, see ``_host.is_local``).
    reduce = True

    def successors(self, st: MachineState) -> list[Transition]:
        if self.reduce:
            for c, cpu in enumerate(st.cpus):
                if cpu.status == RUN and cpu.pc == HOST and _host.is_local(self, cpu):
                    local = list(_host.host_step(self, st, c))
                    if len(local) == 1:
                        return local
        out: list[Transition] = spontaneous_updates(self, st)
        for c, cpu in enumerate(st.cpus):
            if cpu.sb:
                out.extend(self._propagations(st, c))
            if cpu.irq:
                out.extend(_host.deliveries(self, st, c))
            if cpu.status == RUN:
                if cpu.pc == HOST:
                    out.extend(_host.host_step(self, st, c))
                else:
                    out.extend(self._instruction(st, c))
        return out

    # ---------------------------------------------------------------- helpers
    def granules(self, pa: int, size: int) -> list[int]:
        g0 = pa - pa % self.granule
        end = pa + size
        return list(range(g0, end + (-end % self.granule), self.granule))

    def replace(self, st: MachineState, c: int, cpu: CpuState, tl: Timeline | None = None) -> MachineState:
        cpus = list(st.cpus)
        cpus[c] = cpu
        return MachineState(tl if tl is not None else st.timeline, tuple(cpus))

    def join(self, cpu: CpuState, target: str, sources: Sequence[str]) -> None:
        v = cpu.views
        t = VIEW[target]
        for s in sources:
            val = v[VIEW[s]]
            if val > v[t]:
                v[t] = val

    def raise_view(self, cpu: CpuState, index: int, value: int) -> None:
        if value > cpu.views[index]:
            cpu.views[index] = value

    # ------------------------------------------------------------- propagation
    def _eligible(self, cpu: CpuState, k: int) -> bool:
        entry = cpu.sb[k]
        for earlier in cpu.sb[:k]:
            if earlier.seq < entry.after:
                return False
            if entry.hardware and not earlier.hardware:
                continue  # a hardware update is not ordered after the CPU's explicit stores
            if earlier.addr < entry.addr + entry.span * self.granule and entry.addr < earlier.addr + earlier.span * self.granule:
                return False
        return True

    def commit(self, tl: Timeline, cpu: CpuState, entry: Store) -> Timeline:
        """Append ``entry`` to the timeline; update the CPU's views (Promising's write rule)."""
        tl = tl.append(Event(W, cpu.index, entry.addr, entry.data, entry.mask, entry.span, note=f"{entry.va:#x}"))
        pos = tl.end
        fwd_view = max(entry.vaddr, entry.vdata)
        fwd = dict(cpu.fwd)
        for i in range(entry.span):
            g = entry.addr + i * self.granule
            cpu.coh = put(cpu.coh, g, pos)
            fwd[g] = (pos, fwd_view)
            cpu.scl = join_into(cpu.scl, tl.line_of(g), pos)
        cpu.fwd = tuple(sorted(fwd.items()))
        self.raise_view(cpu, WOLD, pos)
        if entry.seq < cpu.store_fence:
            self.raise_view(cpu, STOLD, pos)
        if entry.release:
            cpu.views[REL] = pos
        return tl

    def _propagations(self, st: MachineState, c: int) -> Iterator[Transition]:
        cpu = st.cpus[c]
        tl0 = st.timeline
        for k, entry in enumerate(cpu.sb):
            if not self._eligible(cpu, k):
                continue
            gs = [entry.addr + i * self.granule for i in range(entry.span)]
            if update_pending(st, c, gs):
                continue  # another CPU's hardware update of this entry comes first
            new = cpu.copy()
            new.sb = cpu.sb[:k] + cpu.sb[k + 1 :]
            if entry.hardware:
                if entry.expect != max(tl0.latest_write_at(g, tl0.end) for g in gs):
                    continue  # never: another write came after the one its walk read
                tl = tl0.append(Event(W, c, entry.addr, entry.data, -1, entry.span, note="hardware flag update"))
                self.raise_view(new, HWOLD, tl.end)
            else:
                tl = self.commit(tl0, new, entry)
                note_stale(self, MachineState(tl, st.cpus), new, *entry.walk, tl.end)
            self.settle(new)
            # (note_stale remembered the translation if a newer page-table write replaced it)
            stale = f"; {STALE} through a superseded translation" if new.stale != cpu.stale else ""
            step = Step(c, "store", entry.pc, f"{entry.va:#x} := {entry.data.hex()}", f"visible @{tl.end}{stale}")
            yield step, self.replace(st, c, new, tl)

    # ------------------------------------------------------------------ fetch
    def _fetch_granule(self, st: MachineState, cpu: CpuState, pa: int, pre: int) -> list[tuple[bytes, int, tuple[int, int, int] | None, str]]:
        """Bytes from ``pa`` to the end of its granule, for every value the fetch may see."""
        tl: Timeline = st.timeline
        g = pa - pa % self.granule
        offset = pa - g
        writes = tl.write_positions(g)
        newest = writes[-1] if writes else 0
        today = tl.value_at(g, newest)[offset:]

        def note(w: int, value: bytes, *, shown: bool) -> str:
            """Which write the bytes come from (when ``shown``), and always whether a
            newer write has changed them: a stale fetch, the culprit of a counterexample."""
            if w < newest and value != today:
                return f"@{w} {STALE} newest @{newest}"
            return f"@{w}" if shown else ""

        choices: list[tuple[bytes, int, tuple[int, int, int] | None, str]] = []
        if self.coherent_fetch:
            bound = pre
            own = []
            if self.rules.own_stores_visible_to_fetch:
                bound = max(bound, get(cpu.coh, g))
                own = [s for s in cpu.sb if s.addr <= g < s.addr + s.span * self.granule]
            base = tl.latest_write_at(g, bound)
            for w in (base, *[p for p in writes if p > base]):
                written = tl.value_at(g, w)
                value = _execute.overlay(written, g, own, self.granule) if own else written
                choices.append((value[offset:], max(pre, w), None, note(w, written[offset:], shown=False)))
            return choices
        for w in (0, *writes):
            anchor = max(pre, w)
            if w < tl.floor_before(g, anchor, cpu.index, idc=self.idc):
                continue  # a completed IC removed this value from every instruction cache
            record = (g, anchor, w) if writes else None
            value = tl.value_at(g, w)[offset:]
            choices.append((value, anchor, record, note(w, value, shown=bool(writes))))
        return choices

    def fetch(self, st: MachineState, cpu: CpuState) -> list[Fetched]:
        """Every instruction the CPU may fetch at its PC (granule by granule, in order)."""
        results: list[Fetched] = []
        pre0 = max(cpu.views[FNEW], cpu.views[FETCH])

        def more(va: int, acc: bytes, pre: int, records: tuple[tuple[int, int, int], ...], notes: str) -> None:
            for pa, walked, fault, update, _ in translate(self, st, cpu, va, "x", pre):
                if update is not None:
                    raise ModelError(f"{va:#x}: hardware flag updates by instruction fetch are not modelled")
                if fault:
                    # (for a fault, the view slot carries the position the walk read)
                    results.append((acc, walked, records, notes, f"I-MMU:{fault}@{va:#x}"))
                    continue
                for chunk, anchor, record, note in self._fetch_granule(st, cpu, pa, max(pre, walked)):
                    if not tlb_usable(self, st, cpu, va, walked, anchor):
                        continue
                    data = acc + chunk
                    recs = (*records, record) if record else records
                    size = self.isa.instruction_length(data)
                    label = f"{notes} {note}".strip()
                    if size is None:
                        more(va + len(chunk), data, anchor, recs, label)
                    else:
                        results.append((data[:size], anchor, recs, label, ""))

        more(cpu.pc, b"", pre0, (), "")
        return results

    # ---------------------------------------------------------------- quanta
    #: A quantum running this long without reaching a stop point is an error.
    quantum_seconds = 30.0

    def _fast_ok(self, cpu: CpuState) -> bool:
        """Can the CPU run natively from here?  Only through immutable code whose
        next instructions touch no memory, and only when no register carries a view
        that could still order anything (then computing on registers is invisible)."""
        if not self.executor.fast.covers(cpu.pc):
            return False
        if not self.rules.track_dependencies:
            return True
        v = cpu.views
        floor = min(v[RNEW], v[DCNEW], v[ICNEW], v[FNEW], v[CAPC], v[CAPA])
        return max(cpu.rview) <= floor

    def _quantum(self, st: MachineState, c: int) -> Transition | None:
        cpu = st.cpus[c]
        pci = self.pc_index
        regs = cpu.regs[: 8 * pci] + cpu.pc.to_bytes(8, "little") + cpu.regs[8 * pci + 8 :]
        out = self.executor.quantum(c, regs, self.quantum_seconds)
        pc = int.from_bytes(out[8 * pci : 8 * pci + 8], "little")
        if pc == cpu.pc and out == regs:
            return None
        new = cpu.copy()
        new.pc = pc
        new.regs = out[: 8 * pci] + bytes(8) + out[8 * pci + 8 :]
        top = max(cpu.rview)
        new.rview = (top,) * len(cpu.rview)
        self.settle(new)
        return Step(c, "exec", cpu.pc, "native quantum", f"to {pc:#x}"), self.replace(st, c, new)

    # ------------------------------------------------------------ instruction
    def _instruction(self, st: MachineState, c: int) -> list[Transition]:
        cpu = st.cpus[c]
        if self._fast_ok(cpu):
            quantum = self._quantum(st, c)
            if quantum is not None:
                return [quantum]
        out: list[Transition] = []
        seen: set[tuple[object, ...]] = set()
        for insn, anchor, records, note, fault in self.fetch(st, cpu):
            if (insn, anchor, records, fault) in seen:
                continue
            seen.add((insn, anchor, records, fault))
            base = cpu.copy()
            base.views[FETCH] = anchor
            for record in records:
                if record not in base.fetches:
                    base.fetches = (*base.fetches, record)
            if fault:
                base.views[FETCH] = cpu.views[FETCH]
                kind, _, where = fault.partition("@")
                out.extend(self.fault_or_retry(st, c, base, cpu.pc, kind, "(fetch)", int(where or "0", 0), anchor, "x"))
                continue
            d = self.isa.decode_bytes(insn)
            for step, new_st in self._perform(st, c, base, insn, d):
                if base.retrying and step.kind != "fault":
                    new_st = self._retried(new_st, c)
                if note:
                    step = Step(step.cpu, step.kind, step.pc, step.text, f"fetch {note}" + (f"; {step.detail}" if step.detail else ""))
                out.append((step, new_st))
        return out

    def _retried(self, st: MachineState, c: int) -> MachineState:
        """The instruction executed again after a handled fault completed."""
        cpu = st.cpus[c].copy()
        cpu.retrying = False
        return self.replace(st, c, cpu)

    def _perform(self, st: MachineState, c: int, cpu: CpuState, insn: bytes, d: Any) -> Iterator[Transition]:
        pc = cpu.pc
        op = d.op
        if op in ("undefined", "trap"):
            yield self.fault(st, c, cpu, pc, "UndefinedInstruction" if op == "undefined" else "Breakpoint", d.text, pc)
            return
        if op in ("nop", "halt"):
            cpu.pc = pc + d.length
            if op == "halt":
                cpu.status = HALT
            self.settle(cpu)
            yield Step(c, "exec", pc, d.text), self.replace(st, c, cpu)
            return
        if op in ("fence", "isb"):
            yield from self.fence(st, c, cpu, d.fence or "isb", d.text, pc, pc + d.length)
            return
        if op == "eret":
            # Exception return is context-synchronizing (Arm's model: EXC-RET in IFB).
            yield from self.fence(st, c, cpu, "exception", d.text, pc, self.isa.exception_return(cpu))
            return
        if op == "dc":
            va = cpu.reg(d.va_reg)
            cpu.pc = pc + d.length
            yield from _maintenance.clean(self, st, c, cpu, va, self.va_view(cpu, d.addr_regs), d.text, pc)
            return
        if op in ("ic", "tlbi"):
            target = None if d.va_reg is None or d.all_pages else cpu.reg(d.va_reg)
            if op == "tlbi" and target is not None:
                target = self.isa.tlbi_page(target)
            cpu.pc = pc + d.length
            kind = IC if op == "ic" else TLBI
            scope = "broadcast" if op == "ic" or d.broadcast else "local"
            yield _maintenance.issue(self, st, c, cpu, kind, target, self.va_view(cpu, d.addr_regs), scope, d.text, pc)
            return
        if op == "svc":
            raise ModelError(f"{d.text}: system calls are not modelled")
        yield from _execute.execute(self, st, c, cpu, insn, d)

    # ------------------------------------------------------------------ faults
    def retry(self, st: MachineState, c: int, cpu: CpuState, pc: int, text: str) -> Transition:
        """The kernel fixed a spurious fault up: synchronize and run the instruction again."""
        for target, sources in self.rules.fences["exception"].joins:
            self.join(cpu, target, sources)
        now = st.timeline.end
        for index in (RNEW, DCNEW, ICNEW, FNEW):
            self.raise_view(cpu, index, now)
        cpu.pc = pc
        return Step(c, "fault", pc, text, "spurious translation fault: the kernel returns and it is retried"), self.replace(st, c, cpu)

    def fault_or_retry(
        self, st: MachineState, c: int, cpu: CpuState, pc: int, kind: str, text: str, va: int, walked: int, access: str
    ) -> list[Transition]:
        """A translation fault: a kernel fixes a spurious one up (``on_fault="kernel"``)."""
        if self.config.on_fault == "kernel" and spurious(self, st, cpu, va, access, walked):
            return [self.retry(st, c, cpu, pc, text)]
        return [self.fault(st, c, cpu, pc, kind, text, va)]

    def fault(self, st: MachineState, c: int, cpu: CpuState, pc: int, kind: str, text: str, va: int) -> Transition:
        """A synchronous exception at ``pc`` (``kind``: herd's fault type, accessing ``va``).

        With a handler the CPU enters it.  Without one, ``on_fault`` decides: the CPU
        stops ("kernel", "fatal"), or (herd's ``handled``) the instruction is executed
        again once, and a second fault discards the execution.
        """
        cpu.faults = (*cpu.faults, (pc, kind, va))
        handler = self.config.handlers[c]
        if handler is None:
            if self.config.on_fault == "handled":
                if cpu.retrying:
                    cpu.status = DISCARD
                    return Step(c, "fault", pc, text, f"{kind}: faulted again, execution discarded"), self.replace(st, c, cpu)
                cpu.retrying = True
                cpu.pc = pc
                return Step(c, "fault", pc, text, f"{kind}: executed again"), self.replace(st, c, cpu)
            cpu.status = FAULT
            return Step(c, "fault", pc, text, kind), self.replace(st, c, cpu)
        cpu.regs = self.isa.exception_entry(cpu, pc)
        cpu.pc = handler
        if self.config.eis:
            for target, sources in self.rules.fences["exception"].joins:
                self.join(cpu, target, sources)
        return Step(c, "fault", pc, text, f"{kind}: enter handler"), self.replace(st, c, cpu)

    # ------------------------------------------------------------------ fences
    def fence(self, st: MachineState, c: int, cpu: CpuState, name: str, text: str, pc: int, next_pc: int) -> Iterator[Transition]:
        rule = self.rules.fences[name]
        if rule.drain and any(rule.implicit or not s.hardware for s in cpu.sb):
            return  # blocked until the store buffer drains
        if rule.drain_tables and any(s.addr in self.table_granules for s in cpu.sb):
            return  # blocked until the stores to page-table entries are visible
        cpu.pc = next_pc
        if rule.order_stores:
            cpu.store_fence = cpu.seq
            self.raise_view(cpu, STOLD, cpu.views[WOLD])
        if rule.complete and cpu.pending:
            for tl, cpus, placed in _maintenance.complete(self, st, c, cpu, local=rule.local):
                new = cpus[c]
                for pos in placed:
                    self.raise_view(new, ICOLD, pos)
                for target, sources in rule.joins:
                    self.join(new, target, sources)
                self.settle(new)
                yield Step(c, "exec", pc, text, "completes " + ", ".join(f"@{p}" for p in placed)), MachineState(tl, cpus)
            return
        for target, sources in rule.joins:
            self.join(cpu, target, sources)
        self.settle(cpu)
        yield Step(c, "exec", pc, text), self.replace(st, c, cpu)

    # ------------------------------------------------------ cache maintenance
    def va_view(self, cpu: CpuState, regs: Sequence[int]) -> int:
        if not self.rules.track_dependencies:
            return 0
        return max((cpu.rview[r] for r in regs), default=0)
