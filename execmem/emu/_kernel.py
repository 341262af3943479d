"""Kernel-side parts of the modeled machine: translation, TLBs, interrupts, host actions.

**Translation.**  A page is either *static* (mapped for the whole run, translated
without choices) or *dynamic*: its page-table entry is an 8-byte location in model
memory, written by host actions like any other store.  A translation reads a PTE
write the way an instruction fetch reads code (ESOP 2022, "Relaxed virtual memory
in Armv8-A"): the TLB may hold an old entry until a TLB invalidation that covers
this CPU *completes*; after it, only the PTE value current at the invalidation or
a newer one can be used.  Broadcast invalidations (arm64 TLBI ...IS, AMD INVLPGB)
complete at the issuer's DSB / TLBSYNC; an IPI shootdown completes on each target
when it handles the interrupt.

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

from dataclasses import dataclass

from execmem._errors import ModelError
from execmem.emu._layout import PAGE

#: PTE bits (the model's own format).
PTE_VALID, PTE_READ, PTE_WRITE, PTE_EXEC = 1, 2, 4, 8
_PERM_BITS = {"r": PTE_READ, "w": PTE_WRITE, "x": PTE_EXEC}


def pte_value(ppage: int | None, perms: str) -> int:
    """Encode a PTE: ``None`` for an invalid (unmapped) entry."""
    if ppage is None:
        return 0
    bits = PTE_VALID
    for p in perms:
        bits |= _PERM_BITS[p]
    return (ppage & ~(PAGE - 1)) | bits


def pte_decode(value: int) -> tuple[int, str] | None:
    if not value & PTE_VALID:
        return None
    perms = "".join(p for p, bit in _PERM_BITS.items() if value & bit)
    return value & ~(PAGE - 1) & ((1 << 48) - 1), perms


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


def tlb_floor(tl: object, pte_granule: int, vpage: int, anchor: int, cpu: int) -> int:
    """Oldest PTE write a translation placed just after ``anchor`` may still use."""
    tlbis: dict[int, tuple[int, ...]] = tl.tlbis  # type: ignore[attr-defined]
    events = tl.events  # type: ignore[attr-defined]
    latest = 0
    for key in (vpage, -1):
        for pos in tlbis.get(key, ()):
            if pos > anchor:
                break
            scope = events[pos].page
            if (scope == -1 or scope == cpu) and pos > latest:
                latest = pos
    if not latest:
        return 0
    return tl.latest_write_at(pte_granule, latest)  # type: ignore[attr-defined,no-any-return]


def check_perms(perms: str, access: str) -> str:
    """'' when ``access`` ("r"/"w"/"x") is allowed by ``perms``, else the fault name."""
    if access in perms:
        return ""
    return "PermissionFault"


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ModelError(message)
