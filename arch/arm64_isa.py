"""arm64 instruction semantics the modeled machine needs beyond Unicorn.

Unicorn executes the data-processing, load/store and branch instructions; the model
must still know, per instruction, *which registers it reads and writes* (to carry
dependency views: address, data and control dependencies order events in Arm's
model) and *which instructions it must perform itself* (barriers, cache and TLB
maintenance, ISB, ERET, traps).  Capstone 5 decodes the operands but its
``regs_access`` is wrong for aliases (``cmp`` reports a write to its first operand,
``ret`` reads nothing, ``dc cvau, x1`` reads nothing), so the rules below work from
mnemonics and operand lists.

The memory-model table :data:`RULES` says, for each ordering instruction, which
per-CPU views it joins; the engine (``execmem.emu``) interprets it and never names
an architecture.  The rules transcribe the "locally-ordered-before" relation of
Arm's model (herdtools7 ``aarch64hwreqs.cat``: bob, dob, DSB-ob, IFB-ob, f-ob,
po-scl-ob) into the view discipline of Pulte et al.'s Promising-ARM (PLDI 2019).
"""

from __future__ import annotations

import functools
import re

import capstone
from capstone import arm64_const as cs
from unicorn import arm64_const as uc

from execmem._errors import ModelError
from execmem.arch._model import Decoded, DescriptorFormat, FenceRule, ModelRules

#: Unicorn registers that make up a CPU's architectural state in the model, in the
#: order of the packed register file.  Indices 0..30 are X0..X30.
REGISTERS: tuple[int, ...] = (
    *(getattr(uc, f"UC_ARM64_REG_X{i}") for i in range(29)),
    uc.UC_ARM64_REG_X29,
    uc.UC_ARM64_REG_X30,
    uc.UC_ARM64_REG_SP,
    uc.UC_ARM64_REG_NZCV,
    uc.UC_ARM64_REG_PC,
    uc.UC_ARM64_REG_ELR_EL1,
    uc.UC_ARM64_REG_PSTATE,
)
SP, NZCV, PC, ELR, PSTATE = 31, 32, 33, 34, 35
REGISTER_NAMES = (*(f"X{i}" for i in range(31)), "SP", "NZCV", "PC", "ELR_EL1", "PSTATE")
#: Registers whose values are compared/printed (general purpose + SP).
GENERAL = tuple(range(32))
#: Reset value of PSTATE: EL1h with interrupts masked (Unicorn's default).
RESET = {PSTATE: 0x3C5}
#: Unicorn's CPU model: "max" implements the Armv8.1 atomics (FEAT_LSE) the default lacks.
UNICORN_CPU = uc.UC_CPU_ARM64_MAX


def register_index(name: str) -> int | None:
    """Model register index for ``x5``/``w5``/``sp``/``lr``...; ``None`` for the zero register."""
    n = name.lower()
    if n in ("xzr", "wzr"):
        return None
    if n in ("sp", "wsp"):
        return SP
    if n == "lr":
        return 30
    if n == "fp":
        return 29
    if n == "nzcv":
        return NZCV
    if n[0] in "xw" and n[1:].isdigit() and int(n[1:]) <= 30:
        return int(n[1:])
    raise ModelError(f"register {name!r} is not modelled (only general-purpose registers are)")


_FLAG_SETTERS = {"adds", "subs", "ands", "bics", "adcs", "sbcs", "negs", "ngcs", "cmp", "cmn", "tst"}
_FLAG_READERS = {
    "csel", "csinc", "csinv", "csneg", "cset", "csetm", "cinc", "cinv", "cneg",
    "adc", "adcs", "sbc", "sbcs", "ngc", "ngcs", "ccmp", "ccmn", "fcsel",
}
_COMPARES = {"cmp", "cmn", "tst", "ccmp", "ccmn"}
_READ_DEST = {"movk", "bfi", "bfxil", "bfm", "bfc"}
#: Barrier options: (access types, shareability domain).  Every modeled CPU is in one
#: inner shareable domain, so ISH, OSH and SY (full system) reach all of them alike;
#: NSH reaches only the issuing CPU (the ``.nsh`` rules below).
_FENCES = {
    "sy": "full", "ish": "full", "osh": "full", "nsh": "full.nsh",
    "ld": "ld", "ishld": "ld", "oshld": "ld", "nshld": "ld.nsh",
    "st": "st", "ishst": "st", "oshst": "st", "nshst": "st.nsh",
}

