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
    #: "alu", "load", "store", "atomic", "branch", "fence", "isb", "dc", "ic", "tlbi",
    #: "eret", "svc", "trap", "nop", "undefined", "halt", "incomplete" (needs more bytes)
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
    #: For fences: a key of the architecture's fence rules.
    fence: str = ""
    #: For DC/IC/TLBI: the register holding the VA (None: whole cache / all entries).
    va_reg: int | None = None
    #: TLBI ...IS: broadcast to the inner shareable domain.
    broadcast: bool = False


@dataclass(frozen=True)
class FenceRule:
    drain: bool = False
    complete: bool = False
    order_stores: bool = False
    joins: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: This instruction is a context-synchronization event (discards fetched instructions).
    cse: bool = False



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

