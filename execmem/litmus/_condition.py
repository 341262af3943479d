"""herd7's "state" language: the init block and the final condition.

The grammar follows herd7's lib/stateParser.mly and lib/stateLexer.mll (read for the
format only).  The subset is what AArch64 tests use; the rest of herd's state syntax
(Morello, memory tags, pointer authentication, shadow stacks, PTX registers, backquoted
values, ``observed``, ``with``) is reported as unsupported, with the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from execmem._errors import LitmusError
from execmem.litmus._ast import (
    And,
    Array,
    CodeLabel,
    Condition,
    FaultAtom,
    FrozenMap,
    Implies,
    Init,
    Instr,
    Int,
    Loc,
    Location,
    LocationsItem,
    LocAtom,
    Mem,
    Not,
    Or,
    Prop,
    Pte,
    Quantifier,
    Reg,
    Value,
    ValueAtom,
)

MAX_NESTING = 64
MAX_TOKENS = 200_000
MAX_ARRAY = 4096
MAX_INSTR_TEXT = 200

# herd's fault types (lib/faultType.ml, AArch64)
FAULT_TYPES = frozenset(
    [f"{side}MMU:{k}" for side in ("", "D-", "I-")
     for k in ("Translation", "AccessFlag", "Permission", "Exclusive")]
    + [f"GCS:{k}" for k in ("PRET", "POPM", "PRETAA", "PRETAB", "SS1", "SS2", "POPCX", "POPX")]
    + [f"PacCheck:{k}" for k in ("DA", "DB", "IA", "IB")]
    + ["TagCheck", "UndefinedInstruction", "SupervisorCall"]
)

_KEYWORDS = {
    "exists": "EXISTS", "forall": "FORALL", "final": "FINAL", "with": "WITH",
    "locations": "LOCATIONS", "filter": "FILTER", "fault": "FAULT", "Fault": "FAULT",
    "true": "TRUE", "false": "FALSE", "not": "NOT", "and": "TOKAND",
    "observed": "OBSERVED", "Observed": "OBSERVED", "NOP": "NOP", "nop": "NOP",
    "PTE": "PTE", "TTD": "PTE", "PA": "PA", "oa": "OA", "attrs": "ATTRS", "Attrs": "ATTRS",
    "_Atomic": "ATOMIC", "ATOMIC_INIT": "ATOMICINIT",
}
_UNSUPPORTED_WORDS = {
    "pac", "pacda", "pacdb", "pacia", "pacib", "tag", "TAG", "SS", "SSCap",
    "parel1_t", "PAREL1_T",
}

_NAME = re.compile(r"[A-Za-z_.$][A-Za-z0-9_/.\-]*")
_NUM = re.compile(r"0[xX][0-9a-fA-F]+|-?[0-9]+")
_PROC = re.compile(r"P([0-9]+)")
_INSTR = re.compile(r'instr:"([^"\n]{1,' + str(MAX_INSTR_TEXT) + r'})"')
_LABEL = re.compile(r'label:"P?([0-9]+):([^"\n]{1,' + str(MAX_INSTR_TEXT) + r'})"')
_PUNCT = ["==", "!=", "<>", "=>", "/\\", "\\/", "<<", ",", "&", ";", ":", "+", "[", "]",
          "(", ")", "{", "}", "=", "~", "*"]
_PUNCT_KIND = {"==": "=", "<>": "!="}


@dataclass(frozen=True)
class Tok:
    kind: str  # NUM NAME PROC INSTR LABEL EOF, a keyword kind, or the punctuation itself
    text: str
    line: int


class _Src:
    """Where tokens come from, for error messages."""

    def __init__(self, fname: str) -> None:
        self.fname = fname

    def fail(self, line: int, what: str) -> NoReturn:
        raise LitmusError(f"{self.fname}:{line}: {what}")


_COMMENT_MARK = re.compile(r"\(\*|\*\)")


def skip_comment(text: str, pos: int, line: int, src: _Src) -> tuple[int, int]:
    """``text[pos:]`` starts with ``(*``: return the position after the matching ``*)``
    (comments nest) and the line there."""
    start, start_line = pos, line
    depth = 0
    for m in _COMMENT_MARK.finditer(text, pos):
        if m.group(0) == "(*":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                end = m.end()
                return end, line + text.count("\n", start, end)
    src.fail(start_line, "unterminated comment '(*'")


def tokenize(text: str, line: int, src: _Src) -> list[Tok]:
    """Tokens of a piece of state text that starts at source line ``line``."""
    out: list[Tok] = []
    pos = 0
    n = len(text)
    while pos < n:
        c = text[pos]
        if c == "\n":
            line += 1
            pos += 1
            continue
        if c in " \t":
            pos += 1
            continue
        if text.startswith("(*", pos):
            pos, line = skip_comment(text, pos, line, src)
            continue
        if len(out) >= MAX_TOKENS:
            src.fail(line, "too many tokens")
        if c == "i" and text.startswith('instr:"', pos):
            m = _INSTR.match(text, pos)
            if not m:
                src.fail(line, "bad instr:\"...\" value (unterminated or too long)")
            out.append(Tok("INSTR", m.group(1), line))
            pos = m.end()
            continue
        if c == "l" and text.startswith('label:"', pos):
            m = _LABEL.match(text, pos)
            if not m:
                src.fail(line, "bad label:\"P<n>:<label>\" value")
            out.append(Tok("LABEL", f"{m.group(1)}:{m.group(2)}", line))
            pos = m.end()
            continue
        m = _NUM.match(text, pos)
        if m:
            # a number glued to name characters (``1abc``) is not a number
            nm = _NAME.match(text, m.end())
            if nm and m.group(0)[-1].isdigit() and not m.group(0).lower().startswith("0x"):
                src.fail(line, f"bad token '{text[pos:nm.end()]}'")
            out.append(Tok("NUM", m.group(0), line))
            pos = m.end()
            continue
        m = _NAME.match(text, pos)
        if m:
            word = m.group(0)
            pm = _PROC.fullmatch(word)
            if pm:
                out.append(Tok("PROC", pm.group(1), line))
            elif word in _KEYWORDS:
                out.append(Tok(_KEYWORDS[word], word, line))
            elif word in _UNSUPPORTED_WORDS:
                src.fail(line, f"'{word}' (herd extension) is not supported")
            else:
                out.append(Tok("NAME", word, line))
            pos = m.end()
            continue
        for p in _PUNCT:
            if text.startswith(p, pos):
                if p == "<<":
                    src.fail(line, "'<<' (scopes/GPU configuration) is not supported")
                kind = _PUNCT_KIND.get(p, p)
                out.append(Tok(kind, p, line))
                pos += len(p)
                break
        else:
            if c == "`":
                src.fail(line, "backquoted values are not supported")
            if c == "%":
                src.fail(line, "symbolic registers (%name) are not supported")
            shown = c if c.isprintable() else repr(c)
            src.fail(line, f"unexpected character '{shown}'")
    out.append(Tok("EOF", "", out[-1].line if out else line))
    return out


# ------------------------------------------------------------------------ registers

_GPR = re.compile(r"([XxWw])([0-9]{1,2})")
_SYSREG = re.compile(r"[A-Za-z][A-Za-z0-9_]*_EL[0-3]|NZCV|FPCR|FPSR|DAIF|SPSel|CurrentEL")


def canonical_register(name: str) -> str | None:
    """``X9``/``W9``/``x9`` -> ``X9``, ``LR`` -> ``X30``, ``SP``, system registers
    upper-case; None if ``name`` is not an AArch64 register herd accepts here."""
    m = _GPR.fullmatch(name)
    if m:
        n = int(m.group(2))
        if n <= 30 and str(n) == m.group(2):
            return f"X{n}"
        return None
    up = name.upper()
    if up == "LR":
        return "X30"
    if up in ("SP", "XZR", "WZR"):
        return "XZR" if up == "WZR" else up
    if _SYSREG.fullmatch(name):
        return up
    return None


def normalize_instr(text: str) -> str:
    s = " ".join(text.split())
    return "NOP" if s.upper() == "NOP" else s


# -------------------------------------------------------------------------- parser


@dataclass(frozen=True)
class Threads:
    """What the code defines, to check references: ``nprocs`` main threads and the
    labels of each process (main thread and fault handler together)."""

    nprocs: int
    labels: dict[int, frozenset[str]]


class _Parser:
    def __init__(self, toks: list[Tok], src: _Src, threads: Threads | None = None) -> None:
        self.toks = toks
        self.i = 0
        self.src = src
        self.depth = 0
        self.threads = threads

    # -- helpers
    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Tok:
        j = min(self.i + k, len(self.toks) - 1)
        return self.toks[j]

    def next(self) -> Tok:
        t = self.toks[self.i]
        if t.kind != "EOF":
            self.i += 1
        return t

    def at(self, *kinds: str) -> bool:
        return self.tok.kind in kinds

    def accept(self, kind: str) -> Tok | None:
        if self.tok.kind == kind:
            return self.next()
        return None

    def fail(self, what: str, tok: Tok | None = None) -> NoReturn:
        t = tok or self.tok
        shown = "end of input" if t.kind == "EOF" else f"'{t.text}'"
        self.src.fail(t.line, f"{what} (found {shown})")

    def error(self, tok: Tok, what: str) -> NoReturn:
        self.src.fail(tok.line, what)

    def check_proc(self, proc: int, tok: Tok) -> None:
        if self.threads is not None and proc >= self.threads.nprocs:
            self.error(tok, f"no thread P{proc}")

    def check_label(self, proc: int, label: str, tok: Tok) -> None:
        self.check_proc(proc, tok)
        if self.threads is not None and label not in self.threads.labels.get(proc, ()):
            self.error(tok, f"label P{proc}:{label} is not defined")

    def code_label(self, proc: int, label: str, tok: Tok) -> CodeLabel:
        self.check_label(proc, label, tok)
        return CodeLabel(proc, label)

    def expect(self, kind: str, what: str | None = None) -> Tok:
        if self.tok.kind != kind:
            self.fail(f"expected {what or repr(kind)}")
        return self.next()

    # -- locations
    def proc_number(self, tok: Tok) -> int:
        s = tok.text
        if not s.isdigit() or len(s) > 4:
            self.fail("bad process number", tok)
        return int(s)

    def register(self, proc_tok: Tok) -> Reg:
        proc = self.proc_number(proc_tok)
        self.expect(":")
        t = self.tok
        if t.kind != "NAME":
            self.fail("expected a register name")
        self.next()
        name = t.text
        reg = canonical_register(name)
        if reg is None:
            self.error(t, f"'{name}' is not an AArch64 register")
        self.check_proc(proc, proc_tok)
        return Reg(proc, reg)

    def starts_register(self) -> bool:
        return self.at("NUM", "PROC") and self.peek().kind == ":"

    def global_name(self) -> str:
        """``x``, ``PTE(x)``, ``PTE(P1:L0)``, ``PTE(PTE(x))``, ``PA(x)``."""
        t = self.tok
        if t.kind == "NAME":
            self.next()
            if self.at(":") and self.peek().kind in ("NAME", "NUM"):
                self.fail("memory tags / Morello locations are not supported")
            if self.at("[") and self.peek().kind == "NUM":
                self.fail("array cells (x[i]) are not supported")
            return t.text
        if t.kind in ("PTE", "PA"):
            self.next()
            self.expect("(")
            if t.kind == "PTE" and self.at("PTE"):
                inner = self.global_name()
            elif t.kind == "PTE" and self.at("PROC") and self.peek().kind == ":":
                p = self.next()
                self.next()
                lab = self.expect("NAME", "a label")
                inner = f"P{p.text}:{lab.text}"
            else:
                inner = self.expect("NAME", "a location name").text
            self.expect(")")
            return f"{'PTE' if t.kind == 'PTE' else 'PA'}({inner})"
        self.fail("expected a location")

    def location(self) -> Location:
        """``0:X1``, ``x``, ``[x]``, ``PTE(x)``, ``[PTE(x)]``."""
        if self.starts_register():
            return self.register(self.next())
        if self.accept("["):
            name = self.global_name()
            self.expect("]")
            return Mem(name)
        return Mem(self.global_name())

    def starts_location(self) -> bool:
        return self.starts_register() or self.at("NAME", "[", "PTE", "PA")

    # -- values
    def pte_value(self) -> Pte:
        self.expect("(")
        oa: str | None = None
        fields: list[tuple[str, str]] = []
        attrs: list[str] = []
        while True:
            t = self.tok
            if t.kind == "OA":
                self.next()
                self.expect(":")
                if oa is not None:
                    self.fail("duplicate 'oa' field", t)
                if self.at("PA", "PTE"):
                    oa = self.global_name()
                else:
                    oa = self.expect("NAME", "an output address").text
            elif t.kind == "ATTRS":
                self.next()
                self.expect(":")
                self.expect("(")
                attrs.append(self.expect("NAME", "an attribute").text)
                while self.accept(","):
                    attrs.append(self.expect("NAME", "an attribute").text)
                self.expect(")")
            elif t.kind == "NAME":
                self.next()
                if self.accept(":"):
                    v = self.tok
                    if v.kind not in ("NAME", "NUM"):
                        self.fail("expected a field value")
                    self.next()
                    if any(k == t.text for k, _ in fields):
                        self.fail(f"duplicate field '{t.text}'", t)
                    fields.append((t.text, v.text))
                else:
                    attrs.append(t.text)
            else:
                self.fail("expected a page-table entry field")
            if not self.accept(","):
                break
        self.expect(")")
        return Pte(oa, tuple(fields), tuple(attrs))

    def number(self, t: Tok) -> Int:
        s = t.text
        if len(s) > 40:
            self.fail("number too long", t)
        v = int(s, 16) if s.lower().startswith("0x") else int(s)
        if not -(2**63) <= v < 2**64:
            self.fail("number does not fit in 64 bits", t)
        return Int(v)

    def label_tok(self, t: Tok) -> CodeLabel:
        p, _, lab = t.text.partition(":")
        lab = lab.strip()
        if not _NAME.fullmatch(lab):
            self.error(t, f"bad label name '{lab}'")
        return self.code_label(int(p), lab, t)

    def value(self, in_init: bool) -> Value:
        t = self.tok
        if t.kind == "NUM":
            self.next()
            if self.at(":"):
                if in_init and self.peek().kind == "NAME":
                    self.next()
                    return self.code_label(self.proc_number(t), self.next().text, t)
                self.fail("expected a value")
            return self.number(t)
        if t.kind == "NOP":
            self.next()
            return Instr("NOP")
        if t.kind == "INSTR":
            self.next()
            text = normalize_instr(t.text)
            if not text:
                self.fail("empty instr:\"\"", t)
            return Instr(text)
        if t.kind == "LABEL":
            self.next()
            return self.label_tok(t)
        if t.kind == "PROC" and self.peek().kind == ":":
            if not in_init:
                self.fail(f'write a code label as label:"P{t.text}:..." in a condition')
            self.next()
            self.next()
            lab = self.expect("NAME", "a label name")
            return self.code_label(self.proc_number(t), lab.text, t)
        if t.kind == "&":
            self.next()
            return Loc(self.expect("NAME", "a location name after '&'").text)
        if t.kind in ("NAME", "PTE", "PA"):
            return Loc(self.global_name())
        if t.kind == "(":
            return self.pte_value()
        if t.kind == ":":
            self.fail("memory tags are not supported")
        self.fail("expected a value")

    def array_value(self) -> Array:
        self.expect("{")
        items: list[Value] = []
        while True:
            if len(items) >= MAX_ARRAY:
                self.fail("array too long")
            v = self.value(in_init=False)
            if isinstance(v, (Pte, Array)):
                self.fail("bad array element")
            items.append(v)
            if not self.accept(","):
                break
        self.expect("}")
        return Array(tuple(items))

    # -- init block
    def init(self) -> Init:
        registers: dict[Reg, Value] = {}
        memory: dict[str, Value] = {}
        types: dict[Reg | str, str] = {}
        ptes: dict[str, Pte] = {}

        def key_of(loc: Location) -> Reg | str:
            return loc if isinstance(loc, Reg) else loc.name

        def set_value(loc: Location, v: Value, t: Tok) -> None:
            k = key_of(loc)
            if k in registers or k in memory or k in ptes:
                self.error(t, f"'{k}' is initialised twice")
            if isinstance(loc, Reg):
                registers[loc] = v
            elif isinstance(v, Pte):
                ptes[loc.name] = v
            else:
                memory[loc.name] = v

        def set_type(k: Reg | str, ty: str, t: Tok) -> None:
            if k in types:
                self.error(t, f"type of '{k}' is declared twice")
            types[k] = ty

        while not self.at("EOF"):
            if self.accept(";"):
                continue
            start = self.tok
            ty: str | None = None
            if self.at("ATOMIC"):
                self.next()
                ty = "_Atomic " + self.expect("NAME", "a type").text
            elif self.at("NAME") and self.peek().kind == "[" and self.peek(2).kind == "NUM":
                self.fail("array cells cannot be initialised one by one (write t[n]={...})")
            elif self.at("NAME") and self.peek().kind not in ("=", ";", "EOF", ":"):
                ty = self.next().text
            if ty is not None and self.at("NAME") and self.peek().kind == "[" \
                    and self.peek(2).kind == "NUM":
                name = self.next().text
                self.next()
                size_tok = self.next()
                size = self.number(size_tok).value
                if not 0 < size <= MAX_ARRAY:
                    self.error(size_tok, "bad array size")
                self.expect("]")
                set_type(name, f"{ty}[{size}]", start)
                if self.accept("="):
                    arr = self.array_value()
                    if len(arr.items) != size:
                        self.error(start, f"array '{name}' has {size} cells but "
                                   f"{len(arr.items)} initial values")
                    set_value(Mem(name), arr, start)
            else:
                if self.accept("*"):
                    ty = "*" if ty is None else f"{ty} *"
                if not self.starts_location():
                    self.fail("expected a location (0:X1, x, [x])")
                loc = self.location()
                if ty is not None:
                    set_type(key_of(loc), ty, start)
                if self.accept("="):
                    if self.at("ATOMICINIT"):
                        self.next()
                        self.expect("(")
                        v = self.value(in_init=True)
                        self.expect(")")
                    else:
                        v = self.value(in_init=True)
                    set_value(loc, v, start)
                elif ty is None:
                    set_value(loc, Int(0), start)
            if not self.at("EOF"):
                self.expect(";", "';' between init items")
        return Init(FrozenMap(registers), FrozenMap(memory), FrozenMap(types), FrozenMap(ptes))

    # -- propositions
    def prop(self) -> Prop:
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.fail("condition nested too deeply")
        items = [self.prop_and()]
        while self.accept("\\/"):
            items.append(self.prop_and())
        self.depth -= 1
        return items[0] if len(items) == 1 else Or(_flatten(Or, items))

    def prop_and(self) -> Prop:
        items = [self.prop_implies()]
        while self.accept("/\\"):
            items.append(self.prop_implies())
        return items[0] if len(items) == 1 else And(_flatten(And, items))

    def prop_implies(self) -> Prop:
        left = self.prop_not()
        if self.accept("=>"):
            self.depth += 1
            if self.depth > MAX_NESTING:
                self.fail("condition nested too deeply")
            right = self.prop_implies()
            self.depth -= 1
            return Implies(left, right)
        return left

    def prop_not(self) -> Prop:
        if self.at("~", "NOT"):
            self.next()
            self.depth += 1
            if self.depth > MAX_NESTING:
                self.fail("condition nested too deeply")
            p = self.prop_not()
            self.depth -= 1
            return Not(p)
        return self.primary()

    def primary(self) -> Prop:
        if self.accept("TRUE"):
            return And(())
        if self.accept("FALSE"):
            return Or(())
        if self.accept("("):
            p = self.prop()
            self.expect(")", "')'")
            return p
        if self.at("FAULT"):
            return self.fault()
        if self.starts_location():
            return self.atom()
        self.fail("expected a condition atom")

    def fault(self) -> FaultAtom:
        self.expect("FAULT")
        self.expect("(")
        p = self.expect("PROC", "a thread (P0)")
        proc = self.proc_number(p)
        self.check_proc(proc, p)
        label: str | None = None
        if self.accept(":"):
            label = self.expect("NAME", "a label").text
            self.check_label(proc, label, p)
        loc: str | None = None
        ftype: str | None = None
        if self.accept(","):
            first = self.tok
            if self.at("PTE"):
                loc = self.global_name()
            else:
                name = self.expect("NAME", "a location or a fault type").text
                if self.at(":"):
                    # composite fault type MMU:Translation
                    parts = [name]
                    while self.accept(":"):
                        parts.append(self.expect("NAME", "a fault type").text)
                    ftype = ":".join(parts)
                elif name in FAULT_TYPES:
                    ftype = name
                else:
                    loc = name
            if loc is not None and self.accept(","):
                parts = [self.expect("NAME", "a fault type").text]
                while self.accept(":"):
                    parts.append(self.expect("NAME", "a fault type").text)
                ftype = ":".join(parts)
            if ftype is not None and ftype not in FAULT_TYPES:
                self.error(first, f"'{ftype}' is not a fault type")
        self.expect(")", "')'")
        return FaultAtom(proc, label, loc, ftype)

    def atom(self) -> Prop:
        loc = self.location()
        op = self.tok
        if op.kind not in ("=", "!="):
            self.fail("expected '=' or '!=' after a location")
        self.next()
        neg = op.kind == "!="
        a: Prop
        if (self.at("PROC") and self.peek().kind == ":" and self.peek(2).kind == "NAME"
                and canonical_register(self.peek(2).text) is None):
            t = self.tok
            self.error(t, f'write a code label as label:"P{t.text}:{self.peek(2).text}" '
                          "in a condition")
        if self.starts_register() or self.at("["):
            a = LocAtom(loc, self.location())
        elif self.at("*"):
            self.next()
            if self.starts_register():
                a = LocAtom(loc, self.location())
            else:
                a = LocAtom(loc, Mem(self.expect("NAME", "a location").text))
        elif self.at("{"):
            a = ValueAtom(loc, self.array_value())
        else:
            a = ValueAtom(loc, self.value(in_init=False))
        return Not(a) if neg else a

    # -- the constraint section
    def locations_clause(self) -> tuple[LocationsItem, ...]:
        items: list[LocationsItem] = []
        self.expect("LOCATIONS")
        self.expect("[", "'['")
        while not self.at("]"):
            if self.at("FAULT"):
                items.append(self.fault())
            elif self.starts_location():
                loc = self.location()
                if self.at("NAME", "*"):
                    self.fail("typed items in 'locations' are not supported")
                items.append(loc)
            else:
                self.fail("expected a location in 'locations [...]'")
            if not self.accept(";"):
                break
        self.expect("]", "']'")
        return tuple(items)

    def constraints(self) -> tuple[tuple[LocationsItem, ...], Prop | None, Condition]:
        locs: tuple[LocationsItem, ...] = ()
        filt: Prop | None = None
        if self.at("LOCATIONS"):
            locs = self.locations_clause()
        if self.accept("FILTER"):
            filt = self.prop()
        t = self.tok
        quant: Quantifier
        if self.at("EOF"):
            return locs, filt, Condition("forall", And(()), t.line)
        if self.accept("FORALL"):
            quant = "forall"
        elif self.accept("EXISTS") or self.accept("FINAL"):
            quant = "exists"
        elif self.at("~", "NOT") and self.peek().kind == "EXISTS":
            self.next()
            self.next()
            quant = "~exists"
        elif self.at("("):
            quant = "exists"
        elif self.at("OBSERVED"):
            self.fail("'observed' conditions are not supported")
        else:
            self.fail("expected exists, ~exists or forall")
        p = self.prop()
        self.accept(";")
        if self.at("WITH"):
            self.fail("'with' clauses are not supported")
        if not self.at("EOF"):
            self.fail("unexpected text after the condition")
        return locs, filt, Condition(quant, p, t.line)


def _flatten(kind: type[And] | type[Or], items: list[Prop]) -> tuple[Prop, ...]:
    out: list[Prop] = []
    for p in items:
        if isinstance(p, kind) and len(p.items) >= 2:
            out.extend(p.items)
        else:
            out.append(p)
    return tuple(out)


def parse_init(text: str, line: int, fname: str, threads: Threads | None = None) -> Init:
    src = _Src(fname)
    return _Parser(tokenize(text, line, src), src, threads).init()


def parse_constraints(
    text: str, line: int, fname: str, threads: Threads | None = None
) -> tuple[tuple[LocationsItem, ...], Prop | None, Condition]:
    src = _Src(fname)
    return _Parser(tokenize(text, line, src), src, threads).constraints()


def parse_condition(text: str, fname: str = "<condition>") -> Condition:
    """Parse a stand-alone condition such as ``exists (0:X0=1 /\\ x=2)``."""
    locs, filt, cond = parse_constraints(text, 1, fname)
    if locs or filt is not None:
        raise LitmusError(f"{fname}:1: only a condition is expected here")
    return cond

