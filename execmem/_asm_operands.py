"""Operands of an assembly source: tokens, literals and the checks that keep Keystone
0.9.2 from looping or crashing on them (the measurements behind each rule are in
``_asm_source``'s module docstring, under Operands and Numbers)."""

from __future__ import annotations

import re

#: Operator and bracket characters in one operand (Keystone recurses on each).
MAX_OPERATORS = 64

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


def check_operand(operand: str, *, data: bool) -> str | None:
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


_BRACES = re.compile(r"\{[\w. ,-]*\}")


def instruction_problem(operand_text: str, operands: tuple[str, ...]) -> str | None:
    """Why an instruction's operands (``operand_text``, split as ``operands``) are
    refused, or ``None``."""
    if len(operand_text) <= MAX_OPERATORS and _PLAIN.fullmatch(operand_text):  # the common case
        for text in _NUMBER_TOKEN.findall(operand_text):
            if (problem := _number_problem(text, data=False)) is not None:
                return problem
        return None
    if ("{" in operand_text or "}" in operand_text) and any(c in "{}" for c in _BRACES.sub("", operand_text)):
        return "braces hold only names, commas and dashes ({k1}, {v0.16b, v1.16b}): Keystone loops on others"
    for op in operands:
        if (reason := check_operand(op, data=False)) is not None:
            return reason
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


def relocatable(operand: str) -> bool:
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


__all__ = [
    "MAX_OPERATORS",
    "check_operand",
    "instruction_problem",
    "number",
    "radix_free",
    "relocatable",
    "split_operands",
    "string_bytes",
    "subtracted_names",
    "tokens",
]
