"""JIT scenarios: execmem's allocator running on the modeled machine, publishing
code that other CPUs call through a function pointer (see ``_guest``)."""

from __future__ import annotations

from collections.abc import Callable

import execmem
from execmem import arch as _arch
from execmem.emu import Machine, MachineState
from execmem.verify._framework import SAFE, UNSAFE, Case, Variant, first_fault
from execmem.verify._guest import (
    ANSWER,
    CALLER,
    FUNCTION,
    POINTER_REG,
    RESULT_REG,
    allocator,
    caller_hazard,
    mutated,
    text,
)


def _publish_flow(arch: str, *, flow: str, spec: _arch.ArchSpec | None = None, cpus: int = 2, **machine: object) -> Case:
    """alloc / write / map, publish a pointer; other CPUs call through it.

    flow "live": the pack already holds a live text (its pages are mapped), so the
    new code lands on trap filler other CPUs may already have fetched;
    flow "fresh": the first text of a new pack (mapped by the publish);
    flow "inplace": map_rw_inplace / write / finalize instead of write / map.
    The writer also calls the new function itself.
    """
    m = Machine(spec or arch, cpus=cpus, **machine)  # type: ignore[arg-type]
    a = allocator(m)
    slot = m.alloc(8)
    if flow == "live":
        warm = text(a, arch, 7)
        warm.map()
    if flow == "inplace":
        t = a.jit_text_alloc(16)
        t.map_rw_inplace()
        t.write(0, execmem.asm(FUNCTION[arch].format(value=ANSWER), arch, t.address))
        t.finalize()
    else:
        t = text(a, arch, ANSWER)
        t.map()
    host = m.host()
    host.store(slot, t.address, note="publish the function pointer")
    host.call(t.address, note="the writer calls it too").record(RESULT_REG[arch])
    readers = tuple(range(1, cpus))
    for c in readers:
        m.load(c, CALLER[arch])
        m.set_reg(c, POINTER_REG[arch], slot)
    return Case(m, caller_hazard(m, arch, readers, ANSWER, writer=True), ("CPU0 writer", *(f"CPU{c} caller" for c in readers)))


def _v(sc: str, arch: str, name: str, expected: str, why: str, build: Callable[[], Case], mutation: str = "") -> Variant:
    return Variant(sc, arch, name, expected, why, build, mutation)


def jit_publish() -> list[Variant]:
    sc = "jit-publish"
    out = [
        _v(sc, "arm64", "execmem", SAFE, "DC CVAU, DSB, IC IVAU, DSB, ISB, membarrier before the pointer is published",
           lambda: _publish_flow("arm64", flow="live")),
        _v(sc, "arm64", "no-dc", UNSAFE, "without the clean, the invalidated I-cache refills the trap filler from the point of unification",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="clean_dcache")), "no-dc"),
        _v(sc, "arm64", "no-dc-idc", SAFE, "CTR_EL0.IDC=1: the data cache needs no clean to the point of unification, so the DC step is not required",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="clean_dcache"), idc=True), "no-dc"),
        _v(sc, "arm64", "no-ic", UNSAFE, "without the invalidate, instruction caches keep the trap filler",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="invalidate_icache")), "no-ic"),
        _v(sc, "arm64", "no-ic-dic", SAFE, "CTR_EL0.DIC=1: instruction caches are coherent, so the IC step is not required",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="invalidate_icache"), dic=True), "no-ic"),
        _v(sc, "arm64", "no-dsb", UNSAFE, "without DSB the IC never completes and the code stores may still be buffered",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="barrier")), "no-dsb"),
        _v(sc, "arm64", "no-isb-1cpu", UNSAFE,
           "single-threaded (membarrier skipped): the writer's only context synchronization is the ISB; without it it may run fetched trap filler",
           lambda: _publish_flow("arm64", flow="live", cpus=1, spec=mutated("arm64", "publish", without="local_cse")), "no-isb"),
        _v(sc, "arm64", "no-isb", SAFE,
           "with other threads the recipe's membarrier returns to the writer through an exception return, itself context-synchronizing (EOS=1, as Linux configures): the ISB is not required",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="local_cse")), "no-isb"),
        _v(sc, "arm64", "execmem-1cpu", SAFE, "single-threaded: DC, DSB, IC, DSB, ISB", lambda: _publish_flow("arm64", flow="live", cpus=1)),
        _v(sc, "arm64", "no-remote-cse", UNSAFE,
           "another CPU may have fetched the trap filler before the maintenance and run it after reading the pointer (miniJit01)",
           lambda: _publish_flow("arm64", flow="live", spec=mutated("arm64", "publish", without="remote_cse")), "no-remote-cse"),
        _v(sc, "arm64", "fresh", SAFE, "first text of a new pack: maintenance, then map; nothing could be fetched from the unmapped VA, so no membarrier",
           lambda: _publish_flow("arm64", flow="fresh")),
        _v(sc, "arm64", "map-before-write", UNSAFE, "mapped before the code is written: other CPUs may fetch trap filler or partial code and nothing synchronizes them",
           lambda: _publish_flow("arm64", flow="fresh", spec=mutated("arm64", "publish_fresh", moved=("map", "write"))), "map-before-write"),
        _v(sc, "x86_64", "execmem", SAFE, "serialize locally, membarrier SYNC_CORE before publishing",
           lambda: _publish_flow("x86_64", flow="live")),
        _v(sc, "x86_64", "no-serialize", UNSAFE, "cross-modifying code without serialization: another CPU may run trap filler it fetched earlier (SDM 9.1.3)",
           lambda: _publish_flow("x86_64", flow="live", spec=mutated("x86_64", "publish", without="local_cse+remote_cse")), "no-serialize"),
        _v(sc, "x86_64", "fresh", SAFE, "first text of a new pack: written, then mapped; no membarrier needed",
           lambda: _publish_flow("x86_64", flow="fresh")),
        _v(sc, "x86_64", "map-before-write", UNSAFE, "mapped before written: another CPU may fetch trap filler and nothing serializes it",
           lambda: _publish_flow("x86_64", flow="fresh", spec=mutated("x86_64", "publish_fresh", moved=("map", "write"))), "map-before-write"),
    ]
    return out


