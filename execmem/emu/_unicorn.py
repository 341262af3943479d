"""Unicorn as the machine's instruction executor.

One ``Uc`` per modeled CPU maps *scratch* memory over every guest region.  The
model owns the real memory (the timeline) and decides which instruction bytes a CPU
fetched and which value each of its loads returns; to execute one instruction the
executor pokes the fetched bytes at PC, loads the CPU's packed register file with
Unicorn's batch C API (0.6 us for the whole file; the Python wrapper costs 1 us per
register), runs exactly one instruction (``count=1``, never ``count=0``: see
notes/unicorn-probe.md), supplies load values from a memory-read hook and records
stores from a memory-write hook.

Given (instruction bytes, registers, load values) the result is deterministic, so
results are memoized: exhaustive exploration revisits the same local steps many
times and pays for Unicorn once.

Unicorn behaviours this relies on are pinned by tests/model/test_unicorn_pins.py:
a translated block keeps running after its bytes change until ``ctl_remove_cache``
(so the executor removes the block whenever the bytes at PC differ from the ones it
was translated from), the TB containing ``until - 1`` is dropped after every run
(``until`` lives on a dedicated page), memory hooks fire before the access.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import unicorn
import unicorn.unicorn_py3.unicorn as _ucmod

from execmem._errors import ModelError
from execmem.emu._layout import PAGE, UNTIL


@dataclass(frozen=True, slots=True)
class Access:
    """One memory access Unicorn performed: kind "R" or "W", VA, size, bytes (W)."""

    kind: str
    addr: int
    size: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Outcome:
    """Registers after the instruction, its memory accesses, and a fault (or "")."""

    regs: bytes
    accesses: tuple[Access, ...]
    fault: str = ""


class _Cpu:
    """One Unicorn instance with scratch memory and hooks."""

    def __init__(
        self,
        arch: tuple[int, int],
        regions: Sequence[tuple[int, int]],
        registers: Sequence[int],
        fast: FastCode | None = None,
        cpu_model: int | None = None,
    ) -> None:
        self.uc = unicorn.unicorn.Uc(*arch)
        if cpu_model is not None:
            self.uc.ctl_set_cpu_model(cpu_model)
        self.handle = self.uc._uch
        self.buffers: list[tuple[int, int, ctypes.Array[ctypes.c_char]]] = []
        for base, size in regions:
            buf = ctypes.create_string_buffer(size)
            self.uc.mem_map_ptr(base, size, unicorn.UC_PROT_ALL, ctypes.addressof(buf))
            self.buffers.append((base, size, buf))
        n = len(registers)
        self.nregs = n
        self.ids = (ctypes.c_int * n)(*registers)
        self.vals = (ctypes.c_uint64 * n)()
        base_addr = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * n)(*[base_addr + 8 * i for i in range(n)])
        self.translated: dict[int, bytes] = {}
        self.plan: list[bytes] = []
        self.accesses: list[Access] = []
        self.fault = ""
        self.uc.hook_add(unicorn.UC_HOOK_MEM_READ, self._on_read)
        self.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._on_write)
        self.uc.hook_add(unicorn.UC_HOOK_INTR, self._on_intr)
        self.uc.hook_add(
            unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_PROT, self._on_bad_access
        )
        # Quanta: stop before every instruction the model must see, and anywhere
        # outside the immutable code whose instructions were all classified.
        self.fast = False
        self.stopped = False
        if fast is not None and fast.ranges:
            for addr, code in fast.code:
                self.poke(addr, code)
            for addr in sorted(fast.stops):
                self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_stop, begin=addr, end=addr)
            cursor = 0
            for lo, hi in sorted(fast.ranges):
                if lo > cursor:
                    self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_stop, begin=cursor, end=lo - 1)
                cursor = max(cursor, hi)
            self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_stop, begin=cursor, end=(1 << 64) - 1)

    def _on_stop(self, uc: object, addr: int, size: int, _ud: object) -> None:
        if self.fast:
            self.stopped = True
            self.uc.emu_stop()  # before the instruction executes (tests/model/test_unicorn_pins.py)

    def _address(self, addr: int, size: int) -> int:
        for base, length, buf in self.buffers:
            if base <= addr and addr + size <= base + length:
                return ctypes.addressof(buf) + addr - base
        raise ModelError(f"address {addr:#x} is outside every guest region")

    def poke(self, addr: int, data: bytes) -> None:
        ctypes.memmove(self._address(addr, len(data)), data, len(data))

    def _on_read(self, uc: object, access: int, addr: int, size: int, value: int, _ud: object) -> None:
        index = sum(1 for a in self.accesses if a.kind == "R")
        self.accesses.append(Access("R", addr, size))
        data = self.plan[index] if index < len(self.plan) else bytes(size)
        if len(data) != size:
            data = (data + bytes(size))[:size]
        self.poke(addr, data)

    def _on_write(self, uc: object, access: int, addr: int, size: int, value: int, _ud: object) -> None:
        self.accesses.append(Access("W", addr, size, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")))

    def _on_intr(self, uc: object, intno: int, _ud: object) -> None:
        self.fault = f"interrupt {intno}"
        self.uc.emu_stop()

    def _on_bad_access(self, uc: object, access: int, addr: int, size: int, value: int, _ud: object) -> bool:
        # Unicorn may look up the *next* instruction before stopping; instruction
        # fetch is the model's business, so only data accesses count as faults.
        if access not in (unicorn.UC_MEM_FETCH_UNMAPPED, unicorn.UC_MEM_FETCH_PROT):
            self.fault = f"bad access at {addr:#x}"
        return False

    def run(self, pc_index: int, regs: bytes, insn: bytes, plan: Sequence[bytes]) -> Outcome:
        ctypes.memmove(self.vals, regs, 8 * self.nregs)
        lib = _ucmod.uclib
        if lib.uc_reg_write_batch(self.handle, self.ids, self.ptrs, self.nregs) != 0:
            raise ModelError("Unicorn refused the register file")
        pc = self.vals[pc_index]
        if self.translated.get(pc) != insn:
            # A translated block keeps executing its old bytes until removed.
            self.uc.ctl_remove_cache(pc, pc + len(insn))
            self.translated[pc] = insn
        self.poke(pc, insn)
        self._start(pc, UNTIL, 1, plan)
        lib.uc_reg_read_batch(self.handle, self.ids, self.ptrs, self.nregs)
        if self.vals[pc_index] == pc and any(a.kind == "W" for a in self.accesses) and not self.fault:
            # x86: a store into a page holding translated code makes QEMU invalidate the
            # block and restart the instruction, which the count=1 budget then never
            # completes (tests/model/test_unicorn_pins.py).  Run it again up to its end.
            ctypes.memmove(self.vals, regs, 8 * self.nregs)
            lib.uc_reg_write_batch(self.handle, self.ids, self.ptrs, self.nregs)
            self.uc.ctl_remove_cache(pc, pc + len(insn))
            self.poke(pc, insn)
            self._start(pc, pc + len(insn), 8, plan)
            lib.uc_reg_read_batch(self.handle, self.ids, self.ptrs, self.nregs)
        return Outcome(bytes(self.vals), tuple(self.accesses), self.fault)

    def quantum(self, pc_index: int, regs: bytes, seconds: float) -> bytes:
        """Run natively from PC until the next stop point.

        No instruction count: Unicorn's count hook alone costs ~25x on tight loops,
        and the end point is deterministic anyway (register-only code in immutable
        pages cannot observe other CPUs).  ``seconds`` only bounds a register-only
        infinite loop, which is reported.
        """
        ctypes.memmove(self.vals, regs, 8 * self.nregs)
        lib = _ucmod.uclib
        lib.uc_reg_write_batch(self.handle, self.ids, self.ptrs, self.nregs)
        self.fast = True
        self.stopped = False
        self.accesses = []
        self.fault = ""
        # count=0 after counted runs flushes every translated block (probe notes);
        # harmless here: the executor never relies on Unicorn's cache for semantics.
        self.translated.clear()
        try:
            self.uc.emu_start(self.vals[pc_index], UNTIL, timeout=int(seconds * 1e6), count=0)
        except unicorn.unicorn.UcError as exc:
            self.fault = str(exc)
        finally:
            self.fast = False
        if self.accesses or self.fault:
            raise ModelError(f"a quantum touched memory or faulted ({self.fault or self.accesses[0]})")
        if not self.stopped:
            raise ModelError(f"guest code ran {seconds:.0f} s without touching memory (an endless register-only loop?)")
        lib.uc_reg_read_batch(self.handle, self.ids, self.ptrs, self.nregs)
        return bytes(self.vals)

    def _start(self, pc: int, until: int, count: int, plan: Sequence[bytes]) -> None:
        self.plan = list(plan)
        self.accesses = []
        self.fault = ""
        try:
            self.uc.emu_start(pc, until, count=count)
        except unicorn.unicorn.UcError as exc:
            if not self.fault and exc.errno not in (unicorn.UC_ERR_FETCH_UNMAPPED, unicorn.UC_ERR_FETCH_PROT):
                self.fault = str(exc)


@dataclass(frozen=True)
class FastCode:
    """Code no one can modify, classified: ``stops`` are the instructions the model
    must perform itself (memory accesses, barriers, maintenance, traps, exits)."""

    ranges: tuple[tuple[int, int], ...] = ()
    stops: frozenset[int] = frozenset()
    #: (address, bytes) of that code, placed in every CPU's scratch memory
    code: tuple[tuple[int, bytes], ...] = ()

    def covers(self, pc: int) -> bool:
        return pc not in self.stops and any(lo <= pc < hi for lo, hi in self.ranges)


class Executor:
    """Per-CPU Unicorn instances plus a shared memo of instruction outcomes."""

    def __init__(
        self,
        arch: tuple[int, int],
        regions: Sequence[tuple[int, int]],
        registers: Sequence[int],
        pc_index: int,
        cpus: int,
        fast: FastCode | None = None,
        *,
        cpu_model: int | None = None,
    ) -> None:
        for base, size in regions:
            if base % PAGE or size % PAGE or base <= UNTIL < base + size:
                raise ModelError(f"guest region {base:#x}+{size:#x} is not page aligned or overlaps the stop page")
        self.fast = fast or FastCode()
        self._cpus = [_Cpu(arch, regions, registers, self.fast, cpu_model) for _ in range(cpus)]
        self.pc_index = pc_index
        self._memo: dict[tuple[bytes, bytes, tuple[bytes, ...] | None], Outcome] = {}
        self.executed = 0
        self.memo_hits = 0

    def run(self, cpu: int, regs: bytes, insn: bytes, plan: tuple[bytes, ...] | None) -> Outcome:
        """Execute one instruction; ``plan`` gives load values (``None``: discover accesses)."""
        key = (insn, regs, plan)
        hit = self._memo.get(key)
        if hit is not None:
            self.memo_hits += 1
            return hit
        outcome = self._cpus[cpu].run(self.pc_index, regs, insn, plan or ())
        self.executed += 1
        if len(self._memo) > 500_000:
            self._memo.clear()
        self._memo[key] = outcome
        return outcome

    def quantum(self, cpu: int, regs: bytes, seconds: float) -> bytes:
        self.executed += 1
        return self._cpus[cpu].quantum(self.pc_index, regs, seconds)

    def instance(self, cpu: int) -> unicorn.unicorn.Uc:
        return self._cpus[cpu].uc
