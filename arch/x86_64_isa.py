"""x86-64 instruction semantics the modeled machine needs beyond Unicorn.

Memory is x86-TSO (Owens, Sarkar, Sewell, TPHOLs 2009): reads are ordered with
reads, stores leave a FIFO store buffer in program order, a CPU forwards its own
buffered stores, and MFENCE, locked instructions and serializing instructions drain
the buffer.  Instruction fetch is coherent with stores (Intel SDM Vol. 3, 11.6: the
processor snoops stores to code, including its own), but a CPU may keep executing
instructions it fetched before a cross-modifying store until it takes a serializing
event (SDM 9.1.3): in the model a fetch may be placed as early as the last
serialization of its CPU.  Fetch reads whole aligned 8-byte words, each at its own
time, so an instruction that straddles two words can be torn by concurrent stores.
"""

from __future__ import annotations

import functools

import capstone
from capstone import x86_const as cs
from unicorn import x86_const as uc

from execmem.arch._model import Decoded, DescriptorFormat, FenceRule, ModelRules

REGISTERS: tuple[int, ...] = (
    uc.UC_X86_REG_RAX, uc.UC_X86_REG_RBX, uc.UC_X86_REG_RCX, uc.UC_X86_REG_RDX,
    uc.UC_X86_REG_RSI, uc.UC_X86_REG_RDI, uc.UC_X86_REG_RBP, uc.UC_X86_REG_RSP,
    uc.UC_X86_REG_R8, uc.UC_X86_REG_R9, uc.UC_X86_REG_R10, uc.UC_X86_REG_R11,
    uc.UC_X86_REG_R12, uc.UC_X86_REG_R13, uc.UC_X86_REG_R14, uc.UC_X86_REG_R15,
    uc.UC_X86_REG_RIP, uc.UC_X86_REG_EFLAGS,
)
REGISTER_NAMES = (
    "RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "RSP",
    "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15", "RIP", "EFLAGS",
)
PC = 16
SP = 7
GENERAL = tuple(range(16))
RESET = {17: 0x2}
#: Longest instruction; fetch continues word by word until the instruction is complete.
FETCH_SIZE = 15
#: A register-only counted loop of ``{n}`` iterations ending at label ``end``: what
#: ``execmem bench`` runs on the model and on raw Unicorn to compare their speed.
BENCH_LOOP = "mov rcx, {n}\nloop: add rax, rcx\nxor rdx, rax\ndec rcx\njnz loop\nend: nop"
#: The return register of the calling convention (for ``Machine.call`` results).
RETURN_REGISTER = 0
ARGUMENT_REGISTERS = (5, 4, 3, 2, 8, 9)  # rdi, rsi, rdx, rcx, r8, r9


def register_index(name: str) -> int | None:
    n = name.upper()
    aliases = {"EAX": "RAX", "EBX": "RBX", "ECX": "RCX", "EDX": "RDX", "ESI": "RSI", "EDI": "RDI",
               "EBP": "RBP", "ESP": "RSP", "PC": "RIP", "SP": "RSP"}
    n = aliases.get(n, n)
    if n.endswith("D") and n[:-1] in REGISTER_NAMES:
        n = n[:-1]
    if n in REGISTER_NAMES:
        return REGISTER_NAMES.index(n)
    return None


_md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_md.detail = True

_SERIALIZING = {"cpuid", "iret", "iretq", "iretd", "rsm", "serialize", "invd", "wbinvd", "lgdt", "lidt", "ltr"}
_TRAPS = {"int3": "Breakpoint", "int1": "Breakpoint", "into": "Overflow"}


def decode_bytes(insn: bytes) -> Decoded:
    """Decode the instruction at the start of ``insn``; ``length`` 0 means more bytes are needed."""
    return _decode(bytes(insn[:15]))


