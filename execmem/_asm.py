"""Assembly (Keystone) and single-instruction decoding (Capstone) for the public API.

``asm`` returns machine code for the text of one architecture.  Keystone reports
*that* a source failed, rarely *where*: the failing line is found by assembling
prefixes of the source (binary search), each followed by stub definitions of the
labels the cut-off lines define, so that forward references in the prefix still
resolve and the first prefix that fails ends at the culprit.  The search is
confirmed (the prefix one line shorter must succeed) and falls back to a linear
scan when Keystone's behaviour is not monotonic in the prefix.

Before Keystone sees a source, ``asm`` checks what Keystone 0.9.2 mishandles:
non-ASCII text (its wrapper raises ``UnicodeEncodeError``), NUL (the C string would
end there, silently dropping the rest) and statements Keystone's parser loops on
forever in C, uninterruptibly (see ``_check_statements``).

``decode_one`` is what ``JitText.update`` uses to check the patch rule: whether
some bytes are exactly one whole instruction, and its (normalized) mnemonic.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import capstone
import keystone

from execmem import arch as _arch
from execmem._errors import AssemblyError, UnsupportedError

_LABEL = re.compile(r"^\s*([A-Za-z_.$][\w.$]*)\s*:(?!:)")

# Keystone and Capstone handles are not thread-safe: one lock serializes them.  It is
# re-entrant because a Python signal handler runs in the main thread between two
# bytecodes of whatever the main thread was doing, possibly inside ``asm`` with the
# lock held: with a plain Lock the handler's own ``asm`` call waited forever.  An
# RLock alone is not enough, though.  The handler's call runs to completion before
# the interrupted one resumes (the C calls themselves are never interrupted), but the
# wrappers make several C calls on one handle that share its state: Keystone's
# ``Ks.asm`` calls ``ks_asm`` and then, on failure, ``ks_errno(handle)``; Capstone's
# ``Cs.disasm`` calls ``cs_disasm`` and then ``cs_errno(handle)``.  A handler running
# between the two on the same handle would overwrite the errno, and the interrupted
# call would report the handler's error (or none).  So a nested call - which can
# only come from the thread that holds the lock - uses its own handle, one per
# nesting depth; other threads still wait for the lock as before.
_lock = threading.RLock()
_depth = 0  # asm/decode_one calls in progress on the thread holding _lock (nesting)
_assemblers: dict[tuple[str, int], Any] = {}
_disassemblers: dict[tuple[str, int], Any] = {}


def _keystone(spec: _arch.ArchSpec, depth: int = 0) -> Any:
    if spec.engines.keystone is None:
        raise UnsupportedError(
            f"Keystone has no {spec.name} assembler; write the code as bytes "
            "(or `.word` directives assembled elsewhere) and pass them to JitText.write"
        )
    with _lock:
        ks = _assemblers.get((spec.name, depth))
        if ks is None:
            ks = _assemblers[spec.name, depth] = keystone.Ks(*spec.engines.keystone)
        return ks


def _assemble(spec: _arch.ArchSpec, source: str, address: int) -> bytes:
    """Raw Keystone call; raises ``keystone.KsError``."""
    global _depth
    with _lock:  # a Keystone handle is not thread-safe; nesting: see _lock
        ks = _keystone(spec, _depth)
        _depth += 1
        try:
            encoding, _count = ks.asm(source, address)
        finally:
            _depth -= 1
    return bytes(encoding or b"")


# --- statements Keystone 0.9.2 loops forever on ------------------------------------------
#
# Established by running each candidate under ks_asm in a child process with a timeout,
# on x86-64 and arm64 (the same on both): a statement loops forever when, after its
# labels, it starts with a token that is not an identifier - any of
# ! % & ( ) * + , - / : < = > [ \ ] ^ | ~ (also as the first statement), and after an
# earlier statement also " ' ? ` and control characters - or with "$(", "@(", "0x",
# ".1" (a number), an unterminated string or "/*".  The same parse (an identifier
# expected, a punctuation token found) loops in directives that take a symbol name:
# ".globl (", ".foo [", ".foo ,".  Keystone ends statements at "\n", "\r" and ";" (on
# both architectures, outside strings and comments); "/* */" comments are blanks
# (they may span lines); "#" and "//" at the start of a statement comment out the
# rest of the line (elsewhere they are not comments: "#1" is an arm64 immediate).
#
# So a statement must be empty, a comment, a "#" line marker, or start with an
# identifier: a letter or "_" (mnemonic, prefix or "symbol = value"), or "." and no
# digit (directive).  A
# directive other than the data/expression ones below must be followed by nothing
# or an operand starting with an identifier, number, string, "$" or "#".  Operands
# are not checked otherwise: "mov eax, [rbx]" and "ldr x0, [x1, #-8]!" are ordinary.

_STATEMENT_LABEL = re.compile(r'(?:[A-Za-z_.$@][\w.$@]*|"(?:[^"\\\n\r]|\\.)*")[ \t]*:(?!:)[ \t]*')
_STATEMENT_START = re.compile(r"[A-Za-z_#]|\.(?![0-9])")
_DIRECTIVE = re.compile(r"\.[\w.$@]*")
_OPERAND_START = re.compile(r'[\w.$@"#]')
#: "#" then (blanks and) a digit, ";" or the end of the line is a line marker
#: ("# 1 file"), which ends at ";"; "#" then anything else, and "//", comment out
#: the rest of the line (measured: "# x ; (" is fine, "# 1 ; (" loops).
_LINE_COMMENT = re.compile(r"#(?![ \t]*(?:[0-9;\r\n]|$))|//")
_STRING = re.compile(r'"(?:[^"\\\n\r]|\\[^\n\r])*"')
_CHAR_LITERAL = re.compile(r"'(?:[^'\\\n\r]|\\[^\n\r])'")
#: Where an expression operand of a data directive needs a value (at the start, after
#: "," "(" or an operator) these characters make Keystone loop (".byte 1, %", ".quad ((").
_NO_PRIMARY = frozenset("%&)*,/:<=>[\\]^|")
_OPERATORS = frozenset("+-*/%&|^<>=!~")
_TWO_CHAR_OPERATORS = frozenset({"<<", ">>", "==", "!=", "<=", ">=", "&&", "||", "<>"})
_NOT_DATA = frozenset({"set", "equ", "equiv", "ascii", "asciz", "string", "code16", "code32", "code64"})
#: Directives whose operands are expressions or data, where "(", "[", "-"... are fine.
_EXPRESSION_DIRECTIVES = frozenset(
    {
        *("byte", "short", "hword", "word", "long", "int", "quad", "octa", "2byte", "4byte", "8byte"),
        *("inst", "align", "balign", "p2align", "fill", "space", "skip", "zero", "org"),
        *("ascii", "asciz", "string", "float", "double", "single", "set", "equ", "equiv", "nops"),
        *("code16", "code32", "code64", "intel_syntax", "att_syntax"),
    }
)


def _statements(source: str) -> Iterator[tuple[int, str]]:
    """``(line, statement)`` for each statement as Keystone splits ``source``:
    comments blanked, strings kept whole; ``line`` is 1-based (lines end at "\\n").
    Raises ``AssemblyError`` for an unterminated ``/*`` comment."""
    line, start_line, i, n = 1, 1, 0, len(source)
    current: list[str] = []
    at_start = True  # nothing but blanks and labels so far in this statement
    while i < n:
        c = source[i]
        if c in "\n\r;":
            yield start_line, "".join(current)
            current, at_start = [], True
            if c == "\n":
                line += 1
            start_line = line
            i += 1
        elif c == "/" and source.startswith("/*", i):
            end = source.find("*/", i + 2)
            if end < 0:
                raise AssemblyError(f"line {line}: unterminated /* comment")
            line += source.count("\n", i, end)
            current.append(" ")
            i = end + 2
        elif at_start and _LINE_COMMENT.match(source, i) and not "".join(current).strip(" \t"):
            while i < n and source[i] not in "\n\r":  # a comment to the end of the line
                i += 1
        elif c == "'" and (char := _CHAR_LITERAL.match(source, i)) is not None:
            current.append(char.group())
            i = char.end()
        elif c == '"':
            string = _STRING.match(source, i)
            if string is None:
                raise AssemblyError(f"line {line}: unterminated string")
            current.append(string.group())
            i = string.end()
        else:
            current.append(c)
            if c not in " \t":
                at_start = False
            i += 1
            # labels keep at_start: "l: # x" is a label and a comment
            if c == ":" and _STATEMENT_LABEL.fullmatch("".join(current).lstrip(" \t")):
                at_start = True
    yield start_line, "".join(current)


