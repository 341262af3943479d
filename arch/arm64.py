"""arm64: instruction caches are not coherent with data stores and instructions already
fetched survive cache maintenance until a context-synchronization event (Arm ARM
B2.2.5 "Concurrent modification and execution of instructions", D7.5.2 "Instruction
caches"; Simner et al., ESOP 2020).  CTR_EL0.IDC=1 removes the need to clean the data
cache to the point of unification, CTR_EL0.DIC=1 the need to invalidate the
instruction cache."""

from __future__ import annotations

from execmem.arch import (
    ArchSpec,
    AsmDialect,
    AsmSyntax,
    DirectBranch,
    ElfIdentity,
    EngineModes,
    PatchRule,
    Recipe,
    RecipeStep,
)

_WRITE = RecipeStep("write", "code is stored through the writable side (a file write, a write window or a writable page), never through an executable mapping (W^X)")
_CLEAN = RecipeStep(
    "clean_dcache",
    "DC CVAU by VA over every data line of the code: instruction fetch reads the point of "
    "unification, not the data cache (Arm ARM D7.5.2)",
    skip_if="idc",
)
_DSB1 = RecipeStep("barrier", "DSB ISH completes the clean before the invalidate (Arm ARM B2.2.5)")
_INVAL = RecipeStep(
    "invalidate_icache",
    "IC IVAU by VA over every instruction line, broadcast to the inner shareable domain",
    skip_if="dic",
)
_DSB2 = RecipeStep("barrier", "DSB ISH completes the invalidate on every CPU before anything later")
_ISB = RecipeStep("local_cse", "ISB discards instructions this CPU fetched before the maintenance")
_REMOTE = RecipeStep(
    "remote_cse",
    "other CPUs keep already-fetched instructions until their own context synchronization: "
    "membarrier(PRIVATE_EXPEDITED_SYNC_CORE) makes each running thread take one "
    "(miniJit01 is Allowed without it)",
)
_MAP = RecipeStep(
    "map",
    "a VA that was not mapped cannot hold fetched instructions; the page-table update and "
    "the exception return of the system call synchronize (seeds/004, set_pte_at)",
)

#: Instructions that may be replaced while another CPU may execute them (Arm ARM B2.2.5,
#: the list herd7 uses for its CMODX check).
CMODX_MNEMONICS = frozenset(
    {"b", "b.cond", "bl", "brk", "cbnz", "cbz", "hvc", "isb", "nop", "smc", "svc", "tbnz", "tbz"}
)


#: The call gate (``ArchSpec.call_gate``; AAPCS64), entered from a stub with the record
#: in x16.  Entry: arguments in x0-x7, v0-v7 and x8 (indirect result), the caller's
#: stack arguments from sp.  x19-x22 keep the slot, the thread state, the stack size
#: and the record across calls (callee-saved); x9-x11, x16, x17 are scratch.  The
#: counter is updated with an LDAXR/STLXR loop (Armv8.0; LDADDAL needs FEAT_LSE) and
#: DMB ISH orders the increment before the flag's load (Arm ARM B2.3: a store may
#: otherwise be observed after a later load).  Record: as on x86-64.
_CALL_GATE = """
    stp x29, x30, [sp, #-48]!
    mov x29, sp
    stp x19, x20, [sp, #16]
    stp x21, x22, [sp, #32]
    mov x22, x16
    ldr x19, [x22]
count:
    ldaxr x16, [x19]
    add x16, x16, #1
    stlxr w17, x16, [x19]
    cbnz w17, count
    dmb ish
    ldr x16, [x19, #8]
    cbnz x16, refuse
    sub sp, sp, #208
    stp x0, x1, [sp]
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    str x8, [sp, #64]
    stp q0, q1, [sp, #80]
    stp q2, q3, [sp, #112]
    stp q4, q5, [sp, #144]
    stp q6, q7, [sp, #176]
    ldr x16, [x22, #24]
    blr x16
    mov x20, x0
    ldp x0, x1, [sp]
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldr x8, [sp, #64]
    ldp q0, q1, [sp, #80]
    ldp q2, q3, [sp, #112]
    ldp q4, q5, [sp, #144]
    ldp q6, q7, [sp, #176]
    ldr x21, [x22, #16]
    sub sp, sp, x21
    mov x9, x21
copy:
    cbz x9, copied
    sub x9, x9, #8
    add x10, x29, #48
    ldr x11, [x10, x9]
    str x11, [sp, x9]
    b copy
copied:
    ldr x16, [x22, #8]
    blr x16
    add sp, sp, x21
uncount:
    ldaxr x16, [x19]
    sub x16, x16, #1
    stlxr w17, x16, [x19]
    cbnz w17, uncount
    stp x0, x1, [sp]
    stp q0, q1, [sp, #16]
    stp q2, q3, [sp, #48]
    mov x0, x20
    ldr x16, [x22, #32]
    blr x16
    ldp x0, x1, [sp]
    ldp q0, q1, [sp, #16]
    ldp q2, q3, [sp, #48]
    mov sp, x29
    ldp x19, x20, [sp, #16]
    ldp x21, x22, [sp, #32]
    ldp x29, x30, [sp], #48
    ret
refuse:
    ldaxr x16, [x19]
    sub x16, x16, #1
    stlxr w17, x16, [x19]
    cbnz w17, refuse
    ldr x0, [x22, #48]
    ldr x1, [x22, #56]
    ldr x16, [x22, #40]
    blr x16
    mov x0, #0
    ldp x19, x20, [sp, #16]
    ldp x21, x22, [sp, #32]
    ldp x29, x30, [sp], #48
    ret
"""