_LSE = re.compile(r"(ld|st)(add|clr|eor|set|smax|smin|umax|umin)(a|al|l)?([bh]?)")
_SWP_CAS = re.compile(r"(swp|cas)(a|al|l)?([bh]?)")
_LOAD_EXCLUSIVE = re.compile(r"ld(a?)xr([bh]?)")
_STORE_EXCLUSIVE = re.compile(r"st(l?)xr([bh]?)")
_TLBI_ALL = ("vmall", "alle", "aside")

_md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
_md.detail = True


def _regs_of(insn: capstone.CsInsn) -> tuple[list[int], list[tuple[int | None, int | None]]]:
    """(register operands in order, memory operands as (base, index))."""
    regs: list[int] = []
    mems: list[tuple[int | None, int | None]] = []
    for op in insn.operands:
        if op.type == cs.ARM64_OP_REG:
            index = register_index(insn.reg_name(op.reg))
            regs.append(-1 if index is None else index)
        elif op.type == cs.ARM64_OP_MEM:
            base = register_index(insn.reg_name(op.mem.base)) if op.mem.base else None
            index = register_index(insn.reg_name(op.mem.index)) if op.mem.index else None
            mems.append((base, index))
    return regs, mems


def _real(regs: list[int]) -> tuple[int, ...]:
    return tuple(r for r in regs if r >= 0)


@functools.lru_cache(maxsize=65536)
def decode(word: int) -> Decoded:
    """Decode one 32-bit instruction word (little-endian value)."""
    insns = list(_md.disasm(word.to_bytes(4, "little"), 0))
    if not insns:
        return Decoded("(undefined)", f".inst {word:#010x}", "undefined")
    insn = insns[0]
    m = insn.mnemonic.lower()
    text = f"{m} {insn.op_str}".strip()
    regs, mems = _regs_of(insn)

    if m == "udf":
        return Decoded(m, text, "undefined")
    if m in ("brk", "hlt"):
        return Decoded(m, text, "trap")
    if m in ("svc", "hvc", "smc"):
        return Decoded(m, text, "svc")
    if m in ("nop", "yield", "hint", "wfe", "sev", "sevl", "esb", "csdb", "bti", "pacia1716"):
        return Decoded(m, text, "nop")
    if m == "wfi":
        return Decoded(m, text, "halt")
    if m == "isb":
        return Decoded(m, text, "isb")
    if m in ("dmb", "dsb"):
        option = insn.op_str.strip().lower() or "sy"
        kind = _FENCES.get(option)
        if kind is None:
            raise ModelError(f"barrier option {option!r} of {text!r} is not modelled")
        return Decoded(m, text, "fence", fence=f"{m}.{kind}")
    if m == "eret":
        return Decoded(m, text, "eret", reads=(ELR,))
    if m in ("dc", "ic", "tlbi"):
        what = insn.op_str.split(",")[0].strip().lower()
        va = _real(regs)
        va_reg = va[0] if va else None
        if m == "dc":
            if what not in ("cvau", "cvac", "civac", "cvap", "cvadp"):
                raise ModelError(f"{text!r} is not modelled (only cleaning DC operations are)")
            return Decoded(m, text, "dc", reads=va, addr_regs=va, va_reg=va_reg)
        if m == "ic":
            return Decoded(m, text, "ic", reads=va, addr_regs=va, va_reg=va_reg)
        return Decoded(
            m, text, "tlbi", reads=va, addr_regs=va, va_reg=va_reg,
            broadcast=what.endswith(("is", "os")), all_pages=what.startswith(_TLBI_ALL),
        )
    if m == "msr":
        return Decoded(m, text, "alu", reads=_real(regs))
    if m == "mrs":
        return Decoded(m, text, "alu", writes=_real(regs))

    # Branches: Unicorn computes the target; the model needs the control dependency.
    if m in ("b", "bl") or m.startswith("b."):
        cond: tuple[int, ...] = (NZCV,) if m.startswith("b.") else ()
        writes: tuple[int, ...] = (30,) if m == "bl" else ()
        return Decoded(m, text, "branch", reads=cond, writes=writes, cond_regs=cond)
    if m in ("cbz", "cbnz", "tbz", "tbnz"):
        r = _real(regs)[:1]
        return Decoded(m, text, "branch", reads=r, cond_regs=r)
    if m in ("br", "blr", "ret", "braa", "blraa", "retaa"):
        r = _real(regs)[:1] or (30,)
        writes = (30,) if m.startswith("blr") else ()
        return Decoded(m, text, "branch", reads=r, writes=writes, cond_regs=r)

    # Loads and stores.
    if mems:
        atomic = _atomic(m, text, insn, regs, mems)
        if atomic is not None:
            return atomic
        if m.startswith(("ldxp", "ldaxp", "stxp", "stlxp", "prfm", "ld1", "st1")):
            raise ModelError(f"{text!r}: exclusive pairs, prefetch and vector accesses are not modelled")
        base, index = mems[0]
        addr = tuple(r for r in (base, index) if r is not None)
        writeback = (base,) if insn.writeback and base is not None else ()
        before_mem = _real(regs)
        if m.startswith("ld"):
            acquire = "A" if m.startswith("ldar") else "Q" if m.startswith("ldapr") else ""
            return Decoded(m, text, "load", reads=addr, writes=before_mem + writeback,
                           addr_regs=addr, acquire=acquire)
        if m.startswith("st"):
            release = m.startswith("stlr")
            return Decoded(m, text, "store", reads=before_mem + addr, writes=writeback,
                           addr_regs=addr, data_regs=before_mem, release=release)
        raise ModelError(f"{text!r}: memory instruction not modelled")

    if m.startswith(("ld", "st", "prfm")):
        # PC-relative literal loads (no memory operand in Capstone's view).
        return Decoded(m, text, "load", writes=_real(regs))

    # Data processing: first register operand is the destination.
    if m in _COMPARES:
        reads = _real(regs)
        if m in ("ccmp", "ccmn"):
            reads += (NZCV,)
        return Decoded(m, text, "alu", reads=reads, writes=(NZCV,))
    real = regs[1:]
    reads = _real(real)
    if m in _FLAG_READERS:
        reads += (NZCV,)
    dest = _real(regs[:1])
    if m in _READ_DEST:
        reads += dest
    writes = dest + ((NZCV,) if m in _FLAG_SETTERS else ())
    if m.startswith("f") or any(r > NZCV for r in reads + writes):
        raise ModelError(f"{text!r}: floating-point and SIMD instructions are not modelled")
    return Decoded(m, text, "alu", reads=reads, writes=writes)


