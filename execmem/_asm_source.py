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
* **Limits**: see ``MAX_*`` below.  The output bound is computed here before
  assembling, from each statement's largest possible size.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterator

from execmem._asm_engine import normalize
from execmem._errors import AssemblyError
from execmem.arch import ArchSpec, AsmDialect, AsmSyntax, get

#: Characters in a source, in a line, statements after ``.rept`` expansion and
#: ``symbols=`` names, bytes of output (64 MiB: 32 default packs).
MAX_SOURCE = 4_000_000
MAX_LINE = 65_536
MAX_STATEMENTS = 100_000
MAX_OUTPUT = 64 << 20
#: Operator and bracket characters in one operand (Keystone recurses on each).
MAX_OPERATORS = 64
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


# -- operands ---------------------------------------------------------------------------------

_OPERAND_TOKEN = re.compile(
    r"""(?P<id>[A-Za-z_.$@][\w.$@]*)|(?P<num>[0-9][\w.]*)|(?P<str>"(?:[^"\\]|\\.)*")
    |(?P<char>'(?:[^'\\]|\\.)')|(?P<op><<|>>|==|!=|<=|>=|&&|\|\||<>|[-+*/%&|^~!<>=()\[\]{}#,:?`\\])
    |(?P<blank>\ )""",
    re.X,
)
_NUMBER = re.compile(r"0[xX]([0-9a-fA-F]+)|0[bB]([01]+)|0([0-7]+)|([1-9][0-9]*|0)")
_FLOAT = re.compile(r"[0-9]{1,16}\.[0-9]{1,16}")
_RELOCATION = re.compile(r":[A-Za-z_][\w]*:")
_MODULO = re.compile(r"%(?![A-Za-z])")  # "%rax" is an AT&T register
_OPERATOR_CHARS = frozenset("()[]{}+-*/%&|^~!<>")
_UNARY = frozenset("+-~!")
_BINARY = frozenset({"+", "-", "*", "/", "%", "&", "|", "^", "<<", ">>", "==", "!=", "<", "<=", ">", ">=", "&&", "||", "<>"})
#: Operand text that needs no token-level check but its numbers (the common case).
_PLAIN = re.compile(r"[\w ,\[\].#!+*-]*")
_NUMBER_TOKEN = re.compile(r"(?<![\w.$@])[0-9][\w.]*")
_NESTED = re.compile(r"[(\[{\"']")


def number(token: str) -> int | None:
    """The value of an accepted integer literal, else ``None``."""
    m = _NUMBER.fullmatch(token)
    if m is None:
        return None
    hexa, binary, octal, decimal = m.groups()
    if hexa is not None:
        return int(hexa, 16)
    if binary is not None:
        return int(binary, 2)
    return int(octal, 8) if octal is not None else int(decimal)


def tokens(operand: str) -> list[tuple[str, str]]:
    """``(kind, text)`` for each token of an operand (blanks dropped); raises
    ``ValueError`` at a character no token starts with."""
    out: list[tuple[str, str]] = []
    pos, end = 0, len(operand)
    while pos < end:
        m = _OPERAND_TOKEN.match(operand, pos)
        if m is None:
            raise ValueError(operand[pos])
        if m.lastgroup != "blank":
            out.append((m.lastgroup or "", m.group()))
        pos = m.end()
    return out


def split_operands(text: str) -> tuple[str, ...]:
    """``text`` split at the commas that are not inside brackets, strings or literals."""
    if not text:
        return ()
    if _NESTED.search(text) is None:
        return tuple([part.strip(" ") for part in text.split(",")]) if "," in text else (text,)
    out: list[str] = []
    depth, start, i, n = 0, 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            m = _OPERAND_TOKEN.match(text, i)
            i = m.end() if m is not None and m.lastgroup in ("str", "char") else i + 1
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth <= 0:
            out.append(text[start:i].strip(" "))
            start = i + 1
        i += 1
    out.append(text[start:].strip(" "))
    return tuple(out)


def _number_problem(text: str, *, data: bool) -> str | None:
    value = number(text)
    if value is None and (data or not _FLOAT.fullmatch(text)):
        return f"{text!r}: numbers are decimal, 0x hex, 0b binary or 0 octal"
    if value is not None and value >= 1 << 64:
        return f"{text!r}: numbers must be below 2**64"
    return None


def _check_operand(operand: str, *, data: bool) -> str | None:
    """Why ``operand`` is refused, or ``None``.  ``data``: an expression of a data
    directive, which must be well formed (Keystone loops on ``.byte 1, %``)."""
    if "/" in operand or _MODULO.search(operand):
        return "division is not accepted (Keystone's constant folding of -2**63 / -1 crashes the process): compute it in Python"
    if sum(c in _OPERATOR_CHARS for c in operand) > MAX_OPERATORS:
        return f"more than {MAX_OPERATORS} operator and bracket characters in one operand"
    if _RELOCATION.search(operand):
        return "relocation specifiers (:lo12: ...) are not accepted"
    try:
        found = tokens(operand)
    except ValueError as exc:
        return f"unexpected character {str(exc)!r}"
    for kind, text in found:
        if kind == "num" and (problem := _number_problem(text, data=data)) is not None:
            return problem
        if kind == "str":
            return "strings are accepted only by .ascii and .asciz"
        if text == "=":
            return "'=' is not accepted (no literal pools or assignments: use symbols= or a label and .quad)"
    if data and not _well_formed(found):
        return "malformed expression"
    return None


