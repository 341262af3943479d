"""Address translation: page-table walks, TLBs, hardware flag updates, faults.

A page is either *static* (mapped for the whole run, translated without choices) or
*dynamic*: its page-table entry is an 8-byte location in model memory, written like
any other (by host actions, by guest stores, by the hardware).  A walk reads a PTE
write the way a fetch reads code (Simner et al., "Relaxed virtual memory in
Armv8-A", ESOP 2022; herd7's aarch64 VMSA model):

* **TLB.**  A valid entry with its access flag set may be cached, so a translation
  may use any PTE write that no *completed* TLB invalidation covering this CPU has
  superseded (``tlb_floor``; herd's TLBI-ca), checked where the access is placed.
* **Uncacheable entries.**  An invalid entry, or one whose access flag is clear, is
  never cached (Arm ARM D8.13.1; herd's TLBUncacheable): a walk that reads one reads
  memory, no older than the walk's lower bound.
* **Walk order.**  Barriers do not order walks (herd: DSB-ob and bob exclude
  translation reads); the architecture says what does (``ModelRules``): on Arm the
  instruction's fetch (hence a context-synchronization event) and address
  dependencies.
* **Hardware updates.**  With TCR_ELx.HA a walk that finds the access flag clear sets
  it, and with HD a write through a clean entry whose DBM is set makes it dirty
  (Arm ARM D8.4.2): the walk and its update are one atomic read-modify-write of the
  entry, so the walk reads the latest entry and the update is appended to the
  timeline (``Walk.update``).
* **Faults** are classified as herd names them (``_kernel.descriptor_fault``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from execmem.emu._kernel import TRANSLATION, check_perms, descriptor_fault
from execmem.emu._layout import page_of
from execmem.emu._state import CpuState, MachineState
from execmem.emu._timeline import Event, Timeline, W

if TYPE_CHECKING:
    from execmem.emu._semantics import Model


class Walk(NamedTuple):
    """One way to translate an access."""

    pa: int  #: physical address (0 when it faults)
    walked: int  #: position of the PTE write the translation uses (0: initial or static)
    fault: str  #: "" or the fault kind (``Translation``, ``AccessFlag``, ``Permission``)
    update: bytes | None = None  #: the entry the hardware writes back atomically (HA/HD)
    entry: int = 0  #: physical address of the page-table entry (0: static mapping)


def tlb_floor(tl: Timeline, pte: int, vpage: int, anchor: int, cpu: int) -> int:
    """Oldest PTE write a translation placed just after ``anchor`` may still use."""
    latest = 0
    for key in (vpage, -1):
        for pos in tl.tlbis.get(key, ()):
            if pos > anchor:
                break
            scope = tl.events[pos].page
            if (scope == -1 or scope == cpu) and pos > latest:
                latest = pos
    if not latest:
        return 0
    return tl.latest_write_at(pte, latest)


def _entry_writes(model: Model, tl: Timeline, pte: int) -> list[int]:
    return sorted({0, *(p for g in model.granules(pte, 8) for p in tl.write_positions(g))})


def _entry_at(model: Model, tl: Timeline, pte: int, pos: int) -> bytes:
    return b"".join(tl.value_at(g, pos) for g in model.granules(pte, 8))[:8]


def translate(
    model: Model, st: MachineState, cpu: CpuState, va: int, access: str, pre: int, *, at: int | None = None
) -> list[Walk]:
    """Every allowed translation of an ``access`` ("r", "w", "x") to ``va``.

    ``pre`` is the walk's lower bound.  The entry must still be in the TLB where the
    access is placed: ``at`` (a store becomes visible after everything already on the
    timeline), by default just after the walk; reads and faults placed later check
    again with :func:`tlb_usable`.
    """
    page = page_of(va)
    static = model.config.static_map.get(page)
    if static is not None:
        ppage, perms = static
        return [Walk(ppage + va - page, 0, check_perms(perms, access))]
    pte = model.config.pte_addr.get(page)
    if pte is None:
        return [Walk(0, 0, TRANSLATION)]
    tl = st.timeline
    form = model.rules.descriptor
    hardware_af, hardware_db = model.config.hardware[cpu.index]
    hardware_af = hardware_af or hardware_db  # Arm ARM D8.4.2: dirty state management needs HA
    writes = _entry_writes(model, tl, pte)
    latest = writes[-1]
    fresh = max(tl.latest_write_at(g, pre) for g in model.granules(pte, 8))
    out: list[Walk] = []
    for w in writes:
        if w < tlb_floor(tl, pte, page, max(pre, w) if at is None else max(at, w), cpu.index):
            continue  # a completed TLB invalidation removed this entry
        raw = _entry_at(model, tl, pte, w)
        d = form.decode(int.from_bytes(raw, "little"))
        update: bytes | None = None
        set_af = d.valid and not d.af and hardware_af
        set_db = d.valid and access == "w" and not d.db and d.dbm and hardware_db
        if set_af or set_db:
            if w != latest:
                continue  # the update is atomic with a walk of the current entry
            new = replace(d, af=True, db=d.db or set_db)
            value = int.from_bytes(raw, "little")
            for name, mask, _ in form.bits:
                if getattr(new, name) != getattr(d, name):
                    value ^= mask
            update = value.to_bytes(8, "little")
            d = new
        elif not (d.valid and d.af) and w < fresh:
            continue  # never cached: a walk reads memory, after its lower bound
        fault = descriptor_fault(d, access, hardware_af=hardware_af, hardware_db=hardware_db)
        walk = Walk(0 if fault else d.oa + va - page, w, fault, update, pte)
        if walk not in out:
            out.append(walk)
    return out


def apply_update(model: Model, tl: Timeline, cpu: CpuState, walk: Walk) -> Timeline:
    """The timeline with the hardware's write-back of ``walk``'s entry, if it has one.

    The write is the hardware's, not the CPU's: it is ordered by the walk it belongs
    to, not by the CPU's barriers (herd: HU events are not explicit).
    """
    if walk.update is None:
        return tl
    span = len(model.granules(walk.entry, 8))  # entries are 8-byte aligned: whole granules
    return tl.append(Event(W, cpu.index, walk.entry, walk.update, -1, span, note="hardware flag update"))


def tlb_usable(model: Model, st: MachineState, cpu: CpuState, va: int, walked: int, at: int) -> bool:
    """Can a translation from the PTE write at ``walked`` still serve an access (or
    take its fault) at ``at``?  Not after a covering invalidation completed that the
    walk did not see (herd: TLBI-ob orders such an access before the invalidation)."""
    page = page_of(va)
    pte = model.config.pte_addr.get(page)
    if pte is None or page in model.config.static_map:
        return True
    return walked >= tlb_floor(st.timeline, pte, page, max(at, walked), cpu.index)


def spurious(model: Model, st: MachineState, cpu: CpuState, va: int, access: str, walked: int) -> bool:
    """Is a translation fault spurious (a kernel's handler would just return)?

    A walk placed in the past may read an entry that forbade the access then but
    allows it now (a fresh mapping, an mprotect).  A kernel's fault handler finds the
    current entry fine and returns (exception return: context-synchronizing), and the
    instruction is retried after the handler, at the present.
    """
    pte = model.config.pte_addr.get(page_of(va))
    if pte is None:
        return False
    tl = st.timeline
    writes = _entry_writes(model, tl, pte)
    d = model.rules.descriptor.decode(int.from_bytes(_entry_at(model, tl, pte, tl.end), "little"))
    hardware_af, hardware_db = model.config.hardware[cpu.index]
    allowed = not descriptor_fault(d, access, hardware_af=hardware_af or hardware_db, hardware_db=hardware_db)
    return allowed and walked < writes[-1]