#: A callable's stub (``ArchSpec.gate_stub``): its record into x16, then the gate
#: through x17 (the intra-procedure-call scratch registers, AAPCS64 6.4.1).
_GATE_STUB = """
    ldr x16, record
    ldr x17, gate
    br x17
    nop
record: .quad {RECORD}
gate: .quad {GATE}
"""
#: B and BL (imm26, Arm ARM C6.2.26 and C6.2.34): the offset counts from the branch.
_B = DirectBranch("b", size=4, mask=0xFC000000, match=0x14000000, shift=0, bits=26, scale=4)
_BL = DirectBranch("bl", size=4, mask=0xFC000000, match=0x94000000, shift=0, bits=26, scale=4)

_ASM = AsmDialect(
    syntaxes=(AsmSyntax("gnu"),),
    line_comment="",  # "//" only; "#" is an immediate (Keystone's AArch64MCAsmInfo)
    word_size=4,
    pc_relative=frozenset(
        {"b", "bl", "b.cond", "cbz", "cbnz", "tbz", "tbnz", "adr", "adrp", "ldr", "ldrsw", "prfm"}
    ),
    page_relative=(("adrp", 4096),),
    # TBZ/TBNZ reach +-32 KiB; a label beyond makes AArch64AsmBackend's adjustFixupValue
    # call report_fatal_error, which exits the process (measured: "LLVM ERROR: fixup
    # value out of range"), as does a misaligned B/BL/TBZ target.
    inprocess_output=32 << 10,
    fixups_abort=True,
)