def _atomic(
    m: str, text: str, insn: capstone.CsInsn, regs: list[int], mems: list[tuple[int | None, int | None]]
) -> Decoded | None:
    """The Armv8.1 atomics (LD<op>, ST<op>, SWP, CAS) and the exclusives, or None.

    Arm ARM C6.2: the A forms load with acquire semantics unless the destination is
    the zero register, the L forms store with release semantics; CAS compares Rs
    with memory and stores Rt if they are equal, returning the old value in Rs.
    """
    base = mems[0][0]
    if base is None:
        return None
    lse, swp_cas = _LSE.fullmatch(m), _SWP_CAS.fullmatch(m)
    if lse or swp_cas:
        match = lse or swp_cas
        assert match is not None
        order = match.group(3) if lse else match.group(2)
        order = order or ""
        release = "l" in order
        if swp_cas and match.group(1) == "cas":
            rs, rt = regs[0], regs[1]
            acquire = "A" if "a" in order else ""
            return Decoded(m, text, "rmw", reads=_real([rs, rt, base]), writes=_real([rs]), addr_regs=(base,),
                           data_regs=_real([rt]), acquire=acquire, release=release, compare_reg=rs if rs >= 0 else None)
        rs = regs[0]
        rt = regs[1] if len(regs) > 1 else -1  # ST<op> is LD<op> to the zero register
        acquire = "A" if "a" in order and rt >= 0 else ""
        return Decoded(m, text, "rmw", reads=_real([rs, base]), writes=_real([rt]), addr_regs=(base,),
                       data_regs=_real([rs]), acquire=acquire, release=release)
    load = _LOAD_EXCLUSIVE.fullmatch(m)
    if load:
        return Decoded(m, text, "load", reads=(base,), writes=_real(regs), addr_regs=(base,),
                       acquire="A" if load.group(1) else "", exclusive=True)
    store = _STORE_EXCLUSIVE.fullmatch(m)
    if store:
        status, rt = regs[0], regs[1]
        width = {"b": 1, "h": 2}.get(store.group(2), 8 if insn.op_str.split(",")[1].strip().startswith("x") else 4)
        return Decoded(m, text, "store_exclusive", reads=_real([rt, base]), writes=_real([status]),
                       addr_regs=(base,), data_regs=_real([rt]), release=bool(store.group(1)),
                       status_reg=status, size=width)
    return None


