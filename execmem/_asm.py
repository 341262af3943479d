"""``execmem.asm``: Keystone assembly in which every statement is accounted for.

Keystone 0.9.2 does not always say when it fails: it drops statements it cannot
encode (``movq %rsp, %rbp`` in Intel syntax vanished from ``push rbp; movq %rsp,
%rbp; pop rbp; ret``), returns nothing at all for some (``jmp dword 0x100``),
truncates out-of-reach branch targets (``jmp 0x100000000`` from 0 came out as ``jmp
0``, arm64 ``b.eq`` over 1 MiB as a backward branch), and on other inputs loops
forever, crashes or exits the process.  So ``asm``:

1. checks the source against a positive policy (``_asm_source``: what is accepted,
   and which measured failure each rule closes);
2. gives Keystone one statement per line, each after a probe label
   ``__execmem_K:``, followed by a table of ``.long`` label differences: labels emit
   no bytes, so the table is Keystone's own layout, the offset of every statement;
3. accounts for every statement's bytes: data has the bytes its literal operands
   give (or the size its operands give), padding reaches its alignment (with its
   fill byte), an instruction's bytes decode (Capstone) into
   whole instructions that begin and end at the statement's bounds (a stand-alone
   prefix such as ``rep`` joins the next statement's instruction), and a
   PC-relative target is the one the source names (written as a label, a
   ``symbols=`` name, ``.`` or a number, optionally plus or minus a number);
4. assembles in this process only inputs measured to be safe there (few
   statements, small output, and on architectures where Keystone exits on a bad
   fixup, no label reference that could produce one); any other input goes to a
   disposable helper process (``_asm_engine.Helper``) whose crash or timeout is an
   ``AssemblyError``;
5. names the first failing statement: an accounting mismatch names it directly; a
   Keystone error is located by assembling prefixes (binary search), each followed
   by stub definitions of the labels the cut-off statements define.

``symbols={name: value}`` become absolute definitions ahead of the code, not
Keystone's symbol resolver: the resolver is a ctypes callback, which libffi makes
on a writable and executable page (measured: one ``rwxp`` mapping appears at the
first callback), and Keystone 0.9.2 applies its values wrongly to PC-relative
operands (``call ext`` at 0x1000 with ``ext`` = 0x1010 encoded a call to 0x1014).
"""

from __future__ import annotations

import itertools
import operator
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import keystone

from execmem import arch as _arch
from execmem._asm_engine import Helper, KeystoneFailure, assemble, decode, decode_one, normalize
from execmem._asm_operands import number, split_operands, tokens
from execmem._asm_source import MAX_STATEMENTS, PROBE, Kind, Statement, parse
from execmem._errors import AssemblyError, UnsupportedError

#: Inputs with more statements than this are assembled in the helper process
#: (Keystone takes about 2-3 microseconds per statement: about 30 ms here).
INPROCESS_STATEMENTS = 10_000
_TABLE_ROW = 64  # label differences per ``.long`` line of the offset table
_NAME = re.compile(r"[A-Za-z_][\w.$@]{0,255}")
_IMMEDIATE = re.compile(r"#?(-?(?:0x[0-9a-f]+|[0-9]+))")