def jit_finalize_inplace() -> list[Variant]:
    sc = "jit-finalize-inplace"
    return [
        _v(sc, "arm64", "execmem", SAFE, "finalize runs the same recipe as map", lambda: _publish_flow("arm64", flow="inplace")),
        _v(sc, "arm64", "no-dc", UNSAFE, "written in place but not cleaned",
           lambda: _publish_flow("arm64", flow="inplace", spec=mutated("arm64", "publish_fresh", without="clean_dcache")), "no-dc"),
        _v(sc, "arm64", "no-ic", UNSAFE, "written in place but stale instruction cache lines remain",
           lambda: _publish_flow("arm64", flow="inplace", spec=mutated("arm64", "publish_fresh", without="invalidate_icache")), "no-ic"),
        _v(sc, "arm64", "map-before-maintenance", UNSAFE,
           "mapped executable before the clean and invalidate of the in-place writes",
           lambda: _publish_flow("arm64", flow="inplace", spec=mutated("arm64", "publish_fresh", moved=("map", "clean_dcache"))), "map-before-write"),
        _v(sc, "x86_64", "execmem", SAFE, "finalize maps the written code", lambda: _publish_flow("x86_64", flow="inplace")),
    ]


def _trap_fill(arch: str, *, spec: _arch.ArchSpec | None = None, **machine: object) -> Case:
    """CPU1 keeps calling a function in a ROX pack while new code lands next to it."""
    m = Machine(spec or arch, cpus=2, **machine)  # type: ignore[arg-type]
    a = allocator(m)
    neighbour = text(a, arch, 7)
    neighbour.map()
    slot = m.alloc(8)
    m.host().store(slot, neighbour.address, note="publish the neighbour")
    t = text(a, arch, ANSWER)
    t.map()
    m.host().store(slot, t.address, note="publish the new function")
    m.load(1, CALLER[arch] + "\n" + CALLER[arch].replace("done", "done2"))
    m.set_reg(1, POINTER_REG[arch], slot)

    def hazard(st: MachineState) -> str:
        faulted = first_fault(st, (1,), "prefetched trap filler")
        if faulted:
            return faulted
        result = m.reg(st, 1, RESULT_REG[arch]) & 0xFFFF_FFFF
        if result not in (0, 7, ANSWER):  # 0: it never found a pointer to call
            return f"CPU1 got {result:#x}"
        return ""

    return Case(m, hazard, ("CPU0 writer", "CPU1 caller"))


def rox_cache_trap_fill() -> list[Variant]:
    sc = "rox-cache-trap-fill"
    return [
        _v(sc, "arm64", "execmem", SAFE, "maintenance and membarrier before the pointer is published", lambda: _trap_fill("arm64")),
        _v(sc, "arm64", "no-remote-cse", UNSAFE, "CPU1 may run trap filler it prefetched from the pack",
           lambda: _trap_fill("arm64", spec=mutated("arm64", "publish", without="remote_cse")), "no-remote-cse"),
        _v(sc, "arm64", "no-ic", UNSAFE, "CPU1's instruction cache may keep the trap filler",
           lambda: _trap_fill("arm64", spec=mutated("arm64", "publish", without="invalidate_icache")), "no-ic"),
        _v(sc, "x86_64", "execmem", SAFE, "membarrier before the pointer is published", lambda: _trap_fill("x86_64")),
        _v(sc, "x86_64", "no-serialize", UNSAFE, "CPU1 may run trap filler fetched before the stores",
           lambda: _trap_fill("x86_64", spec=mutated("x86_64", "publish", without="local_cse+remote_cse")), "no-serialize"),
    ]