def _bad_expression(operands: str, bare_dot_hangs: bool) -> str | None:
    """The character at which a data directive's operand list needs a value and has
    one Keystone loops on (see ``_NO_PRIMARY``), else ``None``.  A bare ``.`` (the
    current address) loops too on arm64."""
    want_value, i, n = True, 0, len(operands)
    while i < n:
        c = operands[i]
        if c in " \t":
            i += 1
            continue
        if want_value:
            if c in _NO_PRIMARY:
                return c
            if c == "." and bare_dot_hangs and not re.match(r"\.[\w.$@]", operands[i:]):
                return c
            if c in "(+-~!":
                i += 1
                continue
            token = re.match(r"[\w.$@]+|\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)'", operands[i:])
            i += token.end() if token is not None else 1
            want_value = False
        else:
            want_value = c in _OPERATORS or c in ",("
            i += 2 if operands[i : i + 2] in _TWO_CHAR_OPERATORS else 1
    return None


def _strip_labels(statement: str) -> str:
    rest = statement.lstrip(" \t")
    while True:
        match = _STATEMENT_LABEL.match(rest)
        if match is None:
            return rest
        rest = rest[match.end() :]


def _check_source(spec: _arch.ArchSpec, source: str) -> None:
    """Refuse (``AssemblyError``) what Keystone would mishandle: see the module docstring."""
    lines = source.split("\n")
    for number, text in enumerate(lines, 1):
        bad = next((c for c in text if ord(c) > 127 or c == "\0"), None)
        if bad is not None:
            what = "a NUL character" if bad == "\0" else f"non-ASCII character {bad!r} (U+{ord(bad):04X})"
            raise AssemblyError(f"{spec.name}: line {number}: {text.strip()!r}: {what}; Keystone reads ASCII only")
    try:
        statements = list(_statements(source))
    except AssemblyError as exc:
        raise AssemblyError(f"{spec.name}: {exc}") from None
    for number, statement in statements:
        rest = _strip_labels(statement)
        if not rest.strip(" \t"):
            continue
        reason = None
        if _STATEMENT_START.match(rest) is None:
            reason = f"a statement cannot start with {rest[0]!r}"
        elif rest[0] == ".":
            directive = _DIRECTIVE.match(rest)
            assert directive is not None
            operand = rest[directive.end() :].lstrip(" \t")
            name = directive.group()[1:].lower()
            if name not in _EXPRESSION_DIRECTIVES:
                if operand and _OPERAND_START.match(operand) is None:
                    reason = f"directive {directive.group()} cannot take an operand starting with {operand[0]!r}"
            elif name not in _NOT_DATA:
                bad = _bad_expression(operand, spec.name == "arm64")
                if bad is not None:
                    reason = f"directive {directive.group()}: {bad!r} where a value is expected"
        if reason is not None:
            text = lines[number - 1].strip()
            raise AssemblyError(
                f"{spec.name}: line {number}: {text!r}: {reason} (Keystone would never return)"
            )


