"""x86-64: instruction fetch is coherent with stores, but cross-modifying code needs a
serializing event on every CPU that may execute it (Intel SDM Vol. 3, 9.1.3
"Handling Self- and Cross-Modifying Code")."""

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
_LOCAL = RecipeStep(
    "local_cse",
    "the writing thread serializes too before it runs the code (SDM 9.1.3: a jump or serializing instruction after SMC)",
)
_REMOTE = RecipeStep(
    "remote_cse",
    "every other thread must execute a serializing instruction before running new code "
    "(SDM 9.1.3 cross-modifying code; Linux membarrier SYNC_CORE, 4.16)",
)
_MAP = RecipeStep(
    "map",
    "a VA that was not mapped cannot hold prefetched instructions; the mapping makes it "
    "executable only after the code is in place (Lutomirski, execmem thread, seeds/001)",
)


#: The call gate (``ArchSpec.call_gate``; System V AMD64 ABI), entered from a stub with
#: the record in r11.  Entry: rsp = 8 (mod 16), arguments in rdi, rsi, rdx, rcx, r8,
#: r9, xmm0-7 (al: vector registers of a variadic call), the caller's stack arguments
#: from rsp+8.  rbx keeps the slot, r12 the thread state and r13 the record across
#: calls (callee-saved); r10/r11 are free scratch.  LOCK INC is atomic and a full
#: barrier (SDM Vol. 3, 9.2.3.8: locked instructions have a total order and are not
#: reordered with loads or stores), so the flag is read after the increment is
#: globally visible.  Record: slot +0, target +8, stack bytes +16, save +24,
#: restore +32, raise +40, exception +48, message +56.
_CALL_GATE = """
    push rbp
    mov rbp, rsp
    push rbx
    push r12
    push r13
    sub rsp, 8
    mov r13, r11
    mov rbx, qword ptr [r13]
    lock inc qword ptr [rbx]
    cmp qword ptr [rbx + 8], 0
    jne refuse
    sub rsp, 192
    mov [rsp], rdi
    mov [rsp + 8], rsi
    mov [rsp + 16], rdx
    mov [rsp + 24], rcx
    mov [rsp + 32], r8
    mov [rsp + 40], r9
    mov [rsp + 48], rax
    movdqu [rsp + 64], xmm0
    movdqu [rsp + 80], xmm1
    movdqu [rsp + 96], xmm2
    movdqu [rsp + 112], xmm3
    movdqu [rsp + 128], xmm4
    movdqu [rsp + 144], xmm5
    movdqu [rsp + 160], xmm6
    movdqu [rsp + 176], xmm7
    call qword ptr [r13 + 24]
    mov r12, rax
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    mov rdx, [rsp + 16]
    mov rcx, [rsp + 24]
    mov r8, [rsp + 32]
    mov r9, [rsp + 40]
    mov rax, [rsp + 48]
    movdqu xmm0, [rsp + 64]
    movdqu xmm1, [rsp + 80]
    movdqu xmm2, [rsp + 96]
    movdqu xmm3, [rsp + 112]
    movdqu xmm4, [rsp + 128]
    movdqu xmm5, [rsp + 144]
    movdqu xmm6, [rsp + 160]
    movdqu xmm7, [rsp + 176]
    mov r10, qword ptr [r13 + 16]
    sub rsp, r10
copy:
    sub r10, 8
    jb copied
    mov r11, [rbp + r10 + 16]
    mov [rsp + r10], r11
    jmp copy
copied:
    call qword ptr [r13 + 8]
    lock dec qword ptr [rbx]
    add rsp, qword ptr [r13 + 16]
    mov [rsp], rax
    mov [rsp + 8], rdx
    movdqu [rsp + 16], xmm0
    movdqu [rsp + 32], xmm1
    mov rdi, r12
    call qword ptr [r13 + 32]
    mov rax, [rsp]
    mov rdx, [rsp + 8]
    movdqu xmm0, [rsp + 16]
    movdqu xmm1, [rsp + 32]
    lea rsp, [rbp - 24]
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
refuse:
    lock dec qword ptr [rbx]
    mov rdi, qword ptr [r13 + 48]
    mov rsi, qword ptr [r13 + 56]
    call qword ptr [r13 + 40]
    xor eax, eax
    add rsp, 8
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"""