def tlbi_page(operand: int) -> int:
    """The page a TLBI by VA names: its operand holds VA[55:12] in bits 43:0 (and
    the ASID in bits 63:48, which the model's single address space ignores)."""
    return (operand & ((1 << 44) - 1)) << 12


# ---------------------------------------------------------------------------
# Memory-model rules (interpreted by execmem.emu).  Views named here:
#   rold   post-views of po-earlier explicit reads
#   wold   positions of po-earlier explicit writes (requires them propagated)
#   dcold  positions of po-earlier DC CVAU
#   icold  positions of po-earlier completed IC / TLBI
#   capc   views of registers read by po-earlier branches (control dependencies)
#   capa   address views of po-earlier memory accesses (address dependencies)
#   dsb    everything ordered by the last DSB (extended to fetches by an ISB)
#   rnew / dcnew / icnew / fnew   lower bounds for later reads / DC / IC+TLBI / fetches
# A FenceRule drains the store buffer first when ``drain`` is set, completes pending
# IC/TLBI when ``complete`` is set, orders later stores after earlier ones when
# ``order_stores`` is set, then joins each target view with the listed sources.
# ---------------------------------------------------------------------------


_ALL_OLD = ("rold", "wold", "dcold", "icold")
#: a full DSB also orders the hardware's page-table updates (DSB-ob: [M]; po; [dsb])
_DSB_OLD = (*_ALL_OLD, "hwold")
_M_OLD = ("rold", "wold", "dcold")

RULES: dict[str, FenceRule] = {
    # bob: [M|DC]; po; [dmb.full]; po; [M|DC]
    "dmb.full": FenceRule(drain=True, joins=(("rnew", _M_OLD), ("dcnew", _M_OLD))),
    # bob: [R]; po; [dmb.ld]; po; [M]   (not DC)
    "dmb.ld": FenceRule(joins=(("rnew", ("rold",)),)),
    # bob: [W]; po; [dmb.st]; po; [W]
    "dmb.st": FenceRule(order_stores=True),
    # DSB-ob: [M|DC|IC|TLBI]; po; [dsb.full]; po; [~(fetch|TTD)]  (and completes IC/TLBI)
    "dsb.full": FenceRule(
        drain=True,
        complete=True,
        implicit=True,
        joins=(("rnew", _DSB_OLD), ("dcnew", _DSB_OLD), ("icnew", _DSB_OLD), ("dsb", _DSB_OLD)),
    ),
    "dsb.ld": FenceRule(joins=(("rnew", ("rold",)), ("dcnew", ("rold",)), ("icnew", ("rold",)), ("dsb", ("rold",)))),
    "dsb.st": FenceRule(
        drain=True,
        joins=(("rnew", ("wold",)), ("dcnew", ("wold",)), ("icnew", ("wold",)), ("dsb", ("wold",))),
    ),
    # IFB-ob: [R]; ctrl; [IFB]; po | [R]; addr; [M]; po; [IFB]; po | DSB-ob; [IFB]; po
    "isb": FenceRule(
        cse=True,
        joins=(
            ("fnew", ("capc", "capa", "dsb")),
            ("rnew", ("capc", "capa")),
            ("dcnew", ("capc", "capa")),
            ("icnew", ("capc", "capa")),
        ),
    ),
}
#: Exception entry and return are IFBs in Arm's model (unless FEAT_ExS says otherwise).
RULES["exception"] = RULES["isb"]

# Non-shareable barriers (Arm ARM B2.3.12, C6.2.81 DMB, C6.2.83 DSB): a barrier orders
# accesses only as observed by the PEs in its shareability domain, and NSH's domain is
# the issuing PE alone, so DMB NSH (any access type) orders nothing another CPU can
# observe.  DSB NSH waits only for what completes for the issuing PE: its earlier
# stores to page-table entries reach its own table walker (which is why Linux's
# local_flush_tlb_all is DSB NSHST; TLBI; DSB NSH; ISB), and the maintenance it issued
# completes for the issuer (a broadcast IC IVAU or TLBI ...IS reaches the other CPUs
# only with a later DSB of a domain that contains them, D7.5.9.3 and D8.13.5).  So it
# orders later maintenance and (with an ISB) later fetches and walks after those, and
# orders no explicit access for other observers.  herd7 treats every domain as the
# full system (aarch64fences.cat): it never forbids more than this does.
_LOCAL = ("wold", "dcold", "icold")
for _kind in ("full", "ld", "st"):
    RULES[f"dmb.{_kind}.nsh"] = FenceRule()