def _labels(lines: list[str]) -> list[str]:
    """Labels defined by ``lines`` (also after ``;`` statement separators)."""
    found: list[str] = []
    for line in lines:
        for statement in line.split(";"):
            rest = statement
            while True:
                match = _LABEL.match(rest)
                if match is None:
                    break
                found.append(match.group(1))
                rest = rest[match.end() :]
    return found


def _prefix_fails(spec: _arch.ArchSpec, lines: list[str], k: int, address: int) -> bool:
    """Whether the first ``k`` lines fail to assemble, with later labels stubbed."""
    stubs = [f"{label}:" for label in _labels(lines[k:])]
    try:
        _assemble(spec, "\n".join(lines[:k] + stubs), address)
    except keystone.KsError:
        return True
    return False


def _failing_line(spec: _arch.ArchSpec, lines: list[str], address: int) -> int | None:
    """1-based number of the first failing line, or ``None`` if it cannot be isolated."""
    lo, hi = 0, len(lines)  # invariant (when monotonic): prefix lo passes, prefix hi fails
    if _prefix_fails(spec, lines, 0, address):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _prefix_fails(spec, lines, mid, address):
            hi = mid
        else:
            lo = mid
    if _prefix_fails(spec, lines, hi, address) and not _prefix_fails(spec, lines, hi - 1, address):
        return hi
    for k in range(1, len(lines) + 1):  # not monotonic: scan
        if _prefix_fails(spec, lines, k, address):
            return k
    return None


