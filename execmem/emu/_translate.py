"""Address translation: page-table walks, TLBs, hardware flag updates, faults.

A page is either *static* (mapped for the whole run, translated without choices) or
*dynamic*: its page-table entry is an 8-byte location in model memory, written like
any other (by host actions, by guest stores, by the hardware).  A walk reads a PTE
write the way a fetch reads code (Simner et al., "Relaxed virtual memory in
Armv8-A", ESOP 2022; herd7's aarch64 VMSA model):

* **TLB.**  A valid entry with its access flag set may be cached, so a translation
  may use any PTE write that no *completed* TLB invalidation covering this CPU has
  superseded (``tlb_floor``; herd's TLBI-ca).  Another CPU's invalidation is checked
  where the access (or its fault) is placed: accesses translated before it completes
  are ordered before what follows its issuer's DSB (herd's TLBI-ob, for accesses of
  other threads only).  The CPU's own invalidation constrains only its walks: a walk
  placed before it (nothing but a context-synchronization event orders later walks
  after a DSB) still serves accesses after the DSB.
* **Uncacheable entries.**  An invalid entry, or one whose access flag is clear, is
  never cached (Arm ARM D8.13.1; herd's TLBUncacheable): a walk that reads one reads
  memory, no older than the walk's lower bound.
* **Walk order.**  Barriers do not order walks (herd: DSB-ob and bob exclude
  translation reads); the architecture says what does (``ModelRules``): on Arm the
  instruction's fetch (hence a context-synchronization event) and address
  dependencies.
* **Hardware updates.**  With TCR_ELx.HA a walk that finds the access flag clear sets
  it, and with HD a write through a clean entry whose DBM is set makes it dirty
  (Arm ARM D8.4.2).  The walk and its update are one atomic read-modify-write of the
  entry: the walk reads the latest entry, and the update waits in the CPU's store
  buffer (it is not ordered before the CPU's later accesses: herd's HU events are
  not explicit) until it becomes visible, which only the write it read may precede
  (``Store.expect``); meanwhile no other write to the entry can become visible, and
  the CPU's own later walks use the updated entry (its TLB holds it).  The hardware
  may also set a clear access flag spontaneously, as a speculative walk does
  (Arm ARM D8.4.2; herd's spurious AF updates): ``spontaneous_updates``.
* **Faults** are classified as herd names them (``_kernel.descriptor_fault``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from execmem.emu._kernel import PERMISSION, TRANSLATION, check_perms, descriptor_fault
from execmem.emu._layout import PAGE, page_of
from execmem.emu._state import CpuState, MachineState, Step, Store, Transition, get, put
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


def tlb_floor(tl: Timeline, pte: int, vpage: int, anchor: int, cpu: int, *, own: bool) -> int:
    """Oldest PTE write a translation placed just after ``anchor`` may still use, given
    the completed invalidations covering ``cpu`` that it issued (``own``) or not."""
    latest = 0
    for key in (vpage, -1):
        for pos in tl.tlbis.get(key, ()):
            if pos > anchor:
                break
            event = tl.events[pos]
            if event.page in (-1, cpu) and (event.cpu == cpu) == own and pos > latest:
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
    user = model.config.user[cpu.index]
    if static is not None:
        ppage, perms = static
        fault = check_perms(perms, access) or (PERMISSION if user and page in model.config.kernel_pages else "")
        return [Walk(ppage + va - page, 0, fault)]
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
    in_flight = False
    for s in cpu.sb:
        if s.hardware and s.addr == pte and s.expect == latest:
            in_flight = True
            # The TLB holds the entry this CPU's walk updated (the update is in flight).
            d = form.decode(int.from_bytes(s.data[:8], "little"))
            if not (access == "w" and not d.db and d.dbm and hardware_db):
                fault = descriptor_fault(d, access, hardware_af=True, hardware_db=hardware_db, user=user)
                out.append(Walk(0 if fault else d.oa + va - page, latest, fault, None, pte))
    ordered = get(cpu.walk_floor, _ordering_key(pte, va))
    for w in writes:
        anchor = max(pre, w)
        if w < tlb_floor(tl, pte, page, anchor, cpu.index, own=True):
            continue  # a completed TLB invalidation of this CPU's removed this entry
        raw = _entry_at(model, tl, pte, w)
        d = form.decode(int.from_bytes(raw, "little"))
        update: bytes | None = None
        set_af = d.valid and not d.af and hardware_af
        set_db = d.valid and access == "w" and not d.db and d.dbm and hardware_db
        if set_af or set_db:
            if w != latest or in_flight:
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
        fault = descriptor_fault(d, access, hardware_af=hardware_af, hardware_db=hardware_db, user=user)
        if w < ordered and not fault:
            continue  # an earlier translation of the page came after an invalidation
        # (a fault is placed by the caller, which checks it with tlb_usable)
        if w < tlb_floor(tl, pte, page, anchor if at is None or fault else max(at, w), cpu.index, own=False):
            continue  # another CPU's completed TLB invalidation removed this entry
        walk = Walk(0 if fault else d.oa + va - page, w, fault, update, pte)
        if walk not in out:
            out.append(walk)
    return out


def _ordering_key(entry: int, va: int) -> int:
    return entry << 12 | va % PAGE


def note_order(model: Model, st: MachineState, cpu: CpuState, va: int, walk: Walk) -> None:
    """A translation that used a PTE write made after a completed TLB invalidation was
    walked after it, so the CPU's later accesses to the same address come after it
    too: they may no longer use what it removed (herd's TLBI-ob: a po-earlier
    translation for an access with the same low-order address bits is ordered before
    whatever a later access's is; a later fault is not such an access)."""
    if not walk.entry:
        return
    tl = st.timeline
    page = page_of(va)
    floor = max(tlb_floor(tl, walk.entry, page, walk.walked, cpu.index, own=own) for own in (True, False))
    key = _ordering_key(walk.entry, va)
    if floor > get(cpu.walk_floor, key):
        cpu.walk_floor = put(cpu.walk_floor, key, floor)


def note(model: Model, st: MachineState, cpu: CpuState, va: int, walk: Walk, walk_pre: int, access: int) -> None:
    """Both notes for a translation used by an access (or fault) placed at ``access``."""
    note_order(model, st, cpu, va, walk)
    note_stale(model, st, cpu, walk.entry, walk.walked, max(walk_pre, walk.walked), access)


def note_stale(model: Model, st: MachineState, cpu: CpuState, entry: int, walked: int, anchor: int, access: int) -> None:
    """Remember a translation through a superseded entry (the PTE write at ``walked``
    has a successor), walked at ``anchor`` and used by an access (or fault) at
    ``access``.  A TLB invalidation completed later is placed on the timeline then,
    possibly in the past: it may not go where it would have removed that entry from
    this CPU's TLB before the walk (its own invalidation) or before the access
    (another CPU's: herd's TLBI-ob), see :func:`invalidation_allowed`.  A translation
    through the latest entry needs no note: an invalidation placed before the access
    cannot supersede it, since page-table writes are only ever appended."""
    if superseded(model, st.timeline, entry, walked):
        cpu.stale = (*cpu.stale, (entry, walked, anchor, access))


def superseded(model: Model, tl: Timeline, entry: int, walked: int) -> bool:
    """Has a page-table write after position ``walked`` replaced the entry at ``entry``
    (0: a static mapping, never replaced)?"""
    return bool(entry) and walked < max(tl.latest_write_at(g, tl.end) for g in model.granules(entry, 8))


def invalidation_allowed(
    model: Model, tl: Timeline, cpus: Sequence[CpuState], issuer: int, scope: int, page: int, after: int
) -> bool:
    """May a TLB invalidation of ``page`` (-1: all) by ``issuer``, completed for ``scope``
    (-1: every CPU), be placed just after position ``after``?"""
    for cpu in cpus if scope == -1 else [cpus[scope]]:
        for entry, walked, anchor, access in cpu.stale:
            if page != -1 and model.config.pte_addr.get(page) != entry:
                continue
            bound = anchor if cpu.index == issuer else access
            if bound > after and walked < tl.latest_write_at(entry, after):
                return False
    return True


def buffer_update(model: Model, cpu: CpuState, walk: Walk, pc: int) -> None:
    """Put the hardware's write-back of ``walk``'s entry, if it has one, in the CPU's
    store buffer (see the module docstring)."""
    if walk.update is None:
        return
    span = len(model.granules(walk.entry, 8))  # entries are 8-byte aligned: whole granules
    update = Store(cpu.seq, walk.entry, span, walk.update.ljust(span * model.granule, b"\0"), -1, 0, 0,
                   False, 0, walk.entry, pc, hardware=True, expect=walk.walked)
    cpu.seq += 1
    cpu.sb = (*cpu.sb, update)


def update_pending(st: MachineState, c: int, granules: list[int]) -> bool:
    """Is another CPU's hardware update of one of ``granules`` still to become visible
    right after the write it read?  Then no other write to them may come first."""
    tl = st.timeline
    for other in st.cpus:
        if other.index == c:
            continue
        for s in other.sb:
            covers = any(s.addr <= g < s.addr + s.span * tl.granule for g in granules)
            if s.hardware and covers and s.expect == tl.latest_write_at(s.addr, tl.end):
                return True
    return False


def spontaneous_updates(model: Model, st: MachineState) -> list[Transition]:
    """The hardware sets the access flag of a valid entry whose latest write cleared it,
    as a speculative walk may, on a machine where some CPU manages the flag (herd adds
    such a spurious update after every write of a PTE with af:0, including initial ones)."""
    managing = [c for c, (af, db) in enumerate(model.config.hardware) if af or db]
    if not managing:
        return []
    tl = st.timeline
    form = model.rules.descriptor
    out: list[Transition] = []
    for page, pte in sorted(model.config.pte_addr.items()):
        gs = model.granules(pte, 8)
        latest = max(tl.latest_write_at(g, tl.end) for g in gs)
        d = form.decode(int.from_bytes(_entry_at(model, tl, pte, tl.end), "little"))
        if not d.valid or d.af or update_pending(st, -1, gs):
            continue
        value = int.from_bytes(_entry_at(model, tl, pte, tl.end), "little") ^ next(m for n, m, _ in form.bits if n == "af")
        new_tl = tl.append(Event(W, managing[0], pte, value.to_bytes(8, "little").ljust(len(gs) * model.granule, b"\0"),
                                 -1, len(gs), note="spontaneous access flag update"))
        step = Step(managing[0], "store", 0, f"hardware sets the access flag of {page:#x}", f"after @{latest}, visible @{new_tl.end}")
        out.append((step, MachineState(new_tl, st.cpus)))
    return out


def tlb_usable(model: Model, st: MachineState, cpu: CpuState, va: int, walked: int, at: int) -> bool:
    """Can a translation from the PTE write at ``walked`` still serve an access (or
    take its fault) at ``at``?  Not after a covering invalidation completed that the
    walk did not see (herd: TLBI-ob orders such an access before the invalidation)."""
    page = page_of(va)
    pte = model.config.pte_addr.get(page)
    if pte is None or page in model.config.static_map:
        return True
    return walked >= tlb_floor(st.timeline, pte, page, max(at, walked), cpu.index, own=False)


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
