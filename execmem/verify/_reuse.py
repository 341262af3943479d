"""Freeing and reusing a virtual address for different code (seeds/000).

A CPU ran function f; f is freed, its pack empties and is unmapped, and the same
virtual address is mapped again for g (a fresh mapping, published without a
membarrier).  If the CPU took no context-synchronization event since before the
unmap, instructions it fetched from f are still in flight: broadcast TLB
invalidation (arm64 TLBI IS, AMD INVLPGB) does not interrupt it, an IPI shootdown
does.  execmem's quarantine keeps the address out of use until every CPU has been
serialized (an epoch).
"""

from __future__ import annotations

import execmem
from execmem import arch as _arch
from execmem.emu import Machine, MachineState
from execmem.verify._framework import SAFE, UNSAFE, Case, Variant, first_fault
from execmem.verify._guest import FUNCTION

#: CPU1: wait for a pointer, call it (f), wait for "go", call through the pointer again.
_READER = {
    "arm64": "spin1: ldar x1, [x3]\ncbz x1, spin1\nblr x1\nmov x8, x0\n"
             "str x8, [x6]\n"
             "spin2: ldar x2, [x5]\ncbz x2, spin2\nldar x1, [x3]\nblr x1\n",
    "x86_64": "spin1: mov rsi, [rbx]\ntest rsi, rsi\njz spin1\ncall rsi\nmov r8, rax\n"
              "mov [r12], r8\n"
              "spin2: mov rdx, [rbp]\ntest rdx, rdx\njz spin2\nmov rsi, [rbx]\ncall rsi\n",
}
_REGS = {"arm64": ("x3", "x5", "x6", "x0"), "x86_64": ("rbx", "rbp", "r12", "rax")}


def _reuse(arch: str, tlb: str, quarantine: bool) -> Case:
    spec = _arch.get(arch)
    m = Machine(spec if quarantine else spec.without_quarantine(), cpus=2, tlb=tlb)
    # Chunks of the text's size: the trap refill of f's chunk (made before its reuse)
    # is then two stores, as few host steps as the explorer can afford.
    a = execmem.Allocator(backend=m, pack_size=0x1000, granularity=16, keep_empty=0)
    slot, go, called = m.alloc(8), m.alloc(8), m.alloc(8)
    f = a.jit_text_alloc(16)
    f.write(0, execmem.asm(FUNCTION[arch].format(value=1), arch, f.address))
    f.map()
    host = m.host()
    host.store(slot, f.address, release=True, note="publish f")
    host.await_value(called, 1, note="CPU1 has run f")
    host.store(slot, 0, note="unpublish f")
    f.free()  # the pack empties: unmapped (TLB maintenance of this machine's style)
    g = a.jit_text_alloc(16)
    g.write(0, execmem.asm(FUNCTION[arch].format(value=2), arch, g.address))
    g.map()
    reused = g.address == f.address
    host.store(slot, g.address, release=True, note="publish g" + (" at f's address" if reused else ""))
    host.store(go, 1, release=True, note="go")
    ptr, go_reg, called_reg, result = _REGS[arch]
    m.load(1, _READER[arch])
    m.set_reg(1, ptr, slot)
    m.set_reg(1, go_reg, go)
    m.set_reg(1, called_reg, called)
    m.set_reg(1, "x8" if arch == "arm64" else "r8", 0)

    def hazard(st: MachineState) -> str:
        faulted = first_fault(st, (0, 1), "a fault")
        if faulted:
            return faulted
        got = m.reg(st, 1, result) & 0xFFFF_FFFF
        if got != 2:
            return f"CPU1 called g but ran f's old instructions (got {got})"
        return ""

    return Case(m, hazard, ("CPU0 JIT", "CPU1 caller"))


def va_reuse() -> list[Variant]:
    sc = "va-reuse"
    return [
        Variant(sc, "arm64", "execmem", SAFE, "quarantine: the address is reused only after an epoch (membarrier: CPU1 synchronized)",
                lambda: _reuse("arm64", "broadcast", True)),
        Variant(sc, "arm64", "no-quarantine", UNSAFE,
                "broadcast TLBI does not interrupt CPU1: instructions fetched from f stay in flight and run when it calls g",
                lambda: _reuse("arm64", "broadcast", False), "no-quarantine"),
        Variant(sc, "arm64", "no-quarantine-ipi", SAFE,
                "with IPI shootdowns the unmap interrupts CPU1 (exception entry/return synchronize it): quarantine not required",
                lambda: _reuse("arm64", "ipi", False), "no-quarantine"),
        Variant(sc, "x86_64", "execmem", SAFE, "quarantine with IPI shootdowns", lambda: _reuse("x86_64", "ipi", True)),
        Variant(sc, "x86_64", "no-quarantine", SAFE,
                "IPI shootdown: the interrupt serializes CPU1 (the x86 default): quarantine not required",
                lambda: _reuse("x86_64", "ipi", False), "no-quarantine"),
        Variant(sc, "x86_64", "invlpgb", SAFE, "INVLPGB with quarantine: the epoch serializes CPU1",
                lambda: _reuse("x86_64", "invlpgb", True)),
        Variant(sc, "x86_64", "invlpgb-no-quarantine", UNSAFE,
                "INVLPGB+TLBSYNC invalidates without interrupting CPU1, which keeps f's instructions in flight",
                lambda: _reuse("x86_64", "invlpgb", False), "no-quarantine"),
    ]