RULES["dsb.full.nsh"] = FenceRule(
    complete=True,
    local=True,
    drain_tables=True,
    joins=(("dcnew", _LOCAL), ("icnew", _LOCAL), ("dsb", _LOCAL)),
)
RULES["dsb.ld.nsh"] = FenceRule()
RULES["dsb.st.nsh"] = FenceRule(drain_tables=True, joins=(("icnew", ("wold",)), ("dsb", ("wold",))))


#: Stage 1 page descriptors (Arm ARM D8.3): valid is bit 0 (herd's model ignores the
#: table/page bit 1), AP[1] (bit 6) grants EL0 access, AP[2] (bit 7) makes the page
#: read-only (herd's db:0), AF is bit 10, DBM bit 51, UXN bit 54 (herd's x:0); the
#: output address is bits 47:12.  herd7 uses the same bits (lib/AArch64PteVal.ml).
DESCRIPTOR = DescriptorFormat(
    oa=0x0000_FFFF_FFFF_F000,
    bits=(("valid", 1 << 0, False), ("el0", 1 << 6, False), ("db", 1 << 7, True),
          ("af", 1 << 10, False), ("dbm", 1 << 51, False), ("x", 1 << 54, True)),
)

MODEL = ModelRules(
    granule=4,
    coherent_fetch=False,
    own_stores_visible_to_fetch=False,
    fifo_stores=False,
    ordered_reads=False,
    track_dependencies=True,
    fences=RULES,
    descriptor=DESCRIPTOR,
    barriers_order_walks=False,
)


#: Bytes fetched per instruction.
FETCH_SIZE = 4

#: A register-only counted loop of ``{n}`` iterations (``{lo}``/``{hi}``: its 16-bit
#: halves) ending at label ``end``: what ``execmem bench`` runs on the model and on
#: raw Unicorn to compare their speed.
BENCH_LOOP = "movz x1, #{lo}\nmovk x1, #{hi}, lsl #16\nloop: add x0, x0, x1\neor x3, x0, x1\nsubs x1, x1, #1\nb.ne loop\nend: nop"


def decode_bytes(insn: bytes) -> Decoded:
    return decode(int.from_bytes(insn[:4], "little"))


def instruction_length(fetched: bytes) -> int | None:
    """Every A64 instruction is 4 bytes; ``None`` asks the fetch for more bytes."""
    return 4 if len(fetched) >= 4 else None


#: Calling convention used by ``Machine.call`` and host ``call`` actions.
ARGUMENT_REGISTERS = (0, 1, 2, 3, 4, 5, 6, 7)
RETURN_REGISTER = 0


def prepare_call(regs: bytes, entry: int, args: tuple[int, ...], return_to: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Registers for calling ``entry(*args)`` returning to ``return_to`` (X30); no stack use."""
    if len(args) > len(ARGUMENT_REGISTERS):
        raise ModelError(f"at most {len(ARGUMENT_REGISTERS)} register arguments")
    for reg, value in zip(ARGUMENT_REGISTERS, args, strict=False):
        regs = _set(regs, reg, value & (1 << 64) - 1)
    return _set(regs, 30, return_to), []


def _reg(regs: bytes, index: int) -> int:
    return int.from_bytes(regs[8 * index : 8 * index + 8], "little")


def _set(regs: bytes, index: int, value: int) -> bytes:
    return regs[: 8 * index] + value.to_bytes(8, "little") + regs[8 * index + 8 :]


def exception_entry(cpu: object, pc: int) -> bytes:
    """Registers after taking a synchronous exception at ``pc``: ELR_EL1 = pc.

    The model vectors to the handler itself (Unicorn does not set ESR/FAR or vector).
    """
    return _set(cpu.regs, ELR, pc)  # type: ignore[attr-defined]


def exception_return(cpu: object) -> int:
    """Target of ERET: ELR_EL1 (the model stays at EL1; Unicorn's ERET would drop to EL0)."""
    return _reg(cpu.regs, ELR)  # type: ignore[attr-defined]


#: How the emulated backend performs recipe steps and kernel paths, as model fences.
STEP_FENCES: dict[str, tuple[str, ...]] = {
    "barrier": ("dsb.full",),
    "local_cse": ("isb",),
    # set_pte_at: DSB ISHST + ISB, then the system call returns (exception return).
    "after_map": ("dsb.full", "exception"),
    # A TLBI must be ordered after the page-table store and completed by a DSB.
    "before_tlbi": ("dsb.full",),
    "complete_tlbi": ("dsb.full", "isb"),
    "syscall_return": ("exception",),
}
