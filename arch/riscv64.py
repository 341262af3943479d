"""riscv64: ``fence.i`` orders only the local hart's instruction fetches (Zifencei);
other harts need a remote fence.i, which Linux provides through the
``riscv_flush_icache`` system call (flags 0: every thread of the process)."""

from __future__ import annotations

from execmem.arch import ArchSpec, ElfIdentity, EngineModes, PatchRule, Recipe, RecipeStep

_WRITE = RecipeStep("write", "code is stored through the writable side, never through an executable mapping (W^X)")
_FENCE = RecipeStep("barrier", "fence rw,rw orders the code stores before the fetch fences (Zifencei)")
_LOCAL = RecipeStep("local_cse", "fence.i makes this hart's fetches see its own stores (Zifencei)")
_REMOTE = RecipeStep(
    "remote_cse",
    "other harts need their own fence.i: riscv_flush_icache(start, end, 0) IPIs them (Linux)",
)
_MAP = RecipeStep("map", "a VA that was not mapped cannot hold fetched instructions")

SPEC = ArchSpec(
    name="riscv64",
    aliases=("riscv", "rv64"),
    trap_fill=b"\x02\x90",  # c.ebreak: traps at every 2-byte boundary
    insn_align=2,
    max_insn_size=4,
    pointer_size=8,
    # The ``call`` pseudo-instruction, AUIPC+JALR: target = pc + (hi20 << 12) +
    # sign-extended lo12, from -2**31 - 2**11 to 2**31 - 2**11 - 1 (RISC-V unprivileged
    # ISA, 2.5 "Control Transfer Instructions"); JAL alone reaches only +-1 MiB.
    # Measured from the AUIPC; the pair is 8 bytes long.
    branch_reach=(1 << 31) - (1 << 11) - 8,
    engines=EngineModes(
        keystone=None,  # Keystone 0.9.2 has no RISC-V assembler
        capstone=(15, 2 | 4),  # CS_ARCH_RISCV, CS_MODE_RISCV64 | CS_MODE_RISCVC
        unicorn=(8, 8),  # UC_ARCH_RISCV, UC_MODE_RISCV64
    ),
    publish=Recipe("publish", (_WRITE, _FENCE, _LOCAL, _REMOTE)),
    publish_fresh=Recipe("publish_fresh", (_WRITE, _FENCE, _LOCAL, _MAP)),
    patch=Recipe(
        "patch",
        (
            RecipeStep("atomic_store", "one aligned 4-byte store of a whole instruction"),
            _FENCE,
            _LOCAL,
            _REMOTE,
        ),
    ),
    patch_rule=PatchRule(
        word=4,
        whole_instruction=True,
        max_size=4,
        why="only an aligned 4-byte instruction can be replaced with one atomic store",
    ),
    cse_events=("fence.i", "ipi"),
    tlb_styles=("ipi",),
    host_routines=(
        # Hand-encoded (no Keystone for RISC-V); a0 = address, a1 = value; 0x00008067 = ret.
        ("store1", ".word 0x00b50023; .word 0x00008067"),  # sb a1, 0(a0)
        ("store2", ".word 0x00b51023; .word 0x00008067"),  # sh a1, 0(a0)
        ("store4", ".word 0x00b52023; .word 0x00008067"),  # sw a1, 0(a0)
        ("store8", ".word 0x00b53023; .word 0x00008067"),  # sd a1, 0(a0)
        ("barrier", ".word 0x0330000f; .word 0x00008067"),  # fence rw, rw
        ("local_cse", ".word 0x0000100f; .word 0x00008067"),  # fence.i
    ),
    summary="write via RW alias; fence; riscv_flush_icache(all threads) once per batch",
    # EM_RISCV (243); e_flags RVC | double-float ABI, which glibc's loader checks
    # against its own (RISC-V ELF psABI, "e_flags"); ret = jalr x0, 0(ra) = 0x00008067.
    elf=ElfIdentity(machine=243, ret=(0x00008067).to_bytes(4, "little"), flags=0x5),
)
