"""Reading an assembly source before Keystone sees it: statements, policy, limits.

``asm`` accepts a positive subset of GNU assembler syntax, chosen so that Keystone
0.9.2 can neither loop forever, nor crash, nor read files on any accepted input
(each rule below closes a class measured in a child process with a timeout):

* **Statements** end at a newline, ``\\r`` or ``;``.  ``/* */``, ``//`` and the
  architecture's comment character (``#`` on x86-64) start comments, as does ``#``
  at the start of a statement; comments are removed and runs of blanks collapsed
  to one space before Keystone sees the text (Keystone's lexer recurses once per
  blank and per comment: ~80,000 spaces overflowed the stack).  A statement is
  labels (``name:``) followed by an instruction, an accepted directive or nothing.
  It must start with a letter, ``_`` or ``.``: Keystone loops forever on a
  statement that starts with punctuation or a digit.
* **Directives** (the allow-list): data ``.byte .short .word .long .quad .ascii
  .asciz``, alignment ``.balign N`` and ``.p2align K`` (at most 4096 bytes, with an
  optional fill byte), reserved space ``.space/.zero N`` and ``.fill COUNT[, SIZE[,
  VALUE]]`` and repetition ``.rept N`` ... ``.endr`` (expanded here) with literal
  counts.  Everything else is refused: ``.incbin``/``.include`` read files,
  ``.cfi_*`` abort the process (``LLVM ERROR: Unfinished frame!``), ``.section``
  and ``.inst`` silently drop code, ``.error`` is ignored, symbol assignments
  (``=``, ``.set``, ``.equ``) can chain into exponential evaluation.
* **Operands**: numbers are decimal, ``0x`` hex, ``0b`` binary or ``0`` octal and
  below 2**64 (a larger literal in a data directive made Keystone loop forever);
  at most 64 operator and bracket characters per operand (258 unary minus signs
  in a row looped forever, ~3,000 nested parentheses or ``+`` overflowed a 256 KiB
  thread stack); no relocation specifiers (``:lo12:``, ``#:abs_g0:``: fatal on
  arm64), no ``=`` (literal pools would land after the code), no strings outside
  ``.ascii``/``.asciz``; data expressions are well formed (``.byte 1, %`` looped).
  These looped forever too, and are refused: a mnemonic or directive name glued to
  punctuation (``rep*``), an operand starting with punctuation other than ``[ ( {
  # $ % ' * + - ~ !`` (``l ::``), a prefix followed by anything but an instruction
  (``rep [rax]``), braces holding anything but names, commas and dashes (``nop
  1{*``), ``$`` in a data expression (``.byte $ < x``) and backquote, ``?``, backslash and ``@`` anywhere
  in an operand; arm64 ``.byte l`` (so ``.byte`` takes numbers and label
  differences).  Division (``/``, ``%``) is refused: folding -2**63 / -1 raised
  SIGFPE.  ``_asm`` adds one rule that needs every label: a
  subtracted name must be defined (``subtracted_names``).
* **Numbers** are written in hex before Keystone sees them (``radix_free``).
  (The operand and number rules are implemented in ``_asm_operands``.)
* **Limits**: see ``MAX_*`` below.  The output bound is computed here before
  assembling, from each statement's largest possible size.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterator

from execmem._asm_engine import normalize
from execmem._asm_operands import (
    MAX_OPERATORS,
    check_operand,
    instruction_problem,
    number,
    radix_free,
    relocatable,
    split_operands,
    string_bytes,
    subtracted_names,
)
from execmem._errors import AssemblyError
from execmem.arch import ArchSpec, AsmDialect, AsmSyntax, get

#: Characters in a source, in a line, statements after ``.rept`` expansion and
#: ``symbols=`` names, bytes of output (64 MiB: 32 default packs).
MAX_SOURCE = 4_000_000
MAX_LINE = 65_536
MAX_STATEMENTS = 100_000
MAX_OUTPUT = 64 << 20
MAX_ALIGN = 4096
#: Name prefix of the labels ``asm`` adds to locate each statement's bytes.
PROBE = "__execmem_"

DATA_UNITS = {"byte": 1, "short": 2, "long": 4, "quad": 8}  # and "word": AsmDialect.word_size
STRING_DIRECTIVES = ("ascii", "asciz")
ACCEPTED = ".byte .short .word .long .quad .ascii .asciz .balign .p2align .space .zero .fill .rept/.endr"


class Kind(enum.Enum):
    LABEL = "label"  # labels only: no bytes
    INSTRUCTION = "instruction"
    DATA = "data"  # bytes of a known size
    ALIGN = "align"  # padding up to ``Statement.align``


class Statement:
    """One statement as Keystone will see it (``text``: labels included, normalized)."""

    __slots__ = (
        "align", "bound", "expected", "fixup_risk", "kind", "label_reference", "labels", "line", "long_branch", "name",
        "operands", "size", "source", "subtracted", "text",
    )

    def __init__(
        self,
        line: int,
        source: str,
        labels: tuple[str, ...],
        kind: Kind,
        *,
        text: str | None = None,
        name: str = "",
        operands: tuple[str, ...] = (),
        size: int | None = 0,
        bound: int = 0,
        align: int = 0,
        long_branch: str = "",
    ) -> None:
        self.line = line
        self.source = source  # the statement as written (comments removed), for messages
        self.text = source if text is None else text
        self.labels = labels
        self.kind = kind
        self.name = name  # mnemonic or directive name (lower case, no dot)
        self.operands = operands  # split at top-level commas
        self.size = size  # exact size in bytes when known before assembling
        self.bound = bound  # largest possible size
        self.align = align  # ALIGN: the alignment in bytes
        self.long_branch = long_branch  # ``{disp32}``: the DirectBranch to encode
        self.subtracted: tuple[str, ...] = ()  # names its operands subtract (see subtracted_names)
        #: DATA: ``(pattern, count)`` when its bytes are known (``pattern * count``);
        #: ALIGN: the fill byte when one is given.
        self.expected: tuple[bytes, int] | None = None
        self.label_reference = False  # an instruction naming a label or "." (see _mark_fixup_risks)
        self.fixup_risk = False  # ... anywhere but as a branch target

    def fail(self, reason: str) -> AssemblyError:
        return AssemblyError(f"line {self.line}: {self.source!r}: {reason}")

    def __repr__(self) -> str:
        return f"Statement({self.line}, {self.text!r}, {self.kind.name})"


# -- splitting a source into statements -------------------------------------------------------

_SCAN = re.compile(
    r"""(?P<sep>[\n\r;])|(?P<blank>[ \t]+)|(?P<block>/\*)|(?P<line>//)|(?P<hash>\#)
    |(?P<string>"(?:[^"\\\n\r]|\\[^\n\r])*")|(?P<char>'(?:[^'\\\n\r]|\\[^\n\r])')
    |(?P<text>[^\n\r;\ \t/\#"']+|/)|(?P<bad>["'])""",
    re.X,
)
_LABEL = re.compile(r"([A-Za-z_.][\w.$@]*) ?:(?!:) ?")
#: Characters that need the full scanner (strings, comments, CR); "#" is added where
#: it starts a comment anywhere.
_SPECIAL = re.compile(r"[\"'/\r]")
_SPECIAL_HASH = re.compile(r"[\"'/\r#]")


def split_labels(text: str) -> tuple[tuple[str, ...], str]:
    """The labels at the start of a statement, and the rest."""
    if ":" not in text:
        return (), text
    labels: list[str] = []
    while (m := _LABEL.match(text)) is not None:
        labels.append(m.group(1))
        text = text[m.end() :]
    return tuple(labels), text


def _raw_statements(source: str, dialect: AsmDialect) -> Iterator[tuple[int, str]]:
    """``(line, text)`` per statement: comments removed, blanks collapsed."""
    hash_comments = dialect.line_comment == "#"
    if (_SPECIAL_HASH if hash_comments else _SPECIAL).search(source) is None:
        for line, text in enumerate(source.split("\n"), 1):  # the common case: no strings or comments
            for part in text.split(";") if ";" in text else (text,):
                statement = " ".join(part.split())
                if "#" in statement:  # "#" at the start of a statement: a comment to the end of the line
                    _labels, rest = split_labels(statement)
                    if rest.startswith("#"):
                        yield line, statement[: len(statement) - len(rest)].strip(" ")
                        break
                yield line, statement
        return
    line = 1
    start: int | None = None  # the line of the statement's first token
    parts: list[str] = []
    pos, end = 0, len(source)
    scan = _SCAN.match
    while pos < end:
        m = scan(source, pos)
        assert m is not None  # the alternatives cover every character
        kind, token = m.lastgroup, m.group()
        pos = m.end()
        if kind == "sep":
            yield start or line, "".join(parts).strip(" ")
            parts, start = [], None
            line += token == "\n"
        elif kind == "blank":
            parts.append(" ")
        elif kind == "block":
            close = source.find("*/", pos)
            if close < 0:
                raise AssemblyError(f"line {line}: unterminated /* comment")
            line += source.count("\n", pos, close)
            parts.append(" ")
            pos = close + 2
        elif kind == "line" or (kind == "hash" and (hash_comments or not split_labels("".join(parts).strip(" "))[1])):
            while pos < end and source[pos] not in "\n\r":  # a comment to the end of the line
                pos += 1
        elif kind == "bad":
            what = "string" if token == '"' else "character literal"
            raise AssemblyError(f"line {line}: unterminated or malformed {what}")
        else:
            parts.append(token)
            start = start or line
    yield start or line, "".join(parts).strip(" ")


# -- statements -------------------------------------------------------------------------------

_MNEMONIC = re.compile(r"[A-Za-z_][\w.]*")
_DIRECTIVE = re.compile(r"\.([A-Za-z_][\w.]*)")


def _literal(st: Statement, operand: str, what: str, low: int, high: int) -> int:
    value = number(operand)
    if value is None or not low <= value <= high:
        raise st.fail(f"{what} must be a literal integer in [{low}, {high}], not {operand!r}")
    return value


_CHAR = re.compile(r"'([^'\\])'")


def _value(operand: str) -> int | None:
    """The value of a literal data operand (``-12``, ``0x10``, ``'a'``), else ``None``."""
    char = _CHAR.fullmatch(operand)
    if char is not None:
        return ord(char.group(1))
    negative = operand.startswith("-")
    value = number(operand[1:].lstrip(" ") if negative else operand)
    return None if value is None else -value if negative else value


def _data(st: Statement, size: int) -> Statement:
    st.kind, st.size, st.bound = Kind.DATA, size, size
    return st


def _directive(st: Statement, dialect: AsmDialect) -> Statement:
    """``st`` (a directive) checked against the allow-list, with its size and bound."""
    name, ops = st.name, st.operands
    if name in DATA_UNITS or name == "word":
        unit = dialect.word_size if name == "word" else DATA_UNITS[name]
        if not ops or not all(ops):
            raise st.fail(f".{name} needs one or more values")
        for op in ops:
            if (bad := _NOT_IN_DATA.search(op)) is not None:
                raise st.fail(f"{bad.group()!r} is not accepted in a data expression")
            if (reason := check_operand(op, data=True)) is not None:
                raise st.fail(reason)
        st.subtracted = tuple(name for op in ops for name in subtracted_names(op))
        if unit == 1 and any(relocatable(op) for op in ops):
            raise st.fail(".byte takes numbers and differences of labels (arm64 Keystone looped forever on '.byte l')")
        if name == "word":  # the generic directive: both targets' own .word mishandle errors (measured)
            generic = {2: "short", 4: "long", 8: "quad"}[unit]
            st.text = "".join(f"{label}: " for label in st.labels) + f".{generic} " + ", ".join(ops)
        values = [_value(op) for op in ops]
        if all(v is not None for v in values):
            st.expected = (b"".join((v % (1 << 8 * unit)).to_bytes(unit, "little") for v in values if v is not None), 1)
        return _data(st, unit * len(ops))
    if name in STRING_DIRECTIVES:
        size, text = 0, b""
        for op in ops:
            data = string_bytes(op) if len(op) > 1 and op[0] == op[-1] == '"' else None
            if data is None:
                raise st.fail(f".{name} takes strings (escapes: \\b \\f \\n \\r \\t \\\" \\\\ and octal)")
            size += len(data) + (name == "asciz")
            text += data + b"\0" * (name == "asciz")
        st.expected = (text, 1)
        return _data(st, size)
    if name in ("balign", "p2align"):
        if not 1 <= len(ops) <= 2:
            raise st.fail(f".{name} takes an alignment and an optional fill byte")
        if name == "balign":
            align = _literal(st, ops[0], "the alignment", 1, MAX_ALIGN)
            if align & (align - 1):
                raise st.fail(f"the alignment must be a power of two, not {align}")
        else:
            align = 1 << _literal(st, ops[0], "the alignment", 0, MAX_ALIGN.bit_length() - 1)
        if len(ops) == 2:
            st.expected = (bytes([_literal(st, ops[1], "the fill byte", 0, 255)]), 1)
        st.kind, st.size, st.bound, st.align = Kind.ALIGN, None, align - 1, align
        return st
    if name in ("space", "zero", "fill"):
        most = {"space": 2, "zero": 1, "fill": 3}[name]
        if not 1 <= len(ops) <= most:
            raise st.fail(f".{name} takes 1 to {most} operand(s)")
        count = _literal(st, ops[0], "the count", 0, MAX_OUTPUT)
        # (sizes above 4 keep only 4 bytes of the value, with a warning on stderr: refused)
        unit = _literal(st, ops[1], "the size", 1, 4) if name == "fill" and len(ops) > 1 else 1
        value = 0
        if len(ops) == most and name != "zero":
            value = _literal(st, ops[-1], "the fill value", 0, 255 if name == "space" else (1 << 8 * unit) - 1)
        if count * unit > MAX_OUTPUT:
            raise st.fail(f"{count * unit} bytes is more than asm() produces ({MAX_OUTPUT} bytes)")
        st.expected = (value.to_bytes(unit, "little"), count)
        return _data(st, count * unit)
    if name == "align":
        raise st.fail(".align means bytes on some architectures and a power of two on others: write .balign N or .p2align K")
    if name in ("set", "equ", "equiv"):
        raise st.fail("symbol assignments are not accepted: pass symbols={name: value} or format the value in")
    raise st.fail(f"directive .{name} is not accepted (accepted: {ACCEPTED})")


#: What an instruction operand may start with ("l ::" made Keystone loop forever).
_OPERAND_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.$@%#[({'*+-~!")
_INSTRUCTION = re.compile(r"([A-Za-z_][\w.]*)(?: (.*))?")
_ASSIGNMENT = re.compile(r"[A-Za-z_.$][\w.$@]* ?=(?!=)")
#: Characters no accepted operand needs, on which Keystone misbehaved in fuzzing
#: (``@`` symbol variants and macros, ``$`` in data expressions looped forever).
_NOT_IN_OPERANDS = re.compile(r"[`?\\@]")
_NOT_IN_DATA = re.compile(r"[`?\\@$#:\[\]{}]")


@functools.cache
def _foreign(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _statement(line: int, raw: str, dialect: AsmDialect, syntax: AsmSyntax, insn_size: int) -> Statement | None:
    """Classify and check one raw statement (``None``: empty)."""
    labels, rest = split_labels(raw) if ":" in raw else ((), raw)
    st = Statement(line, raw, labels, Kind.LABEL)
    if labels and any(label.startswith(PROBE) for label in labels):
        raise st.fail(f"names starting with {PROBE} are reserved")
    if not rest:
        return st if labels else None
    if rest[0] == ".":
        directive = _DIRECTIVE.match(rest)
        if directive is None:
            raise st.fail("a statement cannot start with a number")
        if rest[directive.end() : directive.end() + 1] not in ("", " "):
            raise st.fail(f"a directive name cannot be followed by {rest[directive.end()]!r}")
        st.kind, st.name = Kind.DATA, directive.group(1).lower()
        st.operands = split_operands(rest[directive.end() :].strip(" "))
        return st if st.name in ("rept", "endr") else _directive(st, dialect)
    if rest[0] == "{" and rest.startswith("{disp32}"):
        rest = rest[len("{disp32}") :].lstrip(" ")
        word = _MNEMONIC.match(rest)
        st.long_branch = dict(dialect.long_branches).get(word.group().lower() if word else "", "")
        if not st.long_branch:
            forms = ", ".join(name for name, _ in dialect.long_branches) or "no instruction on this architecture"
            raise st.fail(f"{{disp32}} applies to a direct {forms}")
    if _ASSIGNMENT.match(rest):
        raise st.fail("symbol assignments are not accepted: pass symbols={name: value} or format the value in")
    instruction = _INSTRUCTION.fullmatch(rest)
    if instruction is None:
        word = _MNEMONIC.match(rest)
        what = rest[word.end()] if word else rest[0]
        raise st.fail(f"{'a mnemonic cannot be followed by' if word else 'a statement cannot start with'} {what!r}")
    mnemonic, operand_text = instruction.group(1), instruction.group(2) or ""
    st.kind, st.name, st.size, st.bound = Kind.INSTRUCTION, mnemonic.lower(), None, insn_size
    if not operand_text:
        return st
    inner, inner_operands = st.name, operand_text
    while inner in dialect.prefixes and inner_operands:  # "rep movsb": Keystone parses the rest as a statement
        following = _INSTRUCTION.fullmatch(inner_operands)
        if following is None:
            raise st.fail(f"the prefix {inner!r} must be followed by an instruction (Keystone loops on anything else)")
        inner, inner_operands = following.group(1).lower(), following.group(2) or ""
    if (bad := _NOT_IN_OPERANDS.search(operand_text)) is not None:
        raise st.fail(f"{bad.group()!r} is not accepted in an operand")
    if syntax.foreign and _foreign(syntax.foreign).search(operand_text):
        raise st.fail(syntax.hint)
    st.operands = split_operands(operand_text)
    for op in st.operands:
        if "=" in op:
            raise st.fail("'=' is not accepted (no literal pools or assignments: use symbols= or a label and .quad)")
        if not op or op[0] not in _OPERAND_START:
            raise st.fail(f"an operand cannot start with {op[:1]!r}" if op else "an empty operand")
    if (reason := instruction_problem(operand_text, st.operands)) is not None:
        raise st.fail(reason)
    st.subtracted = tuple(name for op in st.operands for name in subtracted_names(op))
    return st


def _expand(statements: list[Statement]) -> list[Statement]:
    """``statements`` with ``.rept N`` ... ``.endr`` blocks repeated (nested allowed)."""
    if not any(st.name in ("rept", "endr") and st.kind is Kind.DATA for st in statements):
        return statements
    stack: list[tuple[Statement, int, list[Statement]]] = []
    out: list[Statement] = []
    for st in statements:
        if st.kind is Kind.DATA and st.name == "rept":
            if st.labels or len(st.operands) != 1:
                raise st.fail(".rept takes one count and no label")
            count = _literal(st, st.operands[0], "the count", 0, MAX_STATEMENTS)
            stack.append((st, count, out))
            out = []
        elif st.kind is Kind.DATA and st.name == "endr":
            if not stack or st.labels or st.operands:
                raise st.fail(".endr without .rept (or with a label or operands)")
            _, count, outer = stack.pop()
            if len(outer) + len(out) * count > MAX_STATEMENTS:
                raise st.fail(f"more than {MAX_STATEMENTS} statements after .rept expansion")
            outer.extend(out * count)
            out = outer
        else:
            out.append(st)
    if stack:
        raise stack[-1][0].fail(".rept without .endr")
    return out


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


#: Sources up to this size are remembered (the last 128): a JIT often assembles one
#: source twice (at address 0 for its size, then at its address).  Statements are
#: never modified after parsing, so they are shared.
_CACHE_SOURCE = 16 << 10


def parse(source: str, spec: ArchSpec, syntax: AsmSyntax) -> list[Statement]:
    """The statements of ``source`` for ``spec``, every policy rule checked (``AssemblyError``)."""
    assert spec.asm is not None
    if len(source) > _CACHE_SOURCE:
        return _parse(source, spec.asm, syntax, spec.max_insn_size)
    return list(_parse_cached(source, spec.name, syntax.name))


@functools.lru_cache(maxsize=128)
def _parse_cached(source: str, arch: str, syntax: str) -> tuple[Statement, ...]:
    spec = get(arch)
    assert spec.asm is not None
    chosen = next(s for s in spec.asm.syntaxes if s.name == syntax)
    return tuple(_parse(source, spec.asm, chosen, spec.max_insn_size))


def _parse(source: str, dialect: AsmDialect, syntax: AsmSyntax, insn_size: int) -> list[Statement]:
    if len(source) > MAX_SOURCE:
        raise AssemblyError(f"the source has {len(source)} characters; asm() accepts at most {MAX_SOURCE}")
    lines = source.split("\n")
    if max(map(len, lines)) > MAX_LINE:
        number_ = next(i for i, text in enumerate(lines, 1) if len(text) > MAX_LINE)
        raise AssemblyError(f"line {number_}: {len(lines[number_ - 1])} characters; asm() accepts at most {MAX_LINE} per line")
    if not source.isascii() or _CONTROL.search(source):
        for number_, text in enumerate(lines, 1):
            bad = next((c for c in text if ord(c) > 127 or _CONTROL.match(c)), None)
            if bad is not None:
                what = f"non-ASCII character {bad!r} (U+{ord(bad):04X})" if ord(bad) > 127 else f"control character {bad!r}"
                what = "a NUL character" if bad == "\0" else what
                raise AssemblyError(f"line {number_}: {text.strip()!r}: {what}; Keystone reads printable ASCII only")
    statements = []
    for line, raw in _raw_statements(source, dialect):
        if raw:
            st = _statement(line, raw, dialect, syntax, insn_size)
            if st is not None:
                if st.name not in STRING_DIRECTIVES:
                    st.text = radix_free(st.text)
                statements.append(st)
                if len(statements) > MAX_STATEMENTS:
                    raise st.fail(f"more than {MAX_STATEMENTS} statements")
    statements = _expand(statements)
    total = sum(st.bound for st in statements)
    if total > MAX_OUTPUT:
        raise AssemblyError(f"the output could reach {total} bytes; asm() produces at most {MAX_OUTPUT}")
    if dialect.fixups_abort:
        _mark_fixup_risks(statements, dialect)
    return statements


def _mark_fixup_risks(statements: list[Statement], dialect: AsmDialect) -> None:
    """Flag instructions that reference a label (or ``.``) anywhere but as the sole
    last operand of a PC-relative instruction: where Keystone exits on a bad fixup
    (``AsmDialect.fixups_abort``), ``asm`` assembles those in the helper process."""
    labels = {label for st in statements for label in st.labels} | {"."}
    alternatives = "|".join(map(re.escape, sorted(labels)))
    mention = re.compile(rf"(?<![\w.$@])(?:{alternatives})(?![\w.$@])")
    for st in statements:
        if st.kind is not Kind.INSTRUCTION or not st.operands:
            continue
        *others, last = st.operands
        target = bool(mention.search(last))
        st.fixup_risk = any(mention.search(op) for op in others) or (
            target and not (normalize(st.name) in dialect.pc_relative and last.lstrip("#") in labels)
        )
        st.label_reference = st.fixup_risk or target


__all__ = ["MAX_OPERATORS", "MAX_OUTPUT", "MAX_SOURCE", "MAX_STATEMENTS", "PROBE", "Kind", "Statement", "parse", "split_labels"]