class _Mismatch(Exception):
    """Keystone's output does not account for statement ``index`` (``None``: unknown)."""

    def __init__(self, index: int | None, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


@dataclass
class _Job:
    """One ``asm`` call: what it assembles for, and where."""

    spec: _arch.ArchSpec
    dialect: _arch.AsmDialect
    syntax: _arch.AsmSyntax
    address: int
    symbols: dict[str, int]
    helper: Helper

    # -- assembling ---------------------------------------------------------------------------

    def attempt(self, statements: list[Statement], *, partial: bool = False) -> bytes:
        """The machine code of ``statements``, every statement accounted for; raises
        ``KeystoneFailure`` or ``_Mismatch``.  ``partial``: a prefix of a source (a
        trailing stand-alone prefix is not an error)."""
        text = self._text(statements)
        if self._inprocess(statements):
            out = assemble(self.spec, self.syntax, text, self.address)
        else:
            out = self.helper.assemble(self.spec, self.syntax, text, self.address)
        offsets = self._offsets(out, len(statements))
        code = bytearray(out[: offsets[-1]])
        labels = {label: k for k, st in enumerate(statements) for label in st.labels}
        for k, st in enumerate(statements):
            if st.long_branch:
                self._encode_long_branch(statements, k, offsets, labels, code)
        self._account(statements, offsets, bytes(code), labels, partial=partial)
        return bytes(code)

    def _text(self, statements: list[Statement]) -> str:
        lines = [f"{name} = {value % (1 << 64):#x}" for name, value in self.symbols.items()]
        for k, st in enumerate(statements):
            body = st.text
            if st.long_branch:
                branch = self._branch(st.long_branch)
                placeholder = ", ".join(f"{b:#x}" for b in branch.match.to_bytes(branch.size, "little"))
                body = "".join(f"{label}: " for label in st.labels) + ".byte " + placeholder
            lines.append(f"{PROBE}{k}: {body}")
        n = len(statements)
        lines.append(f"{PROBE}{n}:")
        for row in range(1, n + 1, _TABLE_ROW):
            lines.append(".long " + ", ".join(f"{PROBE}{k} - {PROBE}0" for k in range(row, min(row + _TABLE_ROW, n + 1))))
        return "\n".join(lines)

    def _inprocess(self, statements: list[Statement]) -> bool:
        """Whether Keystone was measured to be safe on ``statements`` in this process."""
        dialect = self.dialect
        if len(statements) > INPROCESS_STATEMENTS or sum(st.bound for st in statements) > dialect.inprocess_output:
            return False
        if not dialect.fixups_abort:
            return True
        # Keystone exits on an out-of-range or misaligned fixup: labels only where the
        # distance fits (a branch target), and when data could leave a label misaligned,
        # no label references at all.
        if any(st.fixup_risk for st in statements):
            return False
        align = self.spec.insn_align
        misaligned = any(st.kind is Kind.DATA and (st.size or 0) % align for st in statements)
        return not (misaligned and any(st.label_reference for st in statements))

    def _offsets(self, out: bytes, n: int) -> list[int]:
        """Each statement's offset, and the end of the code, from the table at the end."""
        end = len(out) - 4 * n
        if end < 0:
            raise _Mismatch(None, "Keystone's output is incomplete (it dropped statements)")
        offsets = [0, *struct.unpack_from(f"<{n}I", out, end)]
        if offsets[-1] != end or any(a > b for a, b in itertools.pairwise(offsets)):
            raise _Mismatch(None, "Keystone's output has bytes no statement accounts for")
        return offsets

    def _branch(self, name: str) -> _arch.DirectBranch:
        return next(b for b in self.spec.direct_branches if b.name == name)

    def _encode_long_branch(
        self, statements: list[Statement], k: int, offsets: list[int], labels: dict[str, int], code: bytearray
    ) -> None:
        st, branch = statements[k], self._branch(statements[k].long_branch)
        a = offsets[k]
        if offsets[k + 1] - a != branch.size or len(st.operands) != 1:
            raise _Mismatch(k, f"{{disp32}} needs one target operand ({branch.name})")
        target = self._target(st.operands[0], k, offsets, labels)
        if target is None:
            raise _Mismatch(k, _UNCHECKABLE)
        encoded = branch.encode(bytes(code[a : a + branch.size]), self.address + a, target)
        if encoded is None:
            raise _Mismatch(k, f"target {target:#x} is out of reach of {branch.name} at {self.address + a:#x}")
        code[a : a + branch.size] = encoded

    # -- accounting ---------------------------------------------------------------------------

    def _account(
        self, statements: list[Statement], offsets: list[int], code: bytes, labels: dict[str, int], *, partial: bool
    ) -> None:
        run: list[int] = []  # instruction statements since the last data
        for k, st in enumerate(statements):
            a, b = offsets[k], offsets[k + 1]
            if st.kind is Kind.INSTRUCTION:
                if a == b:
                    raise _Mismatch(k, "Keystone produced no machine code for it (it drops some statements it cannot encode)")
                if (self.address + a) % self.spec.insn_align:
                    raise _Mismatch(k, f"the instruction is at {self.address + a:#x}, not {self.spec.insn_align}-byte aligned (data before it?)")
                run.append(k)
            elif st.kind is Kind.LABEL:
                if a != b:
                    raise _Mismatch(k, f"Keystone produced {b - a} bytes for labels")
            else:
                self._check_run(statements, run, offsets, code, labels, partial=False)
                run = []
                if st.kind is Kind.DATA and b - a != st.size:
                    raise _Mismatch(k, f"Keystone produced {b - a} bytes where the directive gives {st.size}")
                if st.kind is Kind.ALIGN and (b - a >= st.align or (self.address + b) % st.align):
                    raise _Mismatch(k, f"Keystone's padding does not reach a multiple of {st.align}")
                if st.expected is not None:
                    pattern, count = st.expected
                    count = count if st.kind is Kind.DATA else b - a
                    if code[a:b] != pattern * count:
                        raise _Mismatch(k, f"Keystone produced {code[a:b][:16].hex()} where the directive gives {(pattern * count)[:16].hex()}")
        self._check_run(statements, run, offsets, code, labels, partial=partial)

    def _check_run(
        self, statements: list[Statement], run: list[int], offsets: list[int], code: bytes, labels: dict[str, int], *, partial: bool
    ) -> None:
        """Instruction statements ``run`` (consecutive in the output) decode into whole
        instructions at their bounds, and their PC-relative targets are right."""
        if not run:
            return
        start, end, base = offsets[run[0]], offsets[run[-1] + 1], self.address
        insns = decode(self.spec, code[start:end], base + start)
        wrap = (1 << 64) - 1  # addresses wrap at the top of the address space
        starts = {(insn[0] - base) & wrap for insn in insns}
        by_end = {(insn[0] + insn[1] - base) & wrap: insn for insn in insns}
        covered = start + sum(insn[1] for insn in insns)
        prefixes, pc_relative = self.dialect.prefixes, self.dialect.pc_relative
        pending: int | None = None  # start of stand-alone prefixes waiting for their instruction
        for k in run:
            st, a, b = statements[k], offsets[k], offsets[k + 1]
            alone = st.name in prefixes and not st.operands
            if a <= covered < b:
                if alone and not partial:
                    raise _Mismatch(k, "a prefix without an instruction after it")
                raise _Mismatch(k, f"Keystone produced bytes that do not decode as instructions ({code[a:b].hex()})")
            if alone:
                pending = a if pending is None else pending
                continue
            first, pending = (a if pending is None else pending), None
            if first not in starts or b not in by_end:
                raise _Mismatch(k, f"its bytes are not whole instructions ({code[a:b].hex()})")
            insn = by_end[b]
            mnemonic = insn[2]
            if mnemonic in pc_relative or (("." in mnemonic or " " in mnemonic) and normalize(mnemonic) in pc_relative):
                self._check_target(statements, k, insn, offsets, labels)
        if pending is not None and not partial:
            raise _Mismatch(run[-1], "a prefix without an instruction after it")

    def _check_target(
        self, statements: list[Statement], k: int, insn: tuple[int, int, str, str], offsets: list[int], labels: dict[str, int]
    ) -> None:
        address, _size, mnemonic, op_str = insn
        name = normalize(mnemonic)
        if not op_str:
            return
        encoded = _IMMEDIATE.fullmatch(split_operands(op_str)[-1])
        if encoded is None:  # an indirect branch or a memory operand
            return
        st = statements[k]
        wanted = self._target(st.operands[-1] if st.operands else "", k, offsets, labels)
        if wanted is None:
            raise _Mismatch(k, _UNCHECKABLE)
        page = dict(self.dialect.page_relative).get(name, 1)
        wanted = wanted % (1 << 64) & ~(page - 1)
        got = int(encoded.group(1), 0) % (1 << 64)
        if got != wanted:
            raise _Mismatch(
                k,
                f"Keystone encoded the target {wanted:#x} as {got:#x}: it is out of reach from {address:#x}"
                " (or Keystone 0.9.2 gets this encoding wrong)",
            )

    def _target(self, operand: str, k: int, offsets: list[int], labels: dict[str, int]) -> int | None:
        """The value of a branch target written ``[+-] term ((+|-) term)*`` (a term: a
        number, a label, a symbol or ``.``), or ``None`` for anything else."""
        total, sign, want_term, started = 0, 1, True, False
        for kind, text in tokens(operand[1:] if operand.startswith("#") else operand):
            if want_term and text in ("+", "-") and not started:
                sign, started = (-1 if text == "-" else 1), True
            elif want_term:
                value = self._value(kind, text, k, offsets, labels)
                if value is None:
                    return None
                total, want_term, started = total + sign * value, False, True
            elif text in ("+", "-"):
                sign, want_term = (-1 if text == "-" else 1), True
            else:
                return None
        return None if want_term else total

    def _value(self, kind: str, text: str, k: int, offsets: list[int], labels: dict[str, int]) -> int | None:
        if kind == "num":
            return number(text)
        if kind != "id":
            return None
        if text == ".":
            return self.address + offsets[k]
        if text in labels:
            return self.address + offsets[labels[text]]
        return self.symbols.get(text)

    # -- locating a failure -------------------------------------------------------------------

    def locate(self, statements: list[Statement]) -> tuple[int, str] | None:
        """``(index, reason)`` of the first statement whose inclusion fails, found by
        binary search over prefixes, or ``None`` when that is not monotonic; a trial
        that times out in the helper raises its ``KeystoneFailure``."""

        def fails(k: int) -> str | None:
            try:
                self.attempt(_prefix(statements, k), partial=True)
            except _Mismatch as exc:
                return exc.reason
            except KeystoneFailure as exc:
                if exc.timed_out:
                    raise
                return self._explain(statements, k, exc)
            return None

        lo, hi = 0, len(statements)  # when monotonic: prefix lo passes, prefix hi fails
        if fails(lo) is not None or (reason := fails(hi)) is None:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if (why := fails(mid)) is not None:
                hi, reason = mid, why
            else:
                lo = mid
        return (hi - 1, reason) if fails(hi - 1) is None else None

    def _explain(self, statements: list[Statement], k: int, failure: KeystoneFailure) -> str:
        """Keystone's message for prefix ``k``, naming the undefined symbol when that is
        the failure, and what a fixup failure is likely to mean."""
        if failure.crashed and "fixup" in str(failure):
            return f"{failure} once this statement is included (a branch or reference across it cannot reach, or is misaligned with, its target)"
        if failure.errno != keystone.KS_ERR_ASM_SYMBOL_MISSING or k == 0:
            return str(failure)
        known = {label for s in statements for label in s.labels} | set(self.symbols) | {"."}
        names = sorted(
            {text for op in statements[k - 1].operands for kind, text in tokens(op) if kind == "id" and text not in known}
        )
        names = [name for name in names if _NAME.fullmatch(name)][:8]  # "$ = 0" would make Keystone loop
        missing = []
        for name in names:  # undefined: still missing when every other candidate is defined
            others = {n: 0 for n in names if n != name}
            trial = _Job(self.spec, self.dialect, self.syntax, self.address, {**self.symbols, **others}, self.helper)
            try:
                trial.attempt(_prefix(statements, k), partial=True)
            except KeystoneFailure as exc:
                if exc.errno == keystone.KS_ERR_ASM_SYMBOL_MISSING:
                    missing.append(name)
            except _Mismatch:
                pass
        if not missing:
            return str(failure)
        return f"undefined symbol {', '.join(map(repr, missing))} (define it as a label or pass symbols={{name: address}})"


def _prefix(statements: list[Statement], k: int) -> list[Statement]:
    """The first ``k`` statements, then stub definitions of the labels the others
    define (so that references to them still resolve)."""
    later = [label for st in statements[k:] for label in st.labels]
    return statements[:k] + [Statement(0, f"{label}:", (label,), Kind.LABEL) for label in later]


# Load every architecture now rather than inside a first asm() call: a fork while
# another thread imports a module leaves that module's import lock held forever in
# the child (CPython resets only the global import lock at fork), and the child's
# asm() would wait for it (measured).
for _name in _arch.names():
    _arch.get(_name)

_UNCHECKABLE = (
    "asm() cannot check that the target is in reach (Keystone 0.9.2 silently truncates one "
    "that is not): write it as a label, a symbols= name, '.' or a number, optionally "
    "plus or minus a number"
)


def _check_names(statements: list[Statement], symbols: dict[str, int]) -> None:
    """Labels and ``symbols=`` names do not collide, and every subtracted name is
    defined (see ``subtracted_names``)."""
    labels = {label for st in statements for label in st.labels}
    for st in statements:
        clash = next((label for label in st.labels if label in symbols), None) if symbols else None
        if clash is not None:
            raise st.fail(f"{clash!r} is both a label and a symbols= name")
        for name in st.subtracted:
            if name != "." and name not in labels and name not in symbols:
                raise st.fail(
                    f"undefined symbol {name!r} in a subtraction (define it as a label or pass symbols={{name: address}})"
                )


def _symbols(symbols: object) -> dict[str, int]:
    if symbols is None:
        return {}
    if not isinstance(symbols, Mapping):
        raise TypeError(f"asm() symbols must be a mapping of names to addresses, not {type(symbols).__name__}")
    if len(symbols) > MAX_STATEMENTS:
        raise AssemblyError(f"{len(symbols)} symbols; asm() accepts at most {MAX_STATEMENTS}")
    out: dict[str, int] = {}
    for name, value in symbols.items():
        if not isinstance(name, str):
            raise TypeError(f"asm() symbol names must be str, not {type(name).__name__}")
        if isinstance(value, bool):
            raise TypeError(f"asm() symbol {name!r} must be an integer address, not bool")
        try:
            address = operator.index(value)
        except TypeError:
            raise TypeError(f"asm() symbol {name!r} must be an integer address, not {type(value).__name__}") from None
        if _NAME.fullmatch(name) is None or name.startswith(PROBE):
            raise AssemblyError(f"symbol name {name!r} is not an identifier ([A-Za-z_][A-Za-z0-9_.$@]*, not {PROBE}...)")
        if not -(1 << 63) <= address < 1 << 64:
            raise AssemblyError(f"symbol {name!r} = {address:#x} is outside the 64-bit address space")
        out[name] = address
    return out


def asm(
    source: str,
    arch: str | None = None,
    address: int = 0,
    *,
    syntax: str | None = None,
    symbols: Mapping[str, int] | None = None,
) -> bytes:
    """Assemble ``source`` for ``arch`` (default: the host) as if placed at ``address``.

    ``syntax``: ``"intel"`` (the default) or ``"att"`` on x86-64.  ``symbols`` maps
    names the source may use (``call printf``) to their addresses.  Raises
    ``AssemblyError`` naming the first statement that does not assemble (or that the
    policy refuses, see the README), ``UnsupportedError`` for an architecture Keystone
    cannot assemble (riscv64) or a syntax it does not have.
    """
    if not isinstance(source, str):
        raise TypeError(f"asm() source must be str, not {type(source).__name__}")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"asm() arch must be str or None, not {type(arch).__name__}")
    if syntax is not None and not isinstance(syntax, str):
        raise TypeError(f"asm() syntax must be str or None, not {type(syntax).__name__}")
    if isinstance(address, bool):
        raise TypeError("asm() address must be int, not bool")
    try:
        address = operator.index(address)
    except TypeError:
        raise TypeError(f"asm() address must be int, not {type(address).__name__}") from None
    spec = _arch.get(arch)
    dialect = spec.asm
    if dialect is None or spec.engines.keystone is None:
        raise UnsupportedError(
            f"Keystone has no {spec.name} assembler; write the code as bytes "
            "(or `.word` directives assembled elsewhere) and pass them to JitText.write"
        )
    known = {s.name: s for s in dialect.syntaxes}
    chosen = dialect.syntaxes[0] if syntax is None else known.get(syntax.lower())
    if chosen is None:
        raise UnsupportedError(f"{spec.name} has no {syntax!r} assembler syntax; known: {', '.join(known)}")
    try:
        if not 0 <= address < 1 << 64:
            raise AssemblyError(f"address {address:#x} is outside the 64-bit address space")
        if address % spec.insn_align:
            raise AssemblyError(f"address {address:#x} is not {spec.insn_align}-byte aligned, as {spec.name} instructions must be")
        named = _symbols(symbols)
        statements = parse(source, spec, chosen)
        _check_names(statements, named)
        if not statements:
            return b""
        with Helper() as helper:
            job = _Job(spec, dialect, chosen, address, named, helper)
            try:
                return job.attempt(statements)
            except _Mismatch as exc:
                if exc.index is not None:
                    raise statements[exc.index].fail(exc.reason) from None
                failure = exc.reason
            except KeystoneFailure as exc:
                if exc.timed_out:  # each trial of locating it could take as long again
                    raise AssemblyError(f"{exc}; the statement was not located") from None
                failure = str(exc)
            try:
                found = job.locate(statements)
            except KeystoneFailure as exc:  # a trial timed out: stop there
                raise AssemblyError(f"{failure} (locating the statement stopped: {exc})") from None
        if found is None:
            raise AssemblyError(f"{failure} (the failing statement could not be isolated)")
        index, reason = found
        raise statements[index].fail(reason)
    except AssemblyError as exc:
        raise AssemblyError(f"{spec.name}: {exc}") from None


__all__ = ["asm", "decode_one"]
