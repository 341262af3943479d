"""The verification catalog: every scenario, in one explicit tuple.

Each entry names a hazard from the seed texts and the function building its variants
(in ``_jit``, ``_gate``, ``_reuse``, ``_tlb`` and ``_update``, over the guest helpers of
``_guest``).  Nothing registers itself on import: a scenario is in the catalog
because it is listed here.
"""

from __future__ import annotations

from execmem._errors import ExecmemError
from execmem.verify import _gate, _jit, _reuse, _tlb, _update
from execmem.verify._framework import Scenario, Variant

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("jit-publish", "alloc / write / map, then publish a function pointer that other CPUs call", "001",
             _jit.jit_publish),
    Scenario("jit-finalize-inplace", "map_rw_inplace / write in place / finalize, then publish", "001",
             _jit.jit_finalize_inplace),
    Scenario("rox-cache-trap-fill", "new code in a trap-filled ROX pack while another CPU runs its neighbour", "001",
             _jit.rox_cache_trap_fill),
    Scenario("call-gate", "a free while a call through function() may be entering the text", "000", _gate.call_gate),
    Scenario("va-reuse", "free and reuse of a virtual address for different code", "000", _reuse.va_reuse),
    Scenario("tlb-batch-remote-dsb",
             "arm64 batched TLB flush: a TLBI completes only at a DSB on the CPU that issued it", "002",
             _tlb.tlb_batch_remote_dsb),
    Scenario("tlb-async-flush",
             "x86 asynchronous TLB shootdown: the page is recycled before remote CPUs dropped the translation", "003",
             _tlb.tlb_async_flush),
    Scenario("torn-update", "in-place update of live code: a torn instruction or sequence is observable", "001",
             _update.torn_update),
    Scenario("alias-write-no-maintenance",
             "code written through an RW alias without cache maintenance vs the mprotect path", "004",
             _update.alias_write_no_maintenance),
)


def scenarios() -> list[Scenario]:
    return list(SCENARIOS)


def variants(*, scenario_name: str | None = None, arch: str | None = None) -> list[Variant]:
    out: list[Variant] = []
    for sc in SCENARIOS:
        if scenario_name and sc.name != scenario_name:
            continue
        out.extend(v for v in sc.variants() if not arch or v.arch == arch)
    return out


def find(variant_id: str) -> Variant:
    """``scenario/variant`` or ``scenario/arch/variant``."""
    parts = variant_id.strip("/").split("/")
    matches = [
        v
        for v in variants(scenario_name=parts[0])
        if (len(parts) == 2 and v.name == parts[1]) or (len(parts) == 3 and (v.arch, v.name) == (parts[1], parts[2]))
    ]
    if len(matches) != 1:
        known = ", ".join(v.id for v in variants(scenario_name=parts[0])) or "none"
        raise ExecmemError(
            f"{'ambiguous' if matches else 'no'} variant {variant_id!r}; give scenario/arch/variant (known: {known})"
        )
    return matches[0]


__all__ = ["SCENARIOS", "find", "scenarios", "variants"]