#: A callable's stub (``ArchSpec.gate_stub``): its record into r11, then the gate;
#: r10 and r11 are neither argument nor callee-saved registers.
_GATE_STUB = "movabs r11, {RECORD}; movabs r10, {GATE}; jmp r10"
#: JMP rel32 (E9 cd) and CALL rel32 (E8 cd): the displacement counts from the next
#: instruction (SDM Vol. 2A, JMP and CALL).
_JMP32 = DirectBranch("jmp rel32", size=5, mask=0xFF, match=0xE9, shift=8, bits=32, from_next=True)
_CALL32 = DirectBranch("call rel32", size=5, mask=0xFF, match=0xE8, shift=8, bits=32, from_next=True)

_ASM = AsmDialect(
    syntaxes=(
        # Keystone's default is Intel, so no option is set (ks_option also sets the
        # radix of unprefixed numbers to 16: see _asm_source.radix_free).
        AsmSyntax(
            "intel",
            None,
            foreign=r"%[A-Za-z]",
            hint="an AT&T register (%reg) in Intel syntax: pass syntax='att' for AT&T",
        ),
        AsmSyntax(
            "att",
            2,  # KS_OPT_SYNTAX_ATT
            foreign=r"\[|\bptr\b",
            hint="Intel memory syntax ([...], ptr) in AT&T syntax: leave syntax='intel' for Intel",
        ),
    ),
    line_comment="#",  # Keystone's x86 comment string (X86MCAsmInfo)
    word_size=2,
    pc_relative=frozenset(
        {"jmp", "call", "loop", "loope", "loopne", "jrcxz", "jecxz", "jcxz"}
        | {f"j{cc}" for cc in ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")}
    ),
    long_branches=(("jmp", _JMP32.name), ("call", _CALL32.name)),
    prefixes=frozenset(
        {"lock", "rep", "repe", "repz", "repne", "repnz", "xacquire", "xrelease", "data16", "data32", "addr32", "rex", "rex64"}
    ),
)

SPEC = ArchSpec(
    name="x86_64",
    aliases=("x86-64", "amd64", "x64"),
    trap_fill=b"\xcc",  # int3
    insn_align=1,
    max_insn_size=15,
    pointer_size=8,
    # call/jmp rel32: target = end of the instruction + [-2**31, 2**31) (SDM Vol. 2A,
    # CALL); measured from the instruction's first byte, less its length (5, or up to
    # the 15-byte limit with prefixes) either way.
    branch_reach=(1 << 31) - 16,
    engines=EngineModes(
        keystone=(4, 8),  # KS_ARCH_X86, KS_MODE_64
        capstone=(3, 8),  # CS_ARCH_X86, CS_MODE_64
        unicorn=(4, 8),  # UC_ARCH_X86, UC_MODE_64
    ),
    publish=Recipe("publish", (_WRITE, _LOCAL, _REMOTE)),
    publish_fresh=Recipe("publish_fresh", (_WRITE, _MAP)),
    patch=Recipe(
        "patch",
        (
            RecipeStep(
                "atomic_store",
                "one aligned 8-byte store replaces a whole instruction; executing CPUs see "
                "the old or the new instruction, never a mix (SDM 8.1.1 atomicity)",
            ),
            _LOCAL,
            _REMOTE,
        ),
    ),
    patch_rule=PatchRule(
        word=8,
        whole_instruction=True,
        max_size=8,
        why="only a whole instruction inside one aligned 8-byte word can be replaced with one "
        "atomic store; anything else needs text_poke_bp's int3 protocol or a new text",
    ),
    cse_events=("cpuid", "serialize", "iret", "interrupt", "ipi"),
    tlb_styles=("ipi", "invlpgb"),
    host_routines=(
        # System V: rdi = address, rsi = value.  An aligned MOV of 1/2/4/8 bytes is
        # single-copy atomic (SDM Vol. 3, 9.1.1 "Guaranteed Atomic Operations").
        ("store1", "mov byte ptr [rdi], sil; ret"),
        ("store2", "mov word ptr [rdi], si; ret"),
        ("store4", "mov dword ptr [rdi], esi; ret"),
        ("store8", "mov qword ptr [rdi], rsi; ret"),
        # IRET to the next instruction: serializing on every x86-64 CPU (SDM Vol. 3,
        # 10.3 "Serializing Instructions") and, unlike CPUID, no VM exit under a
        # hypervisor.  The frame (ss, rsp, rflags, cs, rip) is built by hand, as Linux
        # sync_core() does (arch/x86/include/asm/sync_core.h, iret_to_self); rsp after
        # the IRET is rsp before the first push.
        (
            "local_cse",
            "mov eax, ss; push rax; lea rax, [rsp + 8]; push rax; pushfq; mov eax, cs; push rax; "
            "lea rax, [rip + done]; push rax; iretq; done: ret",
        ),
        # SERIALIZE (0F 01 E8; SDM Vol. 2B), where CPUID.(EAX=7,ECX=0):EDX[14] says the CPU
        # has it: the cheapest serializing instruction.  Keystone 0.9.2 lacks the mnemonic.
        ("serialize", ".byte 0x0f, 0x01, 0xe8; ret"),
        # 1 if SERIALIZE exists: leaf 7 only when the highest basic leaf (CPUID.0:EAX) is
        # at least 7 (a CPU answers a higher leaf with its highest one's data).  CPUID
        # is a VM exit under a hypervisor: run once per process, to choose local_cse.
        (
            "has_serialize",
            "push rbx; xor eax, eax; cpuid; cmp eax, 7; jb none; mov eax, 7; xor ecx, ecx; cpuid; "
            "mov eax, edx; shr eax, 14; and eax, 1; jmp out; none: xor eax, eax; out: pop rbx; ret",
        ),
        # Is membarrier safe here (a seccomp profile may kill on first use)?  Forks a
        # child that runs only this code: no Python, no libc, its own address space
        # (a plain fork: a CLONE_VM child killed with a core dump would take this
        # process with it on kernels before 5.16).  Signals are blocked around clone so
        # the child never runs an inherited handler.  The child calls membarrier(QUERY),
        # registers and runs PRIVATE_EXPEDITED_SYNC_CORE and PRIVATE_EXPEDITED when
        # offered, and exits with the mask's low 7 bits, or 0x80 | errno when QUERY
        # failed.  Its argument is clone's flags: 0 (no exit signal, so wait with
        # __WALL) or SIGCHLD (see execmem/native/_probe.py).  Returns the child's pid,
        # or -errno.  Linux x86-64 numbers: rt_sigprocmask 14, clone 56, exit_group 231,
        # membarrier 324; syscall clobbers rcx and r11.
        (
            "probe_membarrier",
            "mov r9, rdi; sub rsp, 24; mov qword ptr [rsp + 8], -1; "
            "mov eax, 14; xor edi, edi; lea rsi, [rsp + 8]; mov rdx, rsp; mov r10d, 8; syscall; "
            "mov eax, 56; mov rdi, r9; xor esi, esi; xor edx, edx; xor r10d, r10d; xor r8d, r8d; syscall; "
            "test rax, rax; jz child; mov r9, rax; "
            "mov eax, 14; mov edi, 2; mov rsi, rsp; xor edx, edx; mov r10d, 8; syscall; "
            "mov rax, r9; add rsp, 24; ret; "
            "child: mov eax, 324; xor edi, edi; xor esi, esi; xor edx, edx; syscall; "
            "test rax, rax; js failed; mov rbx, rax; "
            "test ebx, 32; jz skip1; "
            "mov eax, 324; mov edi, 64; xor esi, esi; xor edx, edx; syscall; "
            "mov eax, 324; mov edi, 32; xor esi, esi; xor edx, edx; syscall; "
            "skip1: test ebx, 8; jz skip2; "
            "mov eax, 324; mov edi, 16; xor esi, esi; xor edx, edx; syscall; "
            "mov eax, 324; mov edi, 8; xor esi, esi; xor edx, edx; syscall; "
            "skip2: mov edi, ebx; and edi, 0x7f; jmp exit; "
            "failed: neg rax; mov edi, eax; and edi, 0x7f; or edi, 0x80; "
            "exit: mov eax, 231; syscall",
        ),
    ),
    call_gate=_CALL_GATE,
    gate_stub=_GATE_STUB,
    # rdi = slot.  MFENCE orders the flag store before the counter load (SDM 8.2.3.4:
    # a load may otherwise pass an earlier store to another location).
    gate_retire="mov qword ptr [rdi + 8], 1; mfence; mov rax, qword ptr [rdi]; ret",
    asm=_ASM,
    direct_branches=(_JMP32, _CALL32),
    summary="write via RW alias; membarrier(PRIVATE_EXPEDITED_SYNC_CORE) once per batch "
    "(fallback: mprotect-induced TLB-shootdown IPI); fresh packs: map after write, no membarrier",
    # EM_X86_64 (62); RET is C3 (SDM Vol. 2B, "RET").
    elf=ElfIdentity(machine=62, ret=b"\xc3"),
)