_MINUS_NAME = re.compile(r"-[ (~+-]*[A-Za-z_.$@]")


def subtracted_names(operand: str) -> list[str]:
    """The names an expression subtracts or negates (``l2 - l1``, ``-(x + 4)``).

    Keystone 0.9.2 treats an undefined one as 0 and reports it only on stderr (``.quad
    5 - y`` gave 5), so every such name must be defined before assembling.
    """
    if _MINUS_NAME.search(operand) is None:
        return []
    names: list[str] = []
    groups: list[bool] = []  # per open parenthesis: whether the group is subtracted
    pending = False
    for kind, text in tokens(operand):
        if text == "-":
            pending = True
        elif text == "(":
            groups.append(pending or any(groups))
            pending = False
        elif text == ")":
            if groups:
                groups.pop()
        elif kind == "id":
            if pending or any(groups):
                names.append(text)
            pending = False
        elif text not in _UNARY:
            pending = False
    return names


def _relocatable(operand: str) -> bool:
    """Whether the names in ``operand`` do not cancel out (``l`` or ``l + 4``, unlike ``l - m``)."""
    names = sum(kind == "id" for kind, _ in tokens(operand))
    return names != 2 * len(subtracted_names(operand))


#: A number not inside a name (a name may hold digits and "$"); "$10" is an AT&T immediate.
_LITERAL = re.compile(r"(?:(?<![\w.$@'])|(?<=[^\w.$@']\$))[0-9][\w.]*")


def radix_free(text: str) -> str:
    """``text`` with every number written in hex (``0x10``, floats as ``0x1.8p+0``).

    Keystone 0.9.2 reads a number without a prefix in a radix it takes from an
    uninitialized field of a freshly allocated object, and ``ks_option`` (any option)
    sets it to 16: then ``mov eax, 10`` assembled as ``mov eax, 0x10``, and
    ``.balign 16`` as a non-power-of-two that Keystone ignores (measured, also in
    handles opened after one that had an option set).  Prefixed numbers do not depend
    on it.  ``text`` holds no strings (``.ascii`` statements are not rewritten).
    """

    def hexadecimal(m: re.Match[str]) -> str:
        value = number(m.group())
        return f"{value:#x}" if value is not None else float(m.group()).hex()

    return _LITERAL.sub(hexadecimal, " " + text)[1:]


def _well_formed(found: list[tuple[str, str]]) -> bool:
    """``unary* primary (binary unary* primary)*`` with balanced parentheses."""
    want_value, depth = True, 0
    for kind, text in found:
        if want_value:
            if kind in ("id", "num", "char"):
                want_value = False
            elif text == "(":
                depth += 1
            elif text not in _UNARY:
                return False
        elif text == ")" and depth > 0:
            depth -= 1
        elif text in _BINARY:
            want_value = True
        else:
            return False
    return not want_value and depth == 0


def string_bytes(literal: str) -> bytes | None:
    """The bytes Keystone emits for the string ``literal`` (quotes included), or
    ``None`` for an escape it refuses (``AsmParser::parseEscapedString``: octal and
    ``\\b \\f \\n \\r \\t \\" \\\\``; no hex escapes)."""
    body, out, i = literal[1:-1], bytearray(), 0
    simple = {"b": 8, "f": 12, "n": 10, "r": 13, "t": 9, '"': 34, "\\": 92}
    while i < len(body):
        c = body[i]
        i += 1
        if c != "\\":
            out.append(ord(c))
            continue
        if i == len(body):
            return None
        octal = re.match(r"[0-7]{1,3}", body[i:])
        if octal is not None:
            value = int(octal.group(), 8)
            if value > 255:
                return None
            out.append(value)
            i += octal.end()
        elif body[i] in simple:
            out.append(simple[body[i]])
            i += 1
        else:
            return None
    return bytes(out)


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
            if (reason := _check_operand(op, data=True)) is not None:
                raise st.fail(reason)
        st.subtracted = tuple(name for op in ops for name in subtracted_names(op))
        if unit == 1 and any(_relocatable(op) for op in ops):
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
_BRACES = re.compile(r"\{[\w. ,-]*\}")
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
    if len(operand_text) <= MAX_OPERATORS and _PLAIN.fullmatch(operand_text):  # the common case
        for text in _NUMBER_TOKEN.findall(operand_text):
            if (problem := _number_problem(text, data=False)) is not None:
                raise st.fail(problem)
        st.subtracted = tuple(name for op in st.operands for name in subtracted_names(op))
        return st
    if ("{" in operand_text or "}" in operand_text) and any(c in "{}" for c in _BRACES.sub("", operand_text)):
        raise st.fail("braces hold only names, commas and dashes ({k1}, {v0.16b, v1.16b}): Keystone loops on others")
    for op in st.operands:
        if (reason := _check_operand(op, data=False)) is not None:
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


__all__ = ["MAX_OUTPUT", "MAX_SOURCE", "MAX_STATEMENTS", "PROBE", "Kind", "Statement", "number", "parse", "radix_free", "split_labels", "split_operands", "string_bytes", "subtracted_names", "tokens"]
