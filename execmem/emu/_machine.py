"""``Machine``: build a modeled multi-CPU machine, run it, explore it.

A machine is built up front - guest code per CPU (assembled with Keystone from text
with labels), data locations, registers, host programs (kernel-like actions) - and
then run: sequentially (:meth:`Machine.call`, :meth:`Machine.run_sequential`), on a
seeded random schedule, or exhaustively (:meth:`Machine.explore`).  It is also an
execmem backend: ``execmem.Allocator(backend=Machine(...))`` records the allocator's
recipe steps as host actions on the machine's host CPU (see ``_backend``).  Where
things live in the address space is ``_layout``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from types import ModuleType

from execmem import arch as _arch
from execmem._asm_engine import KeystoneFailure, assemble_own
from execmem._errors import AssemblyError, ModelError
from execmem._ranges import coalesce
from execmem.emu._backend import EmulatedBackend
from execmem.emu._explore import MAX_MEMORY, Exploration, exhaustive, random_runs, replay
from execmem.emu._kernel import HostAction, HostProgram, pte_value
from execmem.emu._layout import (
    CODE_BASE,
    CODE_STRIDE,
    DATA_BASE,
    DYNAMIC_BASE,
    DYNAMIC_LIMIT,
    FRAME_BASE,
    PAGE,
    PT_BASE,
    STACK_BASE,
)
from execmem.emu._semantics import HOST, Model, ModelConfig
from execmem.emu._state import MachineState, Step
from execmem.emu._timeline import Timeline
from execmem.emu._unicorn import Executor, FastCode


@dataclass
class Program:
    """Guest code loaded for one CPU."""

    cpu: int
    address: int
    code: bytes
    labels: dict[str, int]

    @property
    def end(self) -> int:
        return self.address + len(self.code)


@dataclass
class _CpuSetup:
    pc: int = HOST
    exits: set[int] = field(default_factory=set)
    handler: int | None = None
    regs: dict[int, int] = field(default_factory=dict)
    host: list[HostAction] = field(default_factory=list)
    code_cursor: int = 0
    #: the hardware sets (access flag, dirty state) in the entries this CPU walks
    hardware: tuple[bool, bool] = (False, False)
    #: runs at EL0 (user mode)
    user: bool = False


class Machine(EmulatedBackend):
    """A modeled multi-CPU machine (one Unicorn instance per CPU).

    ``idc``/``dic`` are the CTR_EL0 cache-type bits (arm64), ``eis`` makes exception
    entry context-synchronizing (FEAT_ExS; the architecture's default), ``tlb`` is
    the TLB maintenance style used by ``unmap`` (``"broadcast"``, ``"ipi"``,
    ``"invlpgb"``), ``line_size`` the cache line size for DC/IC (herd7's litmus
    model puts every location on its own line: pass the granule size).

    ``on_fault`` is what a fault does on a CPU without a handler: ``"kernel"`` (a
    spurious translation fault is fixed up and the instruction retried, as a kernel
    does; any other fault stops the CPU), ``"fatal"`` (every fault stops it: herd's
    ``fatal``/``precise``), ``"handled"`` (the instruction is executed again once, and
    faulting again discards the execution: herd's ``handled``/``imprecise``).
    """

    FAULT_POLICIES = ("kernel", "fatal", "handled")

    def __init__(
        self,
        arch: str | _arch.ArchSpec = "arm64",
        cpus: int = 2,
        *,
        idc: bool = False,
        dic: bool = False,
        eis: bool = True,
        tlb: str | None = None,
        line_size: int | None = None,
        host_cpu: int = 0,
        on_fault: str = "kernel",
    ) -> None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 16:
            raise ModelError("cpus must be an integer from 1 to 16")
        if line_size is not None and (isinstance(line_size, bool) or not isinstance(line_size, int)):
            raise ModelError(f"line_size must be an integer or None, not {type(line_size).__name__}")
        if isinstance(host_cpu, bool) or not isinstance(host_cpu, int):
            raise ModelError(f"host_cpu must be an integer, not {type(host_cpu).__name__}")
        # An ArchSpec is taken as given: the verification mutations hand one over
        # (``spec.with_recipes(...)``) for the allocator on this machine to run.
        self.spec = arch if isinstance(arch, _arch.ArchSpec) else _arch.get(arch)
        self.isa: ModuleType = _arch.isa(self.spec)
        self.ncpus = cpus
        if (idc or dic) and "idc" not in self.spec.cache_features:
            raise ModelError(f"{self.spec.name} has no IDC/DIC cache-type bits")
        self.idc, self.dic, self.eis = idc, dic, eis
        self.tlb = tlb or self.spec.default_tlb
        if self.tlb not in self.spec.tlb_styles:
            raise ModelError(f"tlb must be one of {', '.join(self.spec.tlb_styles)} on {self.spec.name}")
        granule = self.isa.MODEL.granule
        self.line_size = line_size or self.spec.cache_lines[0]
        if self.line_size % granule or self.line_size & (self.line_size - 1):
            raise ModelError(f"line_size must be a power-of-two multiple of {granule}")
        if not 0 <= host_cpu < cpus:
            raise ModelError("host_cpu out of range")
        if on_fault not in self.FAULT_POLICIES:
            raise ModelError(f"on_fault must be one of {', '.join(self.FAULT_POLICIES)}")
        self.host_cpu = host_cpu
        self.on_fault = on_fault
        hardware = (self.isa.MODEL.hardware_access_flag, False)
        self._cpus = [_CpuSetup(regs=dict(self.isa.RESET), hardware=hardware) for _ in range(cpus)]
        self._memory: dict[int, bytes] = {}
        self._static: dict[int, tuple[int, str]] = {}
        self._pte: dict[int, int] = {}
        self._regions: list[tuple[int, int]] = []
        self._symbols: dict[str, int] = {}
        self._data_cursor = DATA_BASE
        self._next_va = DYNAMIC_BASE
        self._next_frame = FRAME_BASE
        self._next_pte = PT_BASE
        self._kernel_pages: set[int] = set()
        self._executor: Executor | None = None
        self._executor_regions: list[tuple[int, int]] = []
        #: state reached by sequential runs (``call``); exploration starts there
        self._state: MachineState | None = None
        #: (start PC, registers) of every CPU when that state was reached
        self._phase: list[tuple[int, dict[int, int]]] = []
        #: code in pages without write permission, for native quanta
        self._immutable: list[Program] = []
        for c in range(cpus):
            stack = STACK_BASE + c * PAGE
            self.map_memory(stack, PAGE, "rw")
            self._cpus[c].regs[self.isa.SP] = stack + PAGE - 64
        EmulatedBackend.__init__(self, self)

    # ---------------------------------------------------------------- building
    @property
    def cpus(self) -> int:
        return self.ncpus

    @property
    def host_actions(self) -> int:
        """Host actions recorded so far on every CPU."""
        return sum(len(s.host) for s in self._cpus)

    def map_memory(self, va: int, size: int, perms: str = "rw") -> int:
        """Map ``[va, va+size)`` for the whole run (VA == PA), zero-filled."""
        if va % PAGE or size <= 0:
            raise ModelError("map needs a page-aligned address and a positive size")
        if set(perms) - set("rwx"):
            raise ModelError("perms is a string of r, w, x")
        end = va + size + (-size % PAGE)
        for page in range(va, end, PAGE):
            self._static[page] = (page, perms)
        self._add_region(va, end - va)
        return va

    def frames(self, size: int) -> int:
        """Fresh zero-filled physical frames for ``size`` bytes (whole pages); the host
        reaches them at VA == PA (the kernel's linear map).  Returns the first one."""
        size += -size % PAGE
        frame = self._next_frame
        self._next_frame += size
        self._kernel_pages.update(range(frame, frame + size, PAGE))
        return self.map_memory(frame, size, "rw")

    def map_pages(self, size: int, *, align: int = PAGE, at: int | None = None) -> tuple[int, int]:
        """A fresh virtual range of ``size`` bytes (whole pages) translated through
        page-table entries in model memory, so host actions and guest stores can map,
        remap and unmap it while the machine runs.  ``at``: where (a free place of the
        dynamic range the caller chose, ``near=``); by default after the last range.

        Returns (virtual address, physical address of the first entry); page i's
        entry is the 8 bytes ``8 * i`` further.  Entries start invalid (zero); the
        entries are reachable at VA == PA too (guest code may write them).
        """
        size += -size % PAGE
        align = max(align, PAGE)
        va = self._next_va + (-self._next_va % align) if at is None else at
        if size <= 0 or va % align or va < DYNAMIC_BASE or va + size > DYNAMIC_LIMIT:
            raise ModelError("the modeled machine's page-table mapped address space is exhausted")
        self._next_va = max(self._next_va, va + size + PAGE)  # a guard page between ranges
        entries = self._next_pte
        self._next_pte += 8 * (size // PAGE) + 64  # the next range's entries on another line
        first = entries - entries % PAGE
        for page in range(first, self._next_pte, PAGE):
            if page not in self._static:
                self.map_memory(page, PAGE, "rw")
                self._kernel_pages.add(page)
        for i, page in enumerate(range(va, va + size, PAGE)):
            self._pte[page] = entries + 8 * i
        self._add_region(va, size)
        return va, entries

    def _add_region(self, va: int, size: int) -> None:
        self._regions.append((va, size))
        self._regions = coalesce(self._regions)

    def alloc(self, size: int = 8, *, value: int | bytes = 0, name: str | None = None) -> int:
        """A data location of ``size`` bytes on its own cache line; returns its address."""
        if size <= 0 or size > PAGE:
            raise ModelError("alloc size must be 1..4096 bytes")
        line = max(self.line_size, 8)
        addr = self._data_cursor
        self._data_cursor += size + (-size % line)
        for page in range(addr - addr % PAGE, self._data_cursor, PAGE):
            if page not in self._static:
                self.map_memory(page, PAGE, "rw")
        data = value if isinstance(value, bytes) else value.to_bytes(size, "little")
        self.poke(addr, data.ljust(size, b"\0"))
        if name:
            self._symbols[name] = addr
        return addr

    def page(self, perms: str = "rw", *, mapped: bool = True, value: bytes = b"") -> tuple[int, int]:
        """A page mapped through a page-table entry (so it can be remapped while the
        machine runs): returns (virtual address, physical frame)."""
        va, entry = self.map_pages(PAGE)
        frame = self.frames(PAGE)
        self.poke(frame, value.ljust(PAGE, b"\0")[:PAGE])
        if mapped:
            self.poke(entry, pte_value(self.isa.MODEL.descriptor, frame, perms).to_bytes(8, "little"))
        return va, frame

    def _poke_physical(self, pa: int, data: bytes) -> None:
        g = self.isa.MODEL.granule
        for i, b in enumerate(data):
            gran = (pa + i) - (pa + i) % g
            cur = bytearray(self._memory.get(gran, bytes(g)))
            cur[pa + i - gran] = b
            self._memory[gran] = bytes(cur)

    def symbol(self, name: str) -> int:
        try:
            return self._symbols[name]
        except KeyError:
            raise ModelError(f"no symbol {name!r}") from None

    def poke(self, va: int, data: bytes) -> None:
        """Initial memory contents (through a static mapping or a frame alias)."""
        for i in range(len(data)):
            self._poke_physical(self._pa(va + i), data[i : i + 1])
        self._state = None if self._state is None else self._refresh(self._state)

    def _pa(self, va: int) -> int:
        page = va - va % PAGE
        if page in self._static:
            return self._static[page][0] + va - page
        raise ModelError(f"{va:#x} is not statically mapped")

    def load(
        self,
        cpu: int,
        source: str,
        *,
        at: int | None = None,
        start: bool = True,
        exit_at_end: bool = True,
        handler: bool = False,
        perms: str = "rx",
    ) -> Program:
        """Assemble ``source`` for ``cpu`` at ``at`` and map it (read+execute by default).

        ``start`` makes the CPU begin there; ``exit_at_end`` stops it when it runs off
        the end; ``handler`` makes it the CPU's synchronous exception handler;
        ``perms="rwx"`` gives self-modifying code (litmus tests) a writable mapping.
        """
        self._check_cpu(cpu)
        if at is None:
            at = CODE_BASE + cpu * CODE_STRIDE + self._cpus[cpu].code_cursor
        code, labels = assemble(self.spec, source, at)
        return self.place(cpu, code, at, labels=labels, start=start, exit_at_end=exit_at_end, handler=handler, perms=perms)

    def place(
        self,
        cpu: int,
        code: bytes,
        at: int,
        *,
        labels: dict[str, int] | None = None,
        start: bool = True,
        exit_at_end: bool = True,
        handler: bool = False,
        perms: str = "rx",
    ) -> Program:
        """Put already encoded ``code`` for ``cpu`` at ``at`` (see :meth:`load`)."""
        self._check_cpu(cpu)
        setup = self._cpus[cpu]
        labels = dict(labels or {})
        first = at - at % PAGE
        self.map_memory(first, at + max(len(code), 1) - first, perms)
        self.poke(at, code)
        area = CODE_BASE + cpu * CODE_STRIDE
        if area <= at < area + CODE_STRIDE:
            setup.code_cursor = max(setup.code_cursor, at + len(code) + 16 - area)
        program = Program(cpu, at, code, labels)
        if "w" not in perms:
            self._immutable.append(program)
        if start:
            setup.pc = labels.get("_start", at)
        if exit_at_end:
            setup.exits.add(at + len(code))
        if handler:
            setup.handler = at
        for name, addr in labels.items():
            self._symbols.setdefault(f"P{cpu}:{name}", addr)
        return program

    def set_reg(self, cpu: int, name: str, value: int) -> None:
        self._check_cpu(cpu)
        index = self.isa.register_index(name)
        if index is None:
            raise ModelError(f"register {name!r} cannot be set")
        self._cpus[cpu].regs[index] = value & (1 << 64) - 1

    def set_hardware_updates(self, cpu: int, *, access_flag: bool, dirty: bool) -> None:
        """Whether the hardware sets the access flag and the dirty state of the entries
        ``cpu`` walks (Arm TCR_ELx.HA/HD, FEAT_HAFDBS; herd's ``TTHM=HA HD``)."""
        self._check_cpu(cpu)
        self._cpus[cpu].hardware = (bool(access_flag), bool(dirty))

    def set_user(self, cpu: int, user: bool = True) -> None:
        """Run ``cpu`` at EL0 (user mode): entries must grant EL0 access (Arm AP[1], x86
        U/S), and page tables and the kernel's linear map of frames are out of reach.
        (A fault handler of such a CPU would run at EL1: not modelled.)"""
        self._check_cpu(cpu)
        if user and self._cpus[cpu].handler is not None:
            raise ModelError("a CPU running at EL0 with a fault handler is not modelled")
        self._cpus[cpu].user = bool(user)

    def start(self, cpu: int, pc: int) -> None:
        self._check_cpu(cpu)
        self._cpus[cpu].pc = pc

    def host(self, cpu: int | None = None) -> HostProgram:
        """The host program of ``cpu`` (default: the host CPU), to append actions to."""
        c = self.host_cpu if cpu is None else cpu
        self._check_cpu(c)
        return HostProgram(self._cpus[c].host, c, self.ncpus, self.isa)

    def _check_cpu(self, cpu: int) -> None:
        if not isinstance(cpu, int) or not 0 <= cpu < self.ncpus:
            raise ModelError(f"no CPU {cpu!r} (this machine has {self.ncpus})")

    # ----------------------------------------------------------------- running
    def config(self) -> ModelConfig:
        regs = []
        for setup in self._cpus:
            values = [0] * len(self.isa.REGISTERS)
            for index, value in setup.regs.items():
                values[index] = value
            regs.append(b"".join(v.to_bytes(8, "little") for v in values))
        return ModelConfig(
            isa=self.isa,
            engine=self.spec.engines.unicorn or (0, 0),
            cpus=self.ncpus,
            line=self.line_size,
            idc=self.idc,
            dic=self.dic,
            eis=self.eis,
            regs=regs,
            pcs=[s.pc for s in self._cpus],
            exits=[frozenset(s.exits) for s in self._cpus],
            handlers=[s.handler for s in self._cpus],
            memory=dict(self._memory),
            regions=list(self._regions),
            static_map=dict(self._static),
            pte_addr=dict(self._pte),
            hosts=[tuple(s.host) for s in self._cpus],
            symbols={v: k for k, v in self._symbols.items()},
            hardware=[s.hardware for s in self._cpus],
            on_fault=self.on_fault,
            user=[s.user for s in self._cpus],
            kernel_pages=frozenset(self._kernel_pages),
        )

    def _fast_code(self) -> FastCode:
        """Classify every instruction of code nobody can write: quanta stop at the rest."""
        ranges: list[tuple[int, int]] = []
        code: list[tuple[int, bytes]] = []
        stops: set[int] = set()
        exits = {pc for s in self._cpus for pc in s.exits} | {s.handler for s in self._cpus if s.handler}
        for program in self._immutable:
            if any(self._static.get(p, (0, "w"))[1].count("w") for p in range(program.address - program.address % PAGE, program.end, PAGE)):
                continue
            pc = program.address
            while pc < program.end:
                d = self.isa.decode_bytes(program.code[pc - program.address :])
                if d.op not in ("alu", "branch", "nop") or d.length <= 0:
                    stops.add(pc)
                pc += max(d.length, 1)
            ranges.append((program.address, program.end))
            code.append((program.address, program.code))
            stops.add(program.end)
        stops |= exits
        return FastCode(tuple(ranges), frozenset(stops), tuple(code))

    def model(self) -> Model:
        """A fresh model of the machine as built so far (Unicorn instances are reused)."""
        fast = self._fast_code()
        if self._executor is None or self._executor_regions != self._regions or self._executor.fast != fast:
            self._executor = Executor(
                self.spec.engines.unicorn or (0, 0), self._regions, self.isa.REGISTERS, self.isa.PC, self.ncpus, fast,
                cpu_model=getattr(self.isa, "UNICORN_CPU", None),
            )
            self._executor_regions = list(self._regions)
        model = Model(self.config(), self._executor)
        if self._state is not None:
            base = self._refresh(self._state)
            model.initial = lambda: base  # type: ignore[method-assign]
        return model

    def _refresh(self, st: MachineState) -> MachineState:
        tl = st.timeline
        new_tl = Timeline(tl.events, tl.granule, tl.line, dict(self._memory))
        cpus = []
        for c, cpu in enumerate(st.cpus):
            cpu = cpu.copy()
            setup = self._cpus[c]
            if cpu.status == "done" and cpu.pc == HOST:
                start, regs = self._phase[c]
                if setup.pc != start:
                    # Guest code loaded after the checkpoint: this CPU starts it now,
                    # with the registers set since.
                    for index, value in setup.regs.items():
                        if regs.get(index) != value:
                            cpu.regs = cpu.with_reg(index, value)
                    cpu.pc = setup.pc
                    cpu.status = "run"
                elif cpu.host < len(setup.host):
                    cpu.status = "run"
            cpus.append(cpu)
        return MachineState(new_tl, tuple(cpus))

    def explore(
        self,
        observe: Callable[[MachineState], Hashable] | None = None,
        *,
        exhaustive_search: bool = True,
        max_states: int = 2_000_000,
        max_memory: int = MAX_MEMORY,
        runs: int = 1000,
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
        stop: Callable[[Hashable], bool] | None = None,
        classify: Callable[[Hashable], Hashable] | None = None,
    ) -> Exploration:
        """Every reachable final state (or ``runs`` random schedules when not exhaustive).

        ``stop`` ends an exhaustive search at the first observation it accepts.  An
        exhaustive search expands at most ``max_states`` states and lets the process
        grow by at most ``max_memory`` bytes; past either it stops, incomplete, and
        says so in ``Exploration.exceeded``.
        """
        model = self.model()
        obs = observe or (lambda st: st.key())
        if exhaustive_search:
            return exhaustive(
                model, obs, max_states=max_states, max_memory=max_memory, progress=progress, stop=stop, classify=classify
            )
        return random_runs(model, obs, runs=runs, seed=seed, progress=progress)

    def replay(self, schedule: list[int]) -> tuple[list[Step], MachineState]:
        return replay(self.model(), schedule)

    def run_sequential(self, *, max_steps: int = 1_000_000) -> MachineState:
        """Run to completion with stores visible at once and newest values read.

        This is sequentially consistent execution, for using the machine as a
        computer (examples, ``call``); it advances the machine's current state.
        """
        model = self.model()
        st = model.initial()
        for _ in range(max_steps):
            if model.done(st):
                break
            succ = model.successors(st)
            if not succ:
                raise ModelError("the machine is stuck (every CPU blocked)")
            stores = [t for t in succ if t[0].kind == "store"]
            st = (stores[0] if stores else succ[-1])[1]
        else:
            raise ModelError(f"no result after {max_steps} steps")
        self._state = st
        self._phase = [(setup.pc, dict(setup.regs)) for setup in self._cpus]
        return st

    def checkpoint(self) -> MachineState:
        """Run everything built so far to completion (sequentially) and start from there.

        What is built afterwards - host actions, guest code loaded on idle CPUs and
        their registers - is the concurrent phase that ``explore`` examines: a
        set-up phase need not be interleaved with it.
        """
        return self.run_sequential()

    def call(self, entry: int, *args: int, cpu: int | None = None, max_steps: int = 1_000_000) -> int:
        """Run pending host actions, then ``entry(*args)`` on ``cpu``; return its result."""
        c = self.host_cpu if cpu is None else cpu
        self.host(c).call(entry, *args).record(self.isa.RETURN_REGISTER)
        st = self.run_sequential(max_steps=max_steps)
        cpu_state = st.cpus[c]
        if cpu_state.faults:
            pc, kind, _ = cpu_state.faults[-1]
            raise ModelError(f"CPU{c} faulted at {pc:#x}: {kind}")
        return cpu_state.results[-1]

    # -------------------------------------------------------------- inspection
    def read(self, st: MachineState, va: int, size: int) -> bytes:
        """Final (latest) bytes at ``va`` in state ``st`` (static mappings / aliases)."""
        g = self.isa.MODEL.granule
        out = bytearray()
        for i in range(size):
            pa = self._pa(va + i)
            gran = pa - pa % g
            out.append(st.timeline.value_at(gran, st.timeline.end)[pa - gran])
        return bytes(out)

    def reg(self, st: MachineState, cpu: int, name: str) -> int:
        index = self.isa.register_index(name)
        if index is None:
            raise ModelError(f"unknown register {name!r}")
        value = st.cpus[cpu].reg(index)
        if name.lower().startswith("w") or (name.upper().startswith("E") and len(name) == 3):
            value &= 0xFFFF_FFFF
        return value


def assemble(spec: _arch.ArchSpec, source: str, address: int) -> tuple[bytes, dict[str, int]]:
    """Keystone-assemble ``source`` at ``address``; also return every label's address."""
    if spec.engines.keystone is None:
        raise ModelError(f"no assembler for {spec.name}")
    labels = _labels(source)
    text = source + "\n" + "".join(f".quad {name}\n" for name in labels)
    try:
        raw = assemble_own(spec, text, address)
    except KeystoneFailure as exc:
        raise AssemblyError(f"cannot assemble for {spec.name}: {exc}") from None
    n = len(labels)
    code = raw[: len(raw) - 8 * n] if n else raw
    addrs = [int.from_bytes(raw[len(raw) - 8 * (n - i) : len(raw) - 8 * (n - i - 1)], "little") for i in range(n)]
    return code, dict(zip(labels, addrs, strict=True))


def _labels(source: str) -> list[str]:
    names: list[str] = []
    for line in source.replace(";", "\n").splitlines():
        line = line.split("//")[0]
        while ":" in line:
            head, _, rest = line.partition(":")
            head = head.strip()
            if not head.replace("_", "").replace(".", "").isalnum() or not head or head[0].isdigit():
                break
            names.append(head)
            line = rest
    return list(dict.fromkeys(names))


__all__ = ["Machine", "Program", "assemble"]
