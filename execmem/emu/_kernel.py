"""Kernel-side parts of the modeled machine: page-table entries, faults, interrupts,
host actions (translation itself is ``_translate``).

**Page-table entries** are 8-byte locations in model memory in the architecture's
format (``ModelRules.descriptor``), written by host actions, guest stores and the
hardware like any other location.  Broadcast TLB invalidations (arm64 TLBI ...IS,
AMD INVLPGB) complete at the issuer's DSB / TLBSYNC; an IPI shootdown completes on
each target when it handles the interrupt.

**Interrupts.**  An IPI carries the sender's view; the target takes it between two
instructions (or while idle): exception entry and return are context-synchronizing,
so the target's later fetches are ordered after everything the sender did before
sending.  Handlers are model actions: ``cse`` (membarrier), ``tlb`` (local
invalidation of a page), acknowledged to a sender that waits.

**Host actions.**  A CPU can run a *host program* - a list of :class:`HostAction`
(stores through a mapping, DC/IC/TLBI, barriers, PTE writes, IPIs, calls into guest
code).  The allocator's emulated backend records its recipe steps as host actions,
so the explorer interleaves them with guest code on the other CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

from execmem._errors import ModelError
from execmem.arch._model import Descriptor, DescriptorFormat

#: Translation fault kinds, as herd names them (``MMU:<kind>``).
TRANSLATION, ACCESS_FLAG, PERMISSION = "Translation", "AccessFlag", "Permission"


def pte_value(form: DescriptorFormat, ppage: int | None, perms: str) -> int:
    """A page-table entry mapping ``ppage`` with ``perms``; ``None``: invalid (zero)."""
    return 0 if ppage is None else form.encode(Descriptor.from_perms(ppage, perms))


def descriptor_fault(d: Descriptor, access: str, *, hardware_af: bool, hardware_db: bool, user: bool = False) -> str:
    """The fault an ``access`` ("r", "w", "x") through ``d`` takes, or "".

    In the order the Arm ARM checks them (D8.4, and herd's VMSA model): an invalid
    entry is a translation fault; a clear access flag is an access-flag fault unless
    the hardware sets it (TCR_ELx.HA); a write to a clean entry is a permission fault
    unless the hardware may make it dirty (TCR_ELx.HD and the entry's DBM), and so is
    a fetch from a non-executable one, and any access from EL0 (user mode) through an
    entry that does not grant EL0 access (AP[1]; herd's el0).
    """
    if not d.valid:
        return TRANSLATION
    if not d.af and not hardware_af:
        return ACCESS_FLAG
    if access == "w" and not d.db and not (hardware_db and d.dbm):
        return PERMISSION
    if access == "x" and not d.x:
        return PERMISSION
    if user and not d.el0:
        return PERMISSION
    return ""


@dataclass(frozen=True, slots=True)
class HostAction:
    """One step of a host program (see the module docstring).

    kinds and args:
      store (va, data, release)      store through the CPU's translation
      pte (vpage, ppage|None, perms) write a page-table entry (physical, 8 bytes)
      dc (va,) / ic (va|None,)       cache maintenance by VA (None: whole I-cache)
      tlbi (vpage|None, scope)       scope "broadcast" (completes at DSB/TLBSYNC) or "local"
      fence (name,)                  a rule of the architecture (dsb.full, isb, serialize...)
      ipi (targets, kind, vpage)     send interrupts; kind "cse" or "tlb"
      wait ()                        block until every IPI sent so far is acknowledged
      call (entry, args)             run guest code until it returns
      record (register,)             remember a register value (for observations)
      mark (text,)                   a label in the trace
    """

    kind: str
    args: tuple[object, ...] = ()
    note: str = ""


def check_perms(perms: str, access: str) -> str:
    """'' when ``access`` ("r"/"w"/"x") is allowed by a static mapping's ``perms``."""
    return "" if access in perms else PERMISSION


class HostProgram:
    """Appends host actions to one CPU's program (every method returns ``self``)."""

    def __init__(self, actions: list[HostAction], cpu: int, cpus: int, isa: ModuleType) -> None:
        self._actions = actions
        self._cpu = cpu
        self._cpus = cpus
        self._isa = isa

    def _add(self, kind: str, *args: object, note: str = "") -> HostProgram:
        self._actions.append(HostAction(kind, args, note))
        return self

    def store(self, va: int, value: int | bytes, size: int = 8, *, release: bool = False, note: str = "") -> HostProgram:
        data = value if isinstance(value, bytes) else (value & (1 << 8 * size) - 1).to_bytes(size, "little")
        return self._add("store", va, data, release, note=note)

    def dc(self, va: int, note: str = "") -> HostProgram:
        return self._add("dc", va, note=note)

    def ic(self, va: int | None, note: str = "") -> HostProgram:
        return self._add("ic", va, note=note)

    def tlbi(self, vpage: int | None, scope: str = "broadcast", note: str = "") -> HostProgram:
        return self._add("tlbi", vpage, scope, note=note)

    def fence(self, name: str, note: str = "") -> HostProgram:
        if name not in self._isa.MODEL.fences:
            raise ModelError(f"this architecture has no barrier {name!r}")
        return self._add("fence", name, note=note)

    def pte(self, vpage: int, ppage: int | None, perms: str = "rx", note: str = "") -> HostProgram:
        return self._add("pte", vpage, ppage, perms, note=note)

    def ipi(self, targets: Iterable[int], kind: str = "cse", arg: int = -1, *, note: str = "") -> HostProgram:
        return self._add("ipi", tuple(targets), kind, arg, note=note)

    def await_value(self, va: int, value: int, note: str = "") -> HostProgram:
        """Block until the 8 bytes at ``va`` read ``value`` (acquire, like smp_cond_load_acquire)."""
        return self._add("await", va, value, note=note)

    def wait(self, note: str = "") -> HostProgram:
        return self._add("wait", note=note)

    def call(self, entry: int, *args: int, note: str = "") -> HostProgram:
        return self._add("call", entry, tuple(args), note=note)

    def record(self, register: int | str, note: str = "") -> HostProgram:
        index = register if isinstance(register, int) else self._isa.register_index(register)
        return self._add("record", index, note=note)

    def others(self) -> tuple[int, ...]:
        return tuple(c for c in range(self._cpus) if c != self._cpu)