@functools.lru_cache(maxsize=65536)
def _decode(insn: bytes) -> Decoded:
    # SERIALIZE (0F 01 E8) is unknown to Capstone 5 and Unicorn: the model performs it.
    if insn[:3] == b"\x0f\x01\xe8":
        return Decoded("serialize", "serialize", "isb", 3, fence="serialize")
    found = list(_md.disasm(insn, 0, count=1))
    if not found:
        if len(insn) < 15:
            return Decoded("", "", "incomplete", 0)
        return Decoded("(bad)", f".byte {insn[:1].hex()}", "undefined", 1)
    i = found[0]
    m = i.mnemonic.lower()
    text = f"{m} {i.op_str}".strip()
    if m in _TRAPS:
        return Decoded(m, text, "trap", i.size)
    if m in ("ud2", "ud0", "ud1"):
        return Decoded(m, text, "undefined", i.size)
    if m == "hlt":
        return Decoded(m, text, "halt", i.size)
    if m in ("syscall", "int", "sysenter"):
        return Decoded(m, text, "svc", i.size)
    if m in _SERIALIZING:
        return Decoded(m, text, "isb", i.size, fence="serialize")
    if m == "mfence":
        return Decoded(m, text, "fence", i.size, fence="mfence")
    if m in ("lfence", "sfence", "pause", "nop", "endbr64", "clflush", "clflushopt", "prefetcht0"):
        return Decoded(m, text, "nop", i.size)
    memory = any(op.type == cs.X86_OP_MEM for op in i.operands) and m != "lea"
    if memory and (i.prefix[0] == cs.X86_PREFIX_LOCK or m == "xchg" or m.startswith("cmpxchg")):
        return Decoded(m, text, "atomic", i.size, fence="mfence")  # a full barrier on both sides
    if memory or m in ("push", "pop", "call", "ret", "pushfq", "popfq", "leave"):
        return Decoded(m, text, "load", i.size)  # reads and/or writes; Unicorn reports which
    if i.group(cs.X86_GRP_JUMP) or i.group(cs.X86_GRP_CALL) or i.group(cs.X86_GRP_RET):
        return Decoded(m, text, "branch", i.size)
    return Decoded(m, text, "alu", i.size)


_OLD = ("rold", "wold", "icold", "fetch")
RULES: dict[str, FenceRule] = {
    # MFENCE / locked instructions: the store buffer drains; every later memory
    # operation (reads, INVLPG/INVLPGB, CLFLUSH) follows every earlier one.
    "mfence": FenceRule(drain=True, joins=(("rnew", _OLD), ("dcnew", _OLD), ("icnew", _OLD))),
    # Serializing instructions (SDM 9.1.3/8.3): drain, complete everything, refetch.
    "serialize": FenceRule(
        drain=True,
        cse=True,
        joins=(("rnew", _OLD), ("dcnew", _OLD), ("icnew", _OLD), ("fnew", (*_OLD, "rnew"))),
    ),
}
RULES["exception"] = RULES["serialize"]
# AMD INVLPGB is completed by TLBSYNC on the issuing CPU (like an Arm DSB for TLBI).
RULES["tlbsync"] = FenceRule(complete=True)

#: How the emulated backend performs recipe steps and kernel paths, as model fences.
STEP_FENCES: dict[str, tuple[str, ...]] = {
    "barrier": ("mfence",),
    "local_cse": ("serialize",),
    "after_map": ("mfence",),
    "before_tlbi": ("mfence",),
    "complete_tlbi": ("tlbsync",),
    "syscall_return": ("mfence",),
}

#: 4-level paging entries (SDM Vol. 3, 4.5, table 4-19): P (bit 0), R/W (bit 1: herd's
#: db), U/S (bit 2), A (bit 5: the hardware sets it, it never faults), XD (bit 63);
#: the frame is bits 51:12.  x86 has no dirty-bit modifier: a write to a read-only
#: page faults.
DESCRIPTOR = DescriptorFormat(
    oa=0x000F_FFFF_FFFF_F000,
    bits=(("valid", 1 << 0, False), ("db", 1 << 1, False), ("el0", 1 << 2, False),
          ("af", 1 << 5, False), ("x", 1 << 63, True)),
)

MODEL = ModelRules(
    granule=8,
    coherent_fetch=True,
    own_stores_visible_to_fetch=True,
    fifo_stores=True,
    ordered_reads=True,
    track_dependencies=False,
    fences=RULES,
    descriptor=DESCRIPTOR,
    hardware_access_flag=True,
)


def instruction_length(fetched: bytes) -> int | None:
    """Length of the instruction at the start of ``fetched``; ``None`` if it needs more bytes."""
    d = _decode(bytes(fetched[:15]))
    if d.op == "incomplete" or d.length > len(fetched):
        return None
    return d.length


def prepare_call(regs: bytes, entry: int, args: tuple[int, ...], return_to: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """System V call: arguments in registers, the return address pushed on the stack."""
    if len(args) > len(ARGUMENT_REGISTERS):
        raise ValueError(f"at most {len(ARGUMENT_REGISTERS)} register arguments")
    def get(i: int) -> int:
        return int.from_bytes(regs[8 * i : 8 * i + 8], "little")
    def put(r: bytes, i: int, value: int) -> bytes:
        return r[: 8 * i] + (value & (1 << 64) - 1).to_bytes(8, "little") + r[8 * i + 8 :]
    for reg, value in zip(ARGUMENT_REGISTERS, args, strict=False):
        regs = put(regs, reg, value)
    sp = get(SP) - 8
    regs = put(regs, SP, sp)
    return regs, [(sp, return_to.to_bytes(8, "little"))]


def exception_entry(cpu: object, pc: int) -> bytes:
    return cpu.regs  # type: ignore[attr-defined,no-any-return]


def exception_return(cpu: object) -> int:
    raise NotImplementedError("IRET is executed by the model's interrupt handling")
