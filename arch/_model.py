"""The vocabulary the modeled machine and the per-architecture ``*_isa`` modules share:
what a decoded instruction tells the model, and the ordering rules an architecture
supplies as data (interpreted by ``execmem.emu``, which never names an architecture)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoded:
    """What the model needs to know about one instruction encoding."""

    mnemonic: str
    text: str
    #: "alu", "load", "store", "atomic" (x86 locked: a barrier and an RMW), "rmw" (a
    #: single-copy-atomic read-modify-write), "store_exclusive", "branch", "fence",
    #: "isb", "dc", "ic", "tlbi", "eret", "svc", "trap", "nop", "undefined", "halt",
    #: "incomplete" (needs more bytes)
    op: str
    length: int = 4
    reads: tuple[int, ...] = ()
    writes: tuple[int, ...] = ()
    addr_regs: tuple[int, ...] = ()
    data_regs: tuple[int, ...] = ()
    cond_regs: tuple[int, ...] = ()
    #: "" or "A" (RCsc acquire, LDAR) or "Q" (RCpc acquire, LDAPR)
    acquire: str = ""
    release: bool = False
    #: For fences (and atomics that are also barriers, x86 locked): a key of the
    #: architecture's fence rules.
    fence: str = ""
    #: For DC/IC/TLBI: the register holding the VA (None: whole cache / all entries).
    va_reg: int | None = None
    #: TLBI ...IS: broadcast to the inner shareable domain.
    broadcast: bool = False
    #: TLBI: invalidates every page whatever its operand (by ASID, VMALL...).
    all_pages: bool = False
    #: Load-exclusive: the read arms the exclusive monitor.
    exclusive: bool = False
    #: Compare-and-swap: the register holding the expected value (no write if it differs).
    compare_reg: int | None = None
    #: Store-exclusive: the register receiving the status (0: stored, 1: failed).
    status_reg: int = 0
    #: Bytes accessed, where the model performs the access itself (store-exclusive).
    size: int = 0


@dataclass(frozen=True)
class FenceRule:
    drain: bool = False
    complete: bool = False
    order_stores: bool = False
    joins: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: This instruction is a context-synchronization event (discards fetched instructions).
    cse: bool = False
    #: ``drain`` also waits for the hardware's page-table updates (Arm DSB: its ordering
    #: covers every memory effect; DMB's only explicit accesses).
    implicit: bool = False
    #: ``complete`` completes maintenance for the issuing CPU only (a non-shareable DSB).
    local: bool = False
    #: Wait for the CPU's earlier stores to page-table entries only: they must reach its
    #: own table walker, which is in every shareability domain of the CPU.
    drain_tables: bool = False



@dataclass(frozen=True)
class Descriptor:
    """A page-table entry, decoded into the fields herd's VMSA model names.

    Read permission is implied by ``valid``.  Arm ARM D8.3 (descriptor formats) and
    D8.4.2 (the access flag and dirty state); on x86 (SDM Vol. 3, 4.5) ``db`` is the
    R/W bit and ``af`` the accessed bit, which the hardware always sets.
    """

    oa: int  #: output address: the physical page
    valid: bool = True
    af: bool = True  #: access flag: an access through an entry without it faults unless the hardware sets it
    db: bool = True  #: dirty (writable): a write through a clean entry faults unless the hardware may set it
    dbm: bool = False  #: dirty bit modifier: the hardware may make a clean entry dirty on a write
    x: bool = True  #: instruction fetch allowed
    el0: bool = True  #: accessible from EL0 / user mode

    @classmethod
    def from_perms(cls, oa: int, perms: str) -> Descriptor:
        """A valid entry for ``perms`` (a string of r, w, x: writable, executable)."""
        return cls(oa, db="w" in perms, x="x" in perms)


@dataclass(frozen=True)
class DescriptorFormat:
    """Where an 8-byte page-table entry keeps each :class:`Descriptor` field.

    ``bits`` maps a field name to (mask, inverted): an inverted field is true when its
    bit is clear (Arm's AP[2] read-only bit encodes ``db``, UXN encodes ``x``).  A
    field absent from ``bits`` cannot be represented and always decodes as its default.
    """

    oa: int  #: mask of the output-address bits
    bits: tuple[tuple[str, int, bool], ...]

    def encode(self, d: Descriptor) -> int:
        value = d.oa & self.oa
        for name, mask, inverted in self.bits:
            if bool(getattr(d, name)) != inverted:
                value |= mask
        return value

    def decode(self, value: int) -> Descriptor:
        fields = {name: bool(value & mask) != inverted for name, mask, inverted in self.bits}
        return Descriptor(value & self.oa, **fields)


@dataclass(frozen=True)
class ModelRules:
    """Per-architecture parameters of the modeled machine (see ``execmem.emu``)."""

    #: Coherence granule in bytes (each aligned granule is one location).
    granule: int
    #: Fetches read the latest write at their time (x86, or arm64 with DIC).
    coherent_fetch: bool
    #: A CPU's own stores are always visible to its own fetches (x86 SMC snooping).
    own_stores_visible_to_fetch: bool
    #: Stores leave the store buffer in program order (x86-TSO).
    fifo_stores: bool
    #: Every read is ordered after earlier reads (x86-TSO).
    ordered_reads: bool
    #: Reads carry dependency views (Arm); False when the ordering is total (TSO).
    track_dependencies: bool
    fences: dict[str, FenceRule]
    #: The page-table entry format of dynamic (page-table mapped) pages.
    descriptor: DescriptorFormat
    #: Barriers order translation-table walks like reads (False on Arm, where only
    #: context synchronization and address dependencies do).
    barriers_order_walks: bool = True
    #: The hardware sets the access flag of an entry it walks (x86 always; Arm when
    #: TCR_ELx.HA is set, per CPU: ``Machine.set_hardware_updates``).
    hardware_access_flag: bool = False