SPEC = ArchSpec(
    name="arm64",
    aliases=("aarch64", "armv8", "arm64e"),
    trap_fill=(0xD4202000).to_bytes(4, "little"),  # BRK #0x100 (the kernel's AARCH64_BREAK_FAULT)
    insn_align=4,
    max_insn_size=4,
    pointer_size=8,
    # BL imm26: target = the instruction's address + imm26 * 4, so [-2**27, 2**27 - 4]
    # (Arm ARM C6.2.34 BL); the instruction is 4 bytes, so its other bytes lose 3.
    branch_reach=(1 << 27) - 8,
    engines=EngineModes(
        keystone=(2, 0),  # KS_ARCH_ARM64, KS_MODE_LITTLE_ENDIAN
        capstone=(1, 0),  # CS_ARCH_ARM64, CS_MODE_ARM
        unicorn=(2, 0),  # UC_ARCH_ARM64, UC_MODE_ARM
    ),
    publish=Recipe("publish", (_WRITE, _CLEAN, _DSB1, _INVAL, _DSB2, _ISB, _REMOTE)),
    publish_fresh=Recipe("publish_fresh", (_WRITE, _CLEAN, _DSB1, _INVAL, _DSB2, _MAP)),
    patch=Recipe(
        "patch",
        (
            RecipeStep(
                "atomic_store",
                "one aligned 4-byte store; old and new must both be on the CMODX list",
            ),
            _CLEAN,
            _DSB1,
            _INVAL,
            _DSB2,
            _ISB,
            _REMOTE,
        ),
    ),
    patch_rule=PatchRule(
        word=4,
        whole_instruction=True,
        mnemonics=CMODX_MNEMONICS,
        max_size=4,
        why="Arm ARM B2.2.5 allows concurrent modification and execution only for "
        "B, B.cond, BL, BRK, CBZ, CBNZ, TBZ, TBNZ, NOP, ISB, SVC, HVC and SMC",
    ),
    cse_events=("isb", "exception_entry", "exception_return", "ipi"),
    tlb_styles=("broadcast", "ipi"),
    cache_features=("idc", "dic"),
    host_routines=(
        # AAPCS64: x0 = address, x1 = value; aligned STR* are single-copy atomic (B2.2.1).
        ("store1", "strb w1, [x0]; ret"),
        ("store2", "strh w1, [x0]; ret"),
        ("store4", "str w1, [x0]; ret"),
        ("store8", "str x1, [x0]; ret"),
        # Linux lets EL0 read CTR_EL0 (SCTLR_EL1.UCT, or trap-and-emulate).
        ("read_cache_type", "mrs x0, ctr_el0; ret"),
        # (start, end, line): one maintenance op per line from the line containing start.
        (
            "clean_dcache",
            "sub x3, x2, #1; bic x0, x0, x3; "
            "loop: dc cvau, x0; add x0, x0, x2; cmp x0, x1; b.lo loop; ret",
        ),
        (
            "invalidate_icache",
            "sub x3, x2, #1; bic x0, x0, x3; "
            "loop: ic ivau, x0; add x0, x0, x2; cmp x0, x1; b.lo loop; ret",
        ),
        ("barrier", "dsb ish; ret"),
        ("local_cse", "isb; ret"),
        # Is membarrier safe here?  As on x86-64 (see there): a plain fork whose child
        # runs only this code, signals blocked around clone, exit status = the QUERY
        # mask's low 7 bits or 0x80 | errno; x0 = clone's flags (0 or SIGCHLD); returns
        # the pid or -errno.  Linux arm64 (asm-generic) numbers: rt_sigprocmask 135,
        # clone 220, exit_group 94, membarrier 283; svc preserves every register but x0.
        (
            "probe_membarrier",
            "mov x10, x0; sub sp, sp, #16; mov x9, #-1; str x9, [sp, #8]; "
            "mov x0, #0; add x1, sp, #8; mov x2, sp; mov x3, #8; mov x8, #135; svc #0; "
            "mov x0, x10; mov x1, #0; mov x2, #0; mov x3, #0; mov x4, #0; mov x8, #220; svc #0; "
            "cbz x0, child; mov x9, x0; "
            "mov x0, #2; mov x1, sp; mov x2, #0; mov x3, #8; mov x8, #135; svc #0; "
            "mov x0, x9; add sp, sp, #16; ret; "
            "child: mov x0, #0; mov x1, #0; mov x2, #0; mov x8, #283; svc #0; "
            "tbnz x0, #63, failed; mov x9, x0; "
            "tbz x9, #5, skip1; "
            "mov x0, #64; mov x1, #0; mov x2, #0; mov x8, #283; svc #0; "
            "mov x0, #32; mov x1, #0; mov x2, #0; mov x8, #283; svc #0; "
            "skip1: tbz x9, #3, skip2; "
            "mov x0, #16; mov x1, #0; mov x2, #0; mov x8, #283; svc #0; "
            "mov x0, #8; mov x1, #0; mov x2, #0; mov x8, #283; svc #0; "
            "skip2: and x0, x9, #0x7f; b exit; "
            "failed: neg x0, x0; and x0, x0, #0x7f; orr x0, x0, #0x80; "
            "exit: mov x8, #94; svc #0",
        ),
    ),
    call_gate=_CALL_GATE,
    gate_stub=_GATE_STUB,
    # x0 = slot.  DMB ISH orders the flag store before the counter load (B2.3).
    gate_retire="mov x1, #1; str x1, [x0, #8]; dmb ish; ldr x0, [x0]; ret",
    asm=_ASM,
    direct_branches=(_B, _BL),
    summary="write via RW alias; DC CVAU lines (unless IDC); DSB ISH; IC IVAU lines (unless DIC); "
    "DSB ISH; ISB; membarrier(SYNC_CORE) once per batch; fresh packs: maintenance then map",
    # EM_AARCH64 (183); RET (X30) is 0xd65f03c0 (Arm ARM C6.2 "RET").
    elf=ElfIdentity(machine=183, ret=(0xD65F03C0).to_bytes(4, "little")),
)
