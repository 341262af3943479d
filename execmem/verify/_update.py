"""Live patching (``torn-update``) and writing code through an alias without cache
maintenance (``alias-write-no-maintenance``, seeds/004)."""

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

#: (old function, new function, patch: (offset, new bytes) or None for a raw rewrite)
_SHAPES = {
    # arm64: B <-> NOP are both on the CMODX list: one atomic 4-byte store is safe.
    ("arm64", "update"): ("b l1\nmovz x0, #1\nret\nl1: movz x0, #2\nret", None, (0, 0xD503201F.to_bytes(4, "little"))),
    # arm64: a two-instruction constant rewritten instruction by instruction.
    ("arm64", "in-place"): (
        "movz x0, #0x1111\nmovk x0, #0x1111, lsl #16\nret",
        "movz x0, #0x2222\nmovk x0, #0x2222, lsl #16\nret",
        None,
    ),
    # x86: a whole 5-byte instruction inside one aligned 8-byte word.
    ("x86_64", "update"): ("mov eax, 1\nret", None, (0, bytes([0xB8, 2, 0, 0, 0]))),
    # x86: the same kind of instruction straddling two 8-byte words.
    ("x86_64", "in-place"): (
        ".byte 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00\nmov eax, 0x11111111\nret",
        ".byte 0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00\nmov eax, 0x22222222\nret",
        None,
    ),
}


def _torn(arch: str, kind: str) -> Case:
    old_src, new_src, patch = _SHAPES[(arch, kind)]
    m = Machine(arch, cpus=2)
    a = allocator(m)
    t = a.jit_text_alloc(32)
    t.write(0, execmem.asm(old_src, arch, t.address))
    t.map()
    slot = m.alloc(8)
    m.host().store(slot, t.address)
    m.host().fence(m.isa.STEP_FENCES["barrier"][0])
    m.load(1, CALLER[arch])
    m.set_reg(1, POINTER_REG[arch], slot)
    if patch is not None:
        t.update(*patch)
        valid = {1, 2}
    else:
        assert new_src is not None
        new = execmem.asm(new_src, arch, t.address)
        # What a naive JIT does: rewrite the live code with ordinary stores (then
        # synchronize perfectly) - one store per instruction / per aligned word.
        word = 4 if arch == "arm64" else 8
        alias = m._alias_of(t.address)
        for off in range(0, len(new), word):
            m.host().store(alias + off, new[off : off + word], len(new[off : off + word]), note="in-place store")
        for step in m.spec.patch.names:
            if step != "atomic_store":
                m.run_step(step, [(t.address, len(new))])
        valid = {0x11111111, 0x22222222}

    def hazard(st: MachineState) -> str:
        faulted = first_fault(st, (1,), "executed a torn instruction")
        if faulted:
            return faulted
        if m.reg(st, 1, "x1" if arch == "arm64" else "rsi"):
            result = m.reg(st, 1, RESULT_REG[arch]) & 0xFFFF_FFFF
            if result not in valid:
                return f"CPU1 got {result:#x}: a mix of old and new code"
        return ""

    return Case(m, hazard, ("CPU0 patcher", "CPU1 caller"))


def torn_update() -> list[Variant]:
    sc = "torn-update"
    return [
        Variant(sc, "arm64", "update", SAFE, "update(): one 4-byte store, old and new both on the CMODX list (B -> NOP)",
                lambda: _torn("arm64", "update")),
        Variant(sc, "arm64", "in-place", UNSAFE,
                "a MOVZ/MOVK pair rewritten by two stores: a caller may run the new first and the old second instruction "
                "(update() refuses this shape: MOVZ is not on the CMODX list)",
                lambda: _torn("arm64", "in-place")),
        Variant(sc, "x86_64", "update", SAFE, "update(): one aligned 8-byte store replaces a whole instruction",
                lambda: _torn("x86_64", "update")),
        Variant(sc, "x86_64", "in-place", UNSAFE,
                "an instruction straddling two 8-byte words rewritten by two stores: fetch may combine old and new words "
                "(update() refuses this shape)",
                lambda: _torn("x86_64", "in-place")),
    ]


def _alias(arch: str, path: str) -> Case:
    """Code written through a writable alias, then called by another CPU."""
    # (x86-64's recipe has no maintenance steps to remove.)
    maintained = "clean_dcache" in _arch.get(arch).publish.names
    no_maintenance = path == "no-maintenance" and maintained
    m = Machine(mutated(arch, "publish", without="clean_dcache+invalidate_icache") if no_maintenance else arch, cpus=2)
    slot = m.alloc(8)
    hazard: Callable[[MachineState], str]
    if path == "mprotect":
        # The JIT writes into its page while it is mapped read+write, then asks the
        # kernel for read+execute: set_pte_at cleans/invalidates, the TLB is flushed,
        # and the system call returns with an exception return (seeds/004).
        page, frame = m.page("rw")
        code = execmem.asm(FUNCTION[arch].format(value=ANSWER), arch, page)
        host = m.host()
        for off in range(0, len(code), 8):
            host.store(frame + off, code[off : off + 8], len(code[off : off + 8]))
        host.fence(m.isa.STEP_FENCES["barrier"][0])
        if "clean_dcache" in m.spec.publish.names:
            host.dc(frame).fence("dsb.full").ic(frame).fence("dsb.full")
        host.pte(page, frame, "rx", note="mprotect: PROT_READ|PROT_EXEC")
        for name in m.isa.STEP_FENCES["before_tlbi"]:
            host.fence(name)
        if m.tlb == "ipi":
            host.tlbi(page, "local").ipi(host.others(), "tlb", page).wait()
        else:
            host.tlbi(page, "broadcast")
            for name in m.isa.STEP_FENCES["complete_tlbi"]:
                host.fence(name)
        for name in m.isa.STEP_FENCES["syscall_return"]:
            host.fence(name)
        target = page
    else:
        a = allocator(m)
        warm = text(a, arch, 7)
        warm.map()
        t = text(a, arch, ANSWER)
        t.map()
        target = t.address
    m.host().store(slot, target, note="publish the function pointer")
    m.load(1, CALLER[arch])
    m.set_reg(1, POINTER_REG[arch], slot)
    hazard = caller_hazard(m, arch, (1,), ANSWER)
    return Case(m, hazard, ("CPU0 JIT", "CPU1 caller"))



def alias_write_no_maintenance() -> list[Variant]:
    sc = "alias-write-no-maintenance"
    return [
        Variant(sc, "arm64", "no-maintenance", UNSAFE,
                "nothing cleans the data cache or invalidates the instruction caches: the caller may run the old bytes",
                lambda: _alias("arm64", "no-maintenance")),
        Variant(sc, "arm64", "execmem", SAFE, "execmem's recipe does the maintenance a write through an alias needs",
                lambda: _alias("arm64", "execmem")),
        Variant(sc, "arm64", "mprotect", SAFE,
                "mprotect(RX): the kernel cleans and invalidates at set_pte_at and returns through a context-synchronizing ERET",
                lambda: _alias("arm64", "mprotect")),
        Variant(sc, "x86_64", "no-maintenance", SAFE,
                "x86 instruction fetch is coherent with stores: with serialization, an alias write needs no cache maintenance",
                lambda: _alias("x86_64", "no-maintenance")),
        Variant(sc, "x86_64", "mprotect", SAFE, "mprotect(RX) with an IPI TLB shootdown", lambda: _alias("x86_64", "mprotect")),
    ]
