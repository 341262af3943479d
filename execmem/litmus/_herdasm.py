"""herd7 AArch64 instruction text -> text Keystone 0.9.2 assembles correctly.

Most herd spellings are Keystone's (``STR W0,[X1]``, ``DC CVAU,X1``, ``DSB ISH``), so
the translation is the identity, except:

* Keystone rejects ``UDF #imm``, ``LDAPR``/``LDAPRB``/``LDAPRH``, ``STLUR``/``LDAPUR``
  and the LSE atomics (``CAS*``, ``SWP*``, ``LD<op>*``, ``ST<op>*``): they are encoded
  here and emitted as ``.word 0x...`` (Keystone 0.9.2 silently emits *nothing* for
  ``.inst``).
* PC-relative instructions (``B``, ``BL``, ``B.cond``, ``CBZ``/``CBNZ``,
  ``TBZ``/``TBNZ``, ``ADR``, ``ADRP``, ``LDR``/``LDRSW`` literal) are never given to
  Keystone: it mis-encodes ADR/ADRP to a label of another assembly unit and to
  ``.equ`` symbols, mis-encodes ADRP even to ``.+delta``, silently wraps out-of-range
  or misaligned offsets (``CBNZ W2,.+1048576``, ``LDR X0,.+2``), and aborts the
  process ("LLVM ERROR: fixup value out of range") on ``B .+0x8000000`` or ``B .+3``.
  They are encoded here, with range and alignment checks, from the address the
  instruction sits at and the addresses of the labels.

:func:`rewrite_labels` is the purely textual step (``ADR X9,l1`` at 0x1000 with l1 at
0x2000 -> ``ADR X9,.+4096``); :func:`to_keystone` the full translation;
:func:`assemble_line` returns the 32-bit encoding; :func:`encode_instruction_value`
encodes an init value (``NOP``, ``instr:"B .+4"``).  Every error is a
:class:`execmem.LitmusError`, prefixed with ``where`` when given (``"file:12"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NoReturn

from execmem._asm_engine import KeystoneFailure, assemble_own
from execmem._errors import LitmusError
from execmem.arch import get
from execmem.litmus._ast import Instr, LitmusTest, Thread


def _fail(where: str | None, text: str, what: str) -> NoReturn:
    prefix = f"{where}: " if where else ""
    raise LitmusError(f"{prefix}cannot assemble '{text}': {what}")


_MNEMONIC = re.compile(r"\s*([A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z]+)?)\s*(.*)$", re.S)
_GPR = re.compile(r"([WwXx])([0-9]{1,2})|([WwXx])[Zz][Rr]")
_BASE = re.compile(r"\[\s*(?:([Xx])([0-9]{1,2})|([Ss][Pp]))\s*(?:,\s*#?\s*([+-]?(?:0[xX][0-9a-fA-F]+|[0-9]+)))?\s*\]")
_IMM = re.compile(r"#?\s*([+-]?(?:0[xX][0-9a-fA-F]+|[0-9]+))")
_LABEL_NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_/.$]*|\.[A-Za-z0-9_/.$]+")
_DOT = re.compile(r"\.\s*(?:([+-])\s*(0[xX][0-9a-fA-F]+|[0-9]+))?")
_CONDS = {
    "EQ": 0, "NE": 1, "CS": 2, "HS": 2, "CC": 3, "LO": 3, "MI": 4, "PL": 5, "VS": 6,
    "VC": 7, "HI": 8, "LS": 9, "GE": 10, "LT": 11, "GT": 12, "LE": 13, "AL": 14, "NV": 15,
}
_PCREL = {"B", "BL", "CBZ", "CBNZ", "TBZ", "TBNZ", "ADR", "ADRP", "LDR", "LDRSW"}
_LSE_OPS = {"ADD": 0, "CLR": 1, "EOR": 2, "SET": 3, "SMAX": 4, "SMIN": 5, "UMAX": 6, "UMIN": 7}
_LSE = re.compile(r"(LD|ST)(ADD|CLR|EOR|SET|SMAX|SMIN|UMAX|UMIN)(AL|A|L)?(B|H)?")
_SWP = re.compile(r"SWP(AL|A|L)?(B|H)?")
_CAS = re.compile(r"CAS(AL|A|L)?(B|H)?")
_UNSCALED = re.compile(r"(STLUR|LDAPUR)(B|H)?")
_LDAPR = re.compile(r"LDAPR(B|H)?")


def split_operands(ops: str) -> list[str]:
    """Operands split on commas outside ``[...]`` and ``{...}``, stripped."""
    out: list[str] = []
    depth = 0
    cur: list[str] = []
    for c in ops:
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    last = "".join(cur).strip()
    if last or out:
        out.append(last)
    return out


def _split(text: str, where: str | None) -> tuple[str, list[str]]:
    m = _MNEMONIC.match(text)
    if not m:
        _fail(where, text, "no mnemonic")
    return m.group(1).upper(), split_operands(m.group(2))


def _gpr(tok: str, text: str, where: str | None) -> tuple[bool, int]:
    """(is 64-bit, number) of ``X3``/``W3``/``XZR``/``WZR``."""
    m = _GPR.fullmatch(tok.strip())
    if not m:
        _fail(where, text, f"'{tok}' is not a general-purpose register")
    if m.group(3):
        return m.group(3) in "Xx", 31
    n = int(m.group(2))
    if n > 30 or str(n) != m.group(2):
        _fail(where, text, f"'{tok}' is not a general-purpose register")
    return m.group(1) in "Xx", n


def _base(tok: str, text: str, where: str | None, allow_offset: bool = False) -> tuple[int, int]:
    """(register number, offset) of ``[Xn]``, ``[SP]``, ``[Xn,#imm]``."""
    m = _BASE.fullmatch(tok.strip())
    if not m:
        _fail(where, text, f"expected [Xn] or [SP], found '{tok}'")
    if m.group(3):
        n = 31
    else:
        n = int(m.group(2))
        if n > 30 or str(n) != m.group(2):
            _fail(where, text, f"bad base register in '{tok}'")
    off = int(m.group(4), 0) if m.group(4) else 0
    if off and not allow_offset:
        _fail(where, text, "this instruction takes no offset")
    return n, off


def _imm(tok: str, text: str, where: str | None) -> int:
    m = _IMM.fullmatch(tok.strip())
    if not m:
        _fail(where, text, f"expected an immediate, found '{tok}'")
    return int(m.group(1), 0)


def _want(ops: list[str], n: int, text: str, where: str | None) -> None:
    if len(ops) != n:
        _fail(where, text, f"expected {n} operands")


def _size(suffix: str | None, is64: bool) -> int:
    if suffix == "B":
        return 0
    if suffix == "H":
        return 1
    return 3 if is64 else 2


# ------------------------------------------------------------ non-PC-relative encoders


def _encode_special(mn: str, ops: list[str], text: str, where: str | None) -> int | None:
    """The encoding of an instruction Keystone 0.9.2 rejects, None for the others."""
    if mn == "UDF":
        _want(ops, 1, text, where)
        v = _imm(ops[0], text, where)
        if not 0 <= v <= 0xFFFF:
            _fail(where, text, "UDF immediate must be 0..65535")
        return v
    m = _LDAPR.fullmatch(mn)
    if m:
        _want(ops, 2, text, where)
        is64, rt = _gpr(ops[0], text, where)
        if m.group(1) and is64:
            _fail(where, text, "LDAPRB/LDAPRH take a W register")
        rn, _ = _base(ops[1], text, where)
        return 0x38BFC000 | _size(m.group(1), is64) << 30 | rn << 5 | rt
    m = _UNSCALED.fullmatch(mn)
    if m:
        _want(ops, 2, text, where)
        is64, rt = _gpr(ops[0], text, where)
        if m.group(2) and is64:
            _fail(where, text, "byte/halfword forms take a W register")
        rn, off = _base(ops[1], text, where, allow_offset=True)
        if not -256 <= off <= 255:
            _fail(where, text, "offset must be -256..255")
        opc = 0 if m.group(1) == "STLUR" else 1
        return (0x19000000 | _size(m.group(2), is64) << 30 | opc << 22
                | (off & 0x1FF) << 12 | rn << 5 | rt)
    m = _CAS.fullmatch(mn)
    if m:
        _want(ops, 3, text, where)
        s64, rs = _gpr(ops[0], text, where)
        t64, rt = _gpr(ops[1], text, where)
        if s64 != t64 or (m.group(2) and s64):
            _fail(where, text, "register sizes do not match the instruction")
        rn, _ = _base(ops[2], text, where)
        order = m.group(1) or ""
        acq, rel = int("A" in order), int("L" in order)
        return (0x08A07C00 | _size(m.group(2), s64) << 30 | acq << 22 | rs << 16
                | rel << 15 | rn << 5 | rt)
    m = _SWP.fullmatch(mn)
    lse = _LSE.fullmatch(mn)
    if m or lse:
        if lse:
            store = lse.group(1) == "ST"
            opc, order, suffix = _LSE_OPS[lse.group(2)], lse.group(3) or "", lse.group(4)
            o3 = 0
            if store and "A" in order:
                _fail(where, text, "ST<op> has no acquire form")
        else:
            assert m is not None
            store, opc, order, suffix, o3 = False, 0, m.group(1) or "", m.group(2), 1
        _want(ops, 2 if store else 3, text, where)
        s64, rs = _gpr(ops[0], text, where)
        if store:
            t64, rt = s64, 31
        else:
            t64, rt = _gpr(ops[1], text, where)
        if s64 != t64 or (suffix and s64):
            _fail(where, text, "register sizes do not match the instruction")
        rn, _ = _base(ops[-1], text, where)
        acq, rel = int("A" in order), int("L" in order)
        return (0x38200000 | _size(suffix, s64) << 30 | acq << 23 | rel << 22 | rs << 16
                | o3 << 15 | opc << 12 | rn << 5 | rt)
    return None


# --------------------------------------------------------------------- PC-relative


def _pcrel_target_index(mn: str, ops: list[str]) -> int | None:
    """Index of the PC-relative operand of ``mn``, None if it has none."""
    if mn in ("B", "BL") or mn.startswith("B."):
        return 0
    if mn in ("CBZ", "CBNZ", "ADR", "ADRP"):
        return 1
    if mn in ("TBZ", "TBNZ"):
        return 2
    if mn in ("LDR", "LDRSW") and len(ops) == 2 and not ops[1].startswith(("[", "=")):
        return 1
    return None


def _target(
    tok: str, address: int, labels: Mapping[str, int], text: str, where: str | None
) -> int | None:
    """Absolute target of a PC-relative operand; None for a label not in ``labels``."""
    tok = tok.strip()
    m = _DOT.fullmatch(tok)
    if m:
        if m.group(1) is None:
            return address
        delta = int(m.group(2), 0)
        return address + delta if m.group(1) == "+" else address - delta
    if _LABEL_NAME.fullmatch(tok):
        return labels.get(tok)
    _fail(where, text, f"expected a label or .+offset, found '{tok}'")


def rewrite_labels(text: str, address: int, labels: Mapping[str, int]) -> str:
    """Rewrite the PC-relative operand of ``text`` (at ``address``) naming a label of
    ``labels`` as ``.+delta``/``.-delta``; other text is returned unchanged."""
    try:
        mn, ops = _split(text, None)
    except LitmusError:
        return text
    idx = _pcrel_target_index(mn, ops)
    if idx is None or idx >= len(ops):
        return text
    tok = ops[idx].strip()
    if tok not in labels:
        return text
    delta = labels[tok] - address
    ops[idx] = f".+{delta}" if delta >= 0 else f".-{-delta}"
    head = text.strip().split(None, 1)[0]
    return f"{head} {','.join(ops)}"


def _check_off(off: int, bits: int, scale: int, text: str, where: str | None) -> int:
    if off % scale:
        _fail(where, text, f"offset {off:+#x} is not a multiple of {scale}")
    q = off // scale
    lim = 1 << (bits - 1)
    if not -lim <= q < lim:
        _fail(where, text, f"offset {off:+#x} out of range")
    return q & ((1 << bits) - 1)


def _encode_pcrel(
    mn: str, ops: list[str], idx: int, address: int, labels: Mapping[str, int],
    text: str, where: str | None,
) -> int:
    target = _target(ops[idx], address, labels, text, where)
    if target is None:
        _fail(where, text, f"label '{ops[idx].strip()}' has no address")
    off = target - address
    if mn in ("B", "BL"):
        _want(ops, 1, text, where)
        return (0x94000000 if mn == "BL" else 0x14000000) | _check_off(off, 26, 4, text, where)
    if mn.startswith("B."):
        _want(ops, 1, text, where)
        cond = _CONDS.get(mn[2:])
        if cond is None:
            _fail(where, text, f"unknown condition '{mn[2:]}'")
        return 0x54000000 | _check_off(off, 19, 4, text, where) << 5 | cond
    if mn in ("CBZ", "CBNZ"):
        _want(ops, 2, text, where)
        is64, rt = _gpr(ops[0], text, where)
        base = 0x35000000 if mn == "CBNZ" else 0x34000000
        return int(is64) << 31 | base | _check_off(off, 19, 4, text, where) << 5 | rt
    if mn in ("TBZ", "TBNZ"):
        _want(ops, 3, text, where)
        is64, rt = _gpr(ops[0], text, where)
        bit = _imm(ops[1], text, where)
        if not 0 <= bit < (64 if is64 else 32):
            _fail(where, text, "bit number out of range")
        base = 0x37000000 if mn == "TBNZ" else 0x36000000
        return ((bit >> 5) << 31 | base | (bit & 31) << 19
                | _check_off(off, 14, 4, text, where) << 5 | rt)
    if mn in ("ADR", "ADRP"):
        _want(ops, 2, text, where)
        is64, rd = _gpr(ops[0], text, where)
        if not is64 or rd == 31:
            _fail(where, text, "ADR/ADRP need an X register")
        if mn == "ADRP":
            imm = _check_off((target >> 12) - (address >> 12), 21, 1, text, where)
            base = 0x90000000
        else:
            imm = _check_off(off, 21, 1, text, where)
            base = 0x10000000
        return base | (imm & 3) << 29 | (imm >> 2) << 5 | rd
    # LDR/LDRSW literal
    _want(ops, 2, text, where)
    is64, rt = _gpr(ops[0], text, where)
    if mn == "LDRSW":
        if not is64:
            _fail(where, text, "LDRSW needs an X register")
        base = 0x98000000
    else:
        base = 0x58000000 if is64 else 0x18000000
    return base | _check_off(off, 19, 4, text, where) << 5 | rt


# ------------------------------------------------------------------------- public


_BAD_DOT = re.compile(r"(^|[\s,#(\[])\.(?![A-Za-z0-9_])")


def to_keystone(
    text: str,
    address: int = 0,
    labels: Mapping[str, int] | None = None,
    where: str | None = None,
) -> str:
    """Keystone-acceptable text for one herd instruction sitting at ``address``.

    ``labels`` maps label names to addresses (pass *every* label the instruction may
    name, including those of its own thread: the result never relies on Keystone's
    symbol resolution).  PC-relative and Keystone-rejected instructions come back as
    ``.word 0x........``; the others unchanged.
    """
    labs = labels or {}
    mn, ops = _split(text, where)
    idx = _pcrel_target_index(mn, ops)
    if idx is not None:
        if idx >= len(ops):
            _fail(where, text, "missing target operand")
        return f".word {_encode_pcrel(mn, ops, idx, address, labs, text, where):#010x}"
    special = _encode_special(mn, ops, text, where)
    if special is not None:
        return f".word {special:#010x}"
    if mn.startswith(".") or _BAD_DOT.search(text):
        _fail(where, text, "directives and '.' operands are not instructions")
    if ";" in text or "\n" in text:
        _fail(where, text, "one instruction expected")
    return text.strip()


def assemble_line(
    text: str,
    address: int = 0,
    labels: Mapping[str, int] | None = None,
    where: str | None = None,
) -> int:
    """The 32-bit encoding of one herd instruction at ``address``."""
    src = to_keystone(text, address, labels, where)
    if src.startswith(".word "):
        return int(src[6:], 16)
    try:
        data = assemble_own(get("arm64"), src, address)
    except KeystoneFailure as e:
        _fail(where, text, f"Keystone: {e}")
    if len(data) != 4:
        _fail(where, text, f"Keystone produced {len(data)} bytes instead of 4")
    return int.from_bytes(data, "little")


def encode_instruction_value(value: str | Instr, where: str | None = None) -> int:
    """Encoding of an init/condition instruction value: ``NOP``, ``instr:"B .+4"``,
    ``instr:"ADR X3,.+4"``, a bare instruction text or an :class:`Instr`.

    The value does not sit anywhere, so only position-independent forms are accepted
    (``.+offset`` targets, not labels; not ADRP)."""
    text = value.text if isinstance(value, Instr) else value.strip()
    m = re.fullmatch(r'instr:"([^"]*)"', text)
    if m:
        text = m.group(1)
    text = " ".join(text.split())
    if text.upper() == "NOP":
        return 0xD503201F
    mn, ops = _split(text, where)
    if mn == "ADRP":
        _fail(where, text, "ADRP depends on the address of the instruction")
    idx = _pcrel_target_index(mn, ops)
    if idx is not None and idx < len(ops) and not _DOT.fullmatch(ops[idx].strip()):
        _fail(where, text, "an instruction value must use .+offset, not a label")
    return assemble_line(text, 0, {}, where)


def assemble_thread(
    test: LitmusTest,
    thread: Thread,
    base: int,
    labels: Mapping[str, int] | None = None,
) -> list[int]:
    """Encodings of ``thread``'s instructions laid out from ``base``, 4 bytes each.

    Labels of the thread's process default to their place in this layout (a fault
    handler names labels of its main thread: pass them in ``labels``, which wins)."""
    own = {lab: base + off for lab, off in thread.label_offsets().items()}
    if labels:
        own.update(labels)
    fname = test.path or "<litmus>"
    out: list[int] = []
    for i, ln in enumerate(thread.instructions()):
        assert ln.instruction is not None
        out.append(assemble_line(ln.instruction, base + 4 * i, own, f"{fname}:{ln.line_no}"))
    return out


def process_labels(test: LitmusTest, bases: Mapping[str, int]) -> dict[int, dict[str, int]]:
    """Addresses of every label of every process, given the base address of each thread
    by name (``{"P0": 0x10000, "P1": 0x20000, "P1.F": 0x30000}``)."""
    out: dict[int, dict[str, int]] = {}
    for th in test.threads:
        if th.name not in bases:
            raise LitmusError(f"{test.path or '<litmus>'}:0: no base address for {th.name}")
        for lab, off in th.label_offsets().items():
            out.setdefault(th.proc, {})[lab] = bases[th.name] + off
    return out