def asm(source: str, arch: str | None = None, address: int = 0) -> bytes:
    """Assemble ``source`` for ``arch`` (default: the host) as if placed at ``address``.

    Raises ``AssemblyError`` naming the failing line, ``UnsupportedError`` for an
    architecture Keystone cannot assemble (riscv64).
    """
    if not isinstance(source, str):
        raise TypeError(f"asm() source must be str, not {type(source).__name__}")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"asm() arch must be str or None, not {type(arch).__name__}")
    if isinstance(address, bool) or not isinstance(address, int):
        raise TypeError(f"asm() address must be int, not {type(address).__name__}")
    if not 0 <= address < 1 << 64:
        raise AssemblyError(f"address {address:#x} is outside the 64-bit address space")
    spec = _arch.get(arch)
    _keystone(spec)
    _check_source(spec, source)
    try:
        return _assemble(spec, source, address)
    except keystone.KsError as exc:
        error = exc
    lines = source.split("\n")
    line = _failing_line(spec, lines, address)
    if line is None:
        raise AssemblyError(f"{spec.name}: {error} (the failing line could not be isolated)") from None
    text = lines[line - 1].strip()
    raise AssemblyError(f"{spec.name}: line {line}: {text!r}: {error}") from None


def _capstone(spec: _arch.ArchSpec, depth: int = 0) -> Any:
    if spec.engines.capstone is None:
        raise UnsupportedError(f"Capstone cannot decode {spec.name}")
    cs = _disassemblers.get((spec.name, depth))
    if cs is None:
        cs = _disassemblers[spec.name, depth] = capstone.Cs(*spec.engines.capstone)
    return cs


def _normalize(mnemonic: str) -> str:
    """Capstone spells conditional branches by condition (``b.ne``); patch rules use
    the architecture's class name (``b.cond``, Arm ARM C6.2.26)."""
    mnemonic = mnemonic.lower()
    if mnemonic.startswith(("b.", "bc.")):
        return "b.cond"
    return mnemonic


def decode_one(spec: _arch.ArchSpec, code: bytes, address: int) -> str | None:
    """The normalized mnemonic if ``code`` is exactly one whole instruction, else ``None``."""
    global _depth
    with _lock:  # nesting (signal handlers): see _lock
        cs = _capstone(spec, _depth)
        _depth += 1
        try:
            insns = list(cs.disasm(bytes(code), address, 2))
        finally:
            _depth -= 1
    if len(insns) != 1 or insns[0].size != len(code):
        return None
    return _normalize(insns[0].mnemonic)


__all__ = ["asm", "decode_one"]
