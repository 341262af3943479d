"""A free while a call through ``function()`` may be entering the text (issue 12).

``free()`` recycles a text (its trap refill, then reuse) only when the call gates
count no call in flight (``execmem._gates``).  The count is Dekker's handshake: the
gate increments the text's counter, issues a full barrier and reads its *retired*
flag (refusing the call if set); ``free()`` runs the architecture's
``gate_retire`` routine, which sets the flag, issues a full barrier and reads the
counter.  One of the two must see the other's write, or a call enters a text that
the allocator is recycling.

The machine: CPU1 loads a published function pointer and calls through the gate's
accounting (the first instructions of ``ArchSpec.call_gate``, spelled here:
``test_verify`` checks they are the template's); CPU2 runs ``ArchSpec.gate_retire``
for the freeing thread and hands the count to the allocator on CPU0 (release,
acquire), which then refills the text with traps.  The host program cannot branch,
so it refills in every schedule; the states that count are those in which the
retire read zero (with a call in flight the allocator would have pinned the text).
The hazard: CPU1 executing the recycled bytes.  Mutations: calls not counted (a raw
pointer, or ``function()`` before the gates), either side's barrier removed.
"""

from __future__ import annotations

from functools import partial

import execmem
from execmem import arch as _arch
from execmem.emu import Machine, MachineState
from execmem.verify._framework import SAFE, UNSAFE, Case, Variant, first_fault
from execmem.verify._guest import FUNCTION

#: What CPU1's ``function()`` call returns when the gate refuses it (a freed text).
REFUSED = 0xFFFF
#: The gate's accounting from ``ArchSpec.call_gate`` (slot in rbx / x19), then the call.
GATE_ACCOUNTING = {
    "x86_64": "lock inc qword ptr [rbx]\ncmp qword ptr [rbx + 8], 0\njne refuse",
    "arm64": "count:\nldaxr x16, [x19]\nadd x16, x16, #1\nstlxr w17, x16, [x19]\ncbnz w17, count\n"
             "dmb ish\nldr x16, [x19, #8]\ncbnz x16, refuse",
}
#: CPU1: load the pointer (r13 / x13); if set, call it through ``{gate}``.
_CALLER = {
    "x86_64": "mov r13, [rbp]\ntest r13, r13\njz done\n{gate}\ncall r13\njmp done\nrefuse:\nmov eax, {refused}\ndone:",
    "arm64": "ldr x13, [x5]\ncbz x13, done\n{gate}\nblr x13\nb done\nrefuse:\nmov x0, #{refused}\ndone:",
}
#: CPU2: the freeing thread's ``gate_retire(slot)``, then "done" (release).
_FREER = {
    "x86_64": "call retire\nmov qword ptr [r12], 1\njmp end\nretire:\n{retire}\nend:",
    "arm64": "bl retire\nmov x1, #1\nstlr x1, [x6]\nb end\nretire:\n{retire}\nend:",
}
#: Registers: the pointer's address, the slot (CPU1), the result, the retire's
#: argument and count (CPU2), "done"'s address (CPU2).
_REGS = {"x86_64": ("rbp", "rbx", "rax", "rdi", "rax", "r12"), "arm64": ("x5", "x19", "x0", "x0", "x0", "x6")}


def _free_during_call(arch: str, *, gate: str, retire: str) -> Case:
    spec = _arch.get(arch)
    m = Machine(spec, cpus=3)
    a = execmem.Allocator(backend=m, pack_size=0x1000, granularity=16)
    slot, pointer, done = m.alloc(16), m.alloc(8), m.alloc(8)  # slot: counter, then the flag
    f = a.jit_text_alloc(16)
    f.write(0, execmem.asm(FUNCTION[arch].format(value=7), arch, f.address))
    f.map()
    host = m.host()
    host.store(pointer, f.address, release=True, note="publish f")
    host.await_value(done, 1, note="free(f): gate_retire has counted the calls in flight")
    res = f._pack.reservation
    m.write(res, f.address - res.address, spec.trap_bytes(8))  # f recycled: its trap refill
    ptr, slot_reg, result, arg, count, done_reg = _REGS[arch]
    # Numbers in hex: after an AT&T-syntax asm() Keystone reads unprefixed ones as hex.
    m.load(1, _CALLER[arch].format(gate=gate, refused=hex(REFUSED)))
    m.set_reg(1, ptr, pointer)
    m.set_reg(1, slot_reg, slot)
    m.load(2, _FREER[arch].format(retire=retire.replace("; ", "\n")))
    m.set_reg(2, arg, slot)
    m.set_reg(2, done_reg, done)

    def hazard(st: MachineState) -> str:
        if m.reg(st, 2, count):
            return ""  # a call was counted in flight: the allocator pins f instead
        faulted = first_fault(st, (0, 1, 2), "CPU1 entered f after free() counted no call in flight and recycled it")
        if faulted:
            return faulted
        got = m.reg(st, 1, result) & 0xFFFF
        return "" if got in (0, 7, REFUSED) else f"CPU1's call returned {got:#x}"

    return Case(m, hazard, ("CPU0 allocator", "CPU1 caller", "CPU2 free: gate_retire"))


def call_gate() -> list[Variant]:
    sc = "call-gate"
    out: list[Variant] = []
    for arch, barrier in (("arm64", "dmb ish"), ("x86_64", "mfence")):
        gate, retire = GATE_ACCOUNTING[arch], _arch.get(arch).gate_retire
        out += [
            Variant(sc, arch, "execmem", SAFE,
                    "the gate counts the call before it reads the flag, free sets the flag before it reads the count "
                    "(full barriers between): a call either is counted or is refused",
                    partial(_free_during_call, arch, gate=gate, retire=retire)),
            Variant(sc, arch, "no-gate", UNSAFE,
                    "calls not counted (a raw pointer, function() without a gate): free sees no call in flight and "
                    "recycles the text CPU1 is entering",
                    partial(_free_during_call, arch, gate="", retire=retire), "no-gate"),
            Variant(sc, arch, "no-retire-barrier", UNSAFE,
                    f"gate_retire without {barrier}: its read of the count passes its buffered flag store "
                    "(store buffering), so both sides miss each other",
                    partial(_free_during_call, arch, gate=gate, retire=retire.replace(f"{barrier}; ", "")),
                    "no-retire-barrier"),
        ]
    out += [
        Variant(sc, "arm64", "no-gate-dmb", UNSAFE,
                "the gate without DMB ISH: STLXR orders only earlier accesses, so the flag's load may be satisfied "
                "before the increment is visible (Arm ARM B2.3)",
                partial(_free_during_call, "arm64", gate=GATE_ACCOUNTING["arm64"].replace("dmb ish\n", ""),
                        retire=_arch.get("arm64").gate_retire), "no-gate-barrier"),
        Variant(sc, "x86_64", "no-lock", UNSAFE,
                "the gate's increment without LOCK: an ordinary store waits in the store buffer while the flag is read",
                partial(_free_during_call, "x86_64", gate=GATE_ACCOUNTING["x86_64"].replace("lock inc", "inc"),
                        retire=_arch.get("x86_64").gate_retire), "no-gate-barrier"),
    ]
    return out
