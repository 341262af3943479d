"""The herd7 AArch64 litmus parser, printer and instruction translation (execmem.litmus)."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import paths
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from programs import SLOWDOWN

from execmem import LitmusError
from execmem.litmus import (
    And,
    Array,
    CodeLabel,
    CodeLine,
    Condition,
    FaultAtom,
    FrozenMap,
    Implies,
    Instr,
    Int,
    LitmusTest,
    Loc,
    LocAtom,
    Mem,
    Not,
    Or,
    Pte,
    Reg,
    ValueAtom,
    assemble_line,
    assemble_thread,
    canonical_register,
    encode_instruction_value,
    format_test,
    parse_condition,
    parse_file,
    parse_litmus,
    process_labels,
    rewrite_labels,
    to_keystone,
)

DATA = paths.DATA / "litmus"
HERD = paths.DATA / "herd"  # vendored herdtools7 catalogues (see their NOTICE)
SUITE = HERD / "aarch64-ifetch"
FILES = sorted(SUITE.glob("*.litmus"))
# A suite of the other dialect (translation tables), to parse and print only.
VMSA_FILES = sorted((HERD / "aarch64-vmsa" / "tests").glob("*.litmus"))


def _ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


@pytest.fixture(scope="module")
def suite() -> dict[str, LitmusTest]:
    return {p.stem: parse_file(p) for p in FILES}


# ----------------------------------------------------------------- the catalogue


def test_catalogue_has_106_tests_and_kinds_name_them(suite: dict[str, LitmusTest]) -> None:
    assert len(FILES) == 106
    kinds = {}
    for line in (SUITE / "kinds.txt").read_text().splitlines():
        if line.strip():
            name, kind = line.split()
            kinds[name] = kind
    assert set(kinds) == {t.name for t in suite.values()}
    for stem, t in suite.items():
        assert t.name == stem


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_every_catalogue_file_parses_and_round_trips(path: Path) -> None:
    t = parse_file(path)
    assert t.path == str(path)
    assert t.threads and not t.threads[0].handler
    text = format_test(t)
    again = parse_litmus(text, str(path))
    assert again == t
    assert format_test(again) == text  # the printer is a fixpoint
    assert hash(again) == hash(t)


def test_vmsa_suite_is_vendored_whole() -> None:
    assert len(VMSA_FILES) == 409


@pytest.mark.parametrize("path", VMSA_FILES, ids=_ids(VMSA_FILES))
def test_vmsa_suite_parses_and_round_trips(path: Path) -> None:
    t = parse_file(path)
    assert parse_litmus(format_test(t), str(path)) == t


def test_an_undefined_label_in_the_condition_is_rejected_where_it_is_written() -> None:
    text = "AArch64 T\n{ }\n P0 ;\n L0: NOP ;\nexists (fault(P0:L2))\n"
    with pytest.raises(LitmusError, match=re.escape("t.litmus:5: label P0:L2 is not defined")):
        parse_litmus(text, "t.litmus")


def test_self_modifying_test_with_fault_handler(suite: dict[str, LitmusTest]) -> None:
    t = suite["S-self+dmb.st+fault"]
    assert [th.name for th in t.threads] == ["P0", "P1", "P1.F"]
    h = t.handler_of(1)
    assert h is not None and h.proc == 1 and h.handler
    assert h.instructions()[-1].instruction == "ERET"
    assert t.init.registers[Reg(0, "X3")] == CodeLabel(1, "m0")
    assert t.init.registers[(0, "X2")] == Int(0)  # type: ignore[index]  # tuples work
    assert t.init.types[Reg(1, "X9")] == "ins_t *"
    assert Reg(1, "X9") not in t.init.registers  # declaration only
    p1 = t.thread(1)
    assert p1 is not None
    assert p1.lines == (
        CodeLine(("m0",), None),
        CodeLine((), "B l1"),
        CodeLine(("l1",), None),
    )
    assert p1.label_offsets() == {"m0": 0, "l1": 4}
    assert p1.lines[1].line_no == 11
    assert t.condition.quantifier == "exists"
    assert t.condition.prop == And((ValueAtom(Reg(1, "X2"), Int(2)), ValueAtom(Mem("x"), Int(1))))
    assert t.locations() == ("x",)
    assert t.code_labels() == (CodeLabel(1, "m0"),)


def test_typed_registers_and_instruction_and_label_values(suite: dict[str, LitmusTest]) -> None:
    t = suite["MP+rel+blr"]
    assert t.info == {"Stable": "X30"}
    regs = t.init.registers
    assert regs[Reg(0, "X0")] == Instr("B .+4")
    assert regs[Reg(0, "X1")] == CodeLabel(1, "L0")
    assert regs[Reg(0, "X3")] == Loc("y")
    assert t.init.memory == {"y": CodeLabel(1, "L0")}
    assert t.init.types == {Reg(1, "X30"): "ins_t *"}
    assert t.condition.prop == And((
        ValueAtom(Reg(1, "X2"), CodeLabel(1, "tgt")),
        ValueAtom(Reg(1, "X6"), Instr("NOP")),
    ))
    assert t.condition.registers() == (Reg(1, "X2"), Reg(1, "X6"))
    assert set(t.code_labels()) == {CodeLabel(1, "L0"), CodeLabel(1, "tgt")}
    assert 'label:"P1:tgt"' in format_test(t)


def test_page_table_entries(suite: dict[str, LitmusTest]) -> None:
    t = suite["coFW-pa2"]
    assert t.init.ptes == {"pte_x": Pte("phy_x"), "pte_l0": Pte("phy_x")}
    assert "pte_x" not in t.init.memory
    assert t.thread(0) is not None


def test_fatal_variant_and_fault_condition(suite: dict[str, LitmusTest]) -> None:
    t = suite["SM.udf+dc.cvau+dsb.ish-ic.vau-dsb.ish-isb"]
    assert t.variants == frozenset({"fatal"})
    assert t.condition.prop == FaultAtom(0, "L0", None, "UndefinedInstruction")
    assert t.condition.faults() == (FaultAtom(0, "L0", None, "UndefinedInstruction"),)
    assert suite["miniJit01"].variants == frozenset({"self"})


def test_condition_may_name_registers_absent_from_the_code(suite: dict[str, LitmusTest]) -> None:
    t = suite["dcc3"]
    assert t.condition.registers() == (Reg(1, "X9"), Reg(2, "X9"), Reg(2, "X10"), Reg(1, "X12"))
    assert t.nprocs == 4
    p3 = t.thread(3)
    assert p3 is not None
    assert p3.lines[1] == CodeLine(("mod",), "B l00")
    assert p3.lines[-1] == CodeLine(("end",), None)


def test_catalogue_wide_facts(suite: dict[str, LitmusTest]) -> None:
    quants = {t.condition.quantifier for t in suite.values()}
    assert quants == {"exists"}
    handlers = sorted(t.name for t in suite.values() if any(th.handler for th in t.threads))
    assert handlers == ["S-self+dmb.st+fault", "SM+lob-fault", "SM-invalid-2"]
    for t in suite.values():
        assert t.cache_type == frozenset()
        for reg in t.registers():
            assert re.fullmatch(r"X([0-9]|[12][0-9]|30)", reg.name)


def test_cache_type_header() -> None:
    t = parse_litmus(BASE.replace("{", "CacheType=DIC\n{", 1) + "exists (0:X0=1)\n")
    assert t.cache_type == frozenset({"DIC"}) and t.dic and t.idc  # DIC implies IDC
    t = parse_litmus(BASE.replace("{", "CacheType=IDC\n{", 1) + "exists (0:X0=1)\n")
    assert t.cache_type == frozenset({"IDC"}) and t.idc and not t.dic


# ------------------------------------------------------------------- the format

BASE = """AArch64 T
{ 0:X0=1; }
 P0 ;
 NOP ;
"""


def _cond(text: str) -> Condition:
    return parse_litmus(BASE + text).condition


def test_header_key_values_doc_and_comments() -> None:
    t = parse_litmus(
        'AArch64 A.b+c-d_e (tex) "the doc" (* c *)\n'
        "(* a (* nested *) comment\n spanning lines *)\n"
        "Variant=self, fatal\n"
        "CacheType=dic idc\n"
        "Hash=abc\n"
        "Com=Irf Ifr\n"
        "{\n"
        " 0:X0=NOP; (* inside *) 0:X1=-5; 0:X2=0x10; [x] = 0; y=1; int z; 1:X9=0;\n"
        " uint64_t 0:X3=2; void *1:X1; ins_t *w; _Atomic int v=3; *0:X4=x;\n"
        "}\n"
        " P0          | P1 ;\n"
        " l1:l2:B l0  |    ;\n"
        " l0: NOP     | m0: ;\n"
        "exists (0:X0=0) (* trailing comment *)\n"
    )
    assert t.name == "A.b+c-d_e" and t.texname == "tex" and t.doc == "the doc"
    assert list(t.info) == ["Variant", "CacheType", "Hash", "Com"]
    assert t.variants == frozenset({"self", "fatal"})
    assert t.cache_type == frozenset({"DIC", "IDC"})
    r = t.init.registers
    assert r[Reg(0, "X0")] == Instr("NOP") and r[Reg(0, "X1")] == Int(-5)
    assert r[Reg(0, "X2")] == Int(16) and r[Reg(0, "X4")] == Loc("x")
    assert t.init.memory == {"x": Int(0), "y": Int(1), "v": Int(3)}
    assert t.init.types == {
        "z": "int", Reg(0, "X3"): "uint64_t", Reg(1, "X1"): "void *", "w": "ins_t *",
        "v": "_Atomic int", Reg(0, "X4"): "*",
    }
    p0 = t.threads[0]
    assert p0.lines == (CodeLine(("l1", "l2"), "B l0"), CodeLine(("l0",), "NOP"))
    assert t.threads[1].lines == (CodeLine(("m0",), None),)
    assert set(t.locations()) == {"x", "y", "z", "w", "v"}
    assert parse_litmus(format_test(t)) == t


def test_doc_on_next_line_and_empty_condition_is_forall_true() -> None:
    t = parse_litmus('AArch64 T\n"doc"\n{\n}\n P0 ;\n NOP ;\n')
    assert t.doc == "doc"
    assert t.condition == Condition("forall", And(()))
    assert str(t.condition) == "forall (true)"


def test_condition_forms() -> None:
    a, b, c = (ValueAtom(Reg(0, "X0"), Int(i)) for i in (1, 2, 3))
    assert _cond("exists 0:X0=1").prop == a
    assert _cond("~exists (0:X0=1)").quantifier == "~exists"
    assert _cond("~ exists 0:X0=1").quantifier == "~exists"
    assert _cond("forall (0:X0=1 \\/ 0:X0=2)").prop == Or((a, b))
    assert _cond("final 0:X0=1").quantifier == "exists"
    # herd's precedences: \/ < /\ < => < ~
    assert _cond("exists 0:X0=1 \\/ 0:X0=2 /\\ 0:X0=3").prop == Or((a, And((b, c))))
    assert _cond("exists ~0:X0=1 /\\ 0:X0=2").prop == And((Not(a), b))
    assert _cond("exists not (0:X0=1) /\\ 0:X0=2").prop == And((Not(a), b))
    assert _cond("exists 0:X0=1 /\\ 0:X0=2 => 0:X0=3").prop == And((a, Implies(b, c)))
    assert _cond("exists (0:X0=1 /\\ 0:X0=2) /\\ 0:X0=3").prop == And((a, b, c))
    assert _cond("exists true").prop == And(())
    assert _cond("exists false \\/ true").prop == Or((Or(()), And(())))
    assert _cond("exists 0:X0!=1").prop == Not(a)
    assert _cond("exists 0:X0==1").prop == a
    assert _cond("exists 0:W0=1").prop == a  # W0 names X0
    assert _cond("exists 0:x0=1;").prop == a
    assert _cond("exists x=1").prop == ValueAtom(Mem("x"), Int(1))
    assert _cond("exists [x]=1").prop == ValueAtom(Mem("x"), Int(1))
    assert _cond("exists 0:X0=x").prop == ValueAtom(Reg(0, "X0"), Loc("x"))
    two = parse_litmus("AArch64 T\n{ }\n P0 | P1 ;\n NOP | NOP ;\nexists 0:X0=1:W0\n")
    assert two.condition.prop == LocAtom(Reg(0, "X0"), Reg(1, "X0"))
    assert _cond('exists 0:X0=instr:"NOP"').prop == ValueAtom(Reg(0, "X0"), Instr("NOP"))
    assert _cond('exists 0:X0=instr:"B  .+4"').prop == ValueAtom(Reg(0, "X0"), Instr("B .+4"))
    assert _cond("exists 0:X0=nop").prop == ValueAtom(Reg(0, "X0"), Instr("NOP"))
    assert _cond("exists x=0x10").prop == ValueAtom(Mem("x"), Int(16))
    assert _cond("exists 0:X0=-1").prop == ValueAtom(Reg(0, "X0"), Int(-1))
    assert _cond("exists [x]=[y]").prop == LocAtom(Mem("x"), Mem("y"))
    assert _cond("exists 0:X0=[y]").prop == LocAtom(Reg(0, "X0"), Mem("y"))
    assert _cond("exists t={1,2}").prop == ValueAtom(Mem("t"), Array((Int(1), Int(2))))
    assert _cond("exists fault(P0)").prop == FaultAtom(0)
    assert _cond("exists fault(P0,x)").prop == FaultAtom(0, None, "x")
    assert _cond("exists fault(P0,MMU:Translation)").prop == \
        FaultAtom(0, None, None, "MMU:Translation")
    assert _cond("exists fault(P0,x,D-MMU:Permission)").prop == \
        FaultAtom(0, None, "x", "D-MMU:Permission")
    assert _cond("exists ~fault(P0,TagCheck)").prop == Not(FaultAtom(0, None, None, "TagCheck"))
    assert _cond("exists [PTE(x)]=(oa:PA(y), valid:0, af:1, attrs:(Normal,Inner))").prop == \
        ValueAtom(Mem("PTE(x)"), Pte("PA(y)", (("valid", "0"), ("af", "1")), ("Normal", "Inner")))


def test_locations_and_filter_clauses() -> None:
    t = parse_litmus(BASE + "locations [0:X0; x; fault(P0,x);]\nfilter 0:X0=1\nexists x=1\n")
    assert t.locations_clause == (Reg(0, "X0"), Mem("x"), FaultAtom(0, None, "x"))
    assert t.filter == ValueAtom(Reg(0, "X0"), Int(1))
    assert parse_litmus(format_test(t)) == t
    t = parse_litmus(BASE + "locations []\n")
    assert t.locations_clause == () and t.condition.quantifier == "forall"


def test_registers_canonical() -> None:
    assert canonical_register("W9") == "X9"
    assert canonical_register("x30") == "X30"
    assert canonical_register("LR") == "X30"
    assert canonical_register("sp") == "SP"
    assert canonical_register("ELR_EL1") == "ELR_EL1"
    for bad in ("X31", "W07", "Q1", "l0", "X"):
        assert canonical_register(bad) is None


def test_evaluate_with_lookup_and_resolver() -> None:
    cond = parse_condition('exists (0:X0=1 /\\ (x=2 \\/ 1:X1=label:"P1:L0")) /\\ ~fault(P0)')
    assert cond.registers() == (Reg(0, "X0"), Reg(1, "X1"))
    assert cond.memory() == ("x",)
    state = {Reg(0, "X0"): 1, Mem("x"): 3, Reg(1, "X1"): 0x2000}
    faulted = {FaultAtom(0): False}
    addresses = {CodeLabel(1, "L0"): 0x2000}

    def lookup(atom: object) -> object:
        if isinstance(atom, FaultAtom):
            return faulted[atom]
        assert isinstance(atom, ValueAtom)
        return state[atom.location]

    def resolve(v: object) -> object:
        if isinstance(v, Int):
            return v.as_u64()
        return addresses[v]  # type: ignore[index]

    assert cond.evaluate(lookup, resolve)
    state[Reg(1, "X1")] = 0x2004
    assert not cond.evaluate(lookup, resolve)
    state[Mem("x")] = 2
    assert cond.evaluate(lookup, resolve)
    faulted[FaultAtom(0)] = True
    assert not cond.evaluate(lookup, resolve)
    assert cond.verdict([False, True]) and not parse_condition("~exists 0:X0=0").verdict([True])
    assert parse_condition("forall 0:X0=0").verdict([True, True])
    assert not parse_condition("forall 0:X0=0").verdict([True, False])
    # LocAtom: lookup returns both observed values
    ll = parse_condition("exists [x]=[y]")
    assert ll.evaluate(lambda a: (1, 1)) and not ll.evaluate(lambda a: (1, 2))
    # negative numbers compare after the resolver's normalisation
    neg = parse_condition("exists 0:X0=-1")
    assert neg.evaluate(lambda a: 2**64 - 1, lambda v: v.as_u64() if isinstance(v, Int) else v)


def test_frozen_model() -> None:
    m = FrozenMap({"a": 1})
    assert m == {"a": 1} and hash(m) == hash(FrozenMap([("a", 1)]))
    hash(m)
    m2 = pickle.loads(pickle.dumps(m))
    assert m2 == m and m2._h is None  # no stale cached hash crosses processes
    with pytest.raises(TypeError):
        m["b"] = 2  # type: ignore[index]
    t = parse_litmus(BASE + "exists 0:X0=1\n")
    assert pickle.loads(pickle.dumps(t)) == t
    with pytest.raises(AttributeError):
        t.name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------- errors

MALFORMED = {
    "bad-arch": (1, "'X86' tests are not supported"),
    "no-init": (3, "missing init block '{'"),
    "unterminated-init": (2, "unterminated init block"),
    "bad-init-item": (4, "expected a value"),
    "duplicate-init": (4, "'0:X1' is initialised twice"),
    "bad-register": (7, "'X31' is not an AArch64 register"),
    "thread-order": (3, "threads must be P0, P1, ... in order"),
    "orphan-handler": (3, "fault handler P1.F of an undefined thread"),
    "row-columns": (5, "row has 3 columns, the header has 2"),
    "missing-semicolon": (5, "missing ';' at the end of the row"),
    "duplicate-label": (5, "label 'l0' defined twice in P0"),
    "undefined-label": (4, "label P0:nowhere is not defined"),
    "dangling-and": (6, "expected a condition atom"),
    "unclosed-paren": (6, "expected ')'"),
    "unterminated-comment": (4, "unterminated comment"),
    "bad-cachetype": (3, "'PIPT' is not a cache type"),
    "no-such-thread": (5, "no thread P2"),
    "trailing-text": (5, "unexpected text after the condition"),
    "bare-label-in-condition": (5, 'write a code label as label:"P0:l0"'),
    "bad-fault-type": (6, "'MMU:Foo' is not a fault type"),
    "duplicate-key": (3, "'variant' is given twice"),
    "bad-instruction-char": (5, "unexpected character"),
}


def test_every_fixture_is_listed() -> None:
    assert {p.stem for p in DATA.glob("*.litmus")} == set(MALFORMED)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_fixture_names_the_line(name: str) -> None:
    line, what = MALFORMED[name]
    path = DATA / f"{name}.litmus"
    with pytest.raises(LitmusError) as info:
        parse_file(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert what in msg


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("", 1, "expected 'AArch64 <name>'"),
        ("AArch64\n", 1, "expected 'AArch64 <name>'"),
        ("AArch64 T junk\n{}\n", 1, "unexpected text after the test name"),
        ("AArch64 T\nnot a key\n{}\n", 2, "expected 'Key=value'"),
        ('AArch64 T\n"a"\n"b"\n{}\n', 3, "a second doc string"),
        ("AArch64 T\n{ 0:X0=1 0:X1=2; }\n P0 ;\n NOP ;\n", 2, "';' between init items"),
        ("AArch64 T\n{ t[1]=2; }\n P0 ;\n NOP ;\n", 2, "array cells"),
        ("AArch64 T\n{ int t[2]={1}; }\n P0 ;\n NOP ;\n", 2, "2 cells but 1"),
        ("AArch64 T\n{ 0:X0=`v`; }\n P0 ;\n NOP ;\n", 2, "backquoted"),
        ("AArch64 T\n{ 0:X0=99999999999999999999999; }\n P0 ;\n NOP ;\n", 2, "64 bits"),
        ("AArch64 T\n{ 5:X0=1; }\n P0 ;\n NOP ;\n", 2, "no thread P5"),
        ("AArch64 T\n{ }\n P0 ;\n", 3, "no code rows"),
        ("AArch64 T\n{ }\n", 2, "missing the thread header"),
        ("AArch64 T\n{ }\n Q0 ;\n NOP ;\n", 3, "expected a thread name"),
        ("AArch64 T\n{ }\n P0 | P0.F | P0.F ;\n NOP | NOP | NOP ;\n", 3, "two fault handlers"),
        ("AArch64 T\n{ }\n P0 ;\n 123 ;\n", 4, "expected an instruction"),
        ('AArch64 T\n{ }\n P0 ;\n MOV "x" ;\n', 4, "unexpected '\"'"),
        ("AArch64 T\n{ }\n P0 ;\n codevar:x ;\n", 4, "codevar"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists\n", 5, "expected a condition atom"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists 0:X0=1 with x:exists\n", 5, "'with'"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nobserved 0:X0=1\n", 5, "'observed'"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists 0:X0=1 << x\n", 5, "'<<'"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists fault(P0:nope)\n", 5, "P0:nope is not defined"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists 0:X0=label:\"P0:zz\"\n", 5, "not defined"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists 0:X0=1 /\\ " + "(" * 100 + "0:X0=1"
         + ")" * 100, 5, "nested too deeply"),
        ("AArch64 T\n{ }\n P0 ;\n NOP ;\nexists x=1\x00\n", 5, "control character"),
    ],
)
def test_inline_errors(text: str, line: int, what: str) -> None:
    with pytest.raises(LitmusError) as info:
        parse_litmus(text, "f.litmus")
    msg = str(info.value)
    assert msg.startswith(f"f.litmus:{line}: "), msg
    assert what in msg, msg


def test_thread_without_code_round_trips() -> None:
    t = parse_litmus("AArch64 T\n{ }\n P0 | P1 ;\n NOP |  ;\nexists 0:X0=0\n")
    assert t.threads[1].lines == ()
    assert parse_litmus(format_test(t)) == t
    t = parse_litmus("AArch64 T\n{ }\n P0 ;\n   ;\n")
    assert t.threads[0].lines == () and parse_litmus(format_test(t)) == t


@pytest.mark.parametrize(
    "text",
    [
        "AArch64 T\n" + "".join(f"K{i}=v\n" for i in range(100_000)),
        "AArch64 T\n{" + '"a"' * 300_000,
        "AArch64 T\n{ }\n P0 ;\n" + "".join(f"l{i}:" for i in range(100_000)) + "NOP;",
        "AArch64 T\n{ }\n P0 ;\n NOP ;\nexists " + "(" * 500_000,
        "AArch64 T\n{ }\n P0 ;\n NOP ;\nexists " + "~" * 500_000 + "0:X0=1",
        "AArch64 T\n{ }\n P0 ;\n NOP ;\nexists " + " /\\ ".join(["0:X0=1"] * 80_000),
        "AArch64 T\n" + "(*" * 500_000,
        "AArch64 T\n{}\n" + "P0|" * 300_000,
    ],
    ids=["keys", "quotes", "labels", "parens", "nots", "ands", "comments", "pipes"],
)
def test_pathological_inputs_are_fast(text: str) -> None:
    start = time.monotonic()
    try:
        parse_litmus(text, "f")
    except LitmusError as e:
        assert re.match(r"f:\d+: ", str(e))
    assert time.monotonic() - start < 10 * SLOWDOWN


def test_size_and_type_limits(tmp_path: Path) -> None:
    with pytest.raises(LitmusError, match="longer than"):
        parse_litmus("AArch64 T\n" + " " * (1 << 20))
    with pytest.raises(LitmusError, match="expected text"):
        parse_litmus(b"AArch64 T\n")  # type: ignore[arg-type]
    big = tmp_path / "big.litmus"
    big.write_bytes(b"AArch64 T\n" + b" " * (1 << 20))
    with pytest.raises(LitmusError, match="larger than"):
        parse_file(big)
    bad = tmp_path / "bad.litmus"
    bad.write_bytes(b"AArch64 T\n{\n}\n\xff\n")
    with pytest.raises(LitmusError, match=r"bad.litmus:4: not UTF-8"):
        parse_file(bad)
    with pytest.raises(LitmusError, match="cannot read"):
        parse_file(tmp_path / "missing.litmus")
    rows = "AArch64 T\n{ }\n P0 ;\n" + " ;" * 30_000
    with pytest.raises(LitmusError, match="code rows"):
        parse_litmus(rows)


# ----------------------------------------------------------------------- fuzz

_SAMPLES = [p.read_text() for p in FILES[::7]] or [BASE + "exists 0:X0=1\n"]


def _check_any(text: str) -> None:
    try:
        t = parse_litmus(text, "fuzz.litmus")
    except LitmusError as e:
        assert str(e).startswith("fuzz.litmus:")
        assert re.match(r"fuzz\.litmus:\d+: \S", str(e))
        return
    assert parse_litmus(format_test(t), "fuzz.litmus") == t


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SAMPLES),
    st.lists(
        st.tuples(
            st.integers(0, 5000),
            st.integers(0, 20),
            st.text(alphabet=" \n;|:=(){}[]*~/\\\"PXW01x.,#-+abc", max_size=6),
        ),
        max_size=4,
    ),
)
def test_fuzz_mutations(sample: str, edits: list[tuple[int, int, str]]) -> None:
    text = sample
    for pos, length, ins in edits:
        p = pos % (len(text) + 1)
        text = text[:p] + ins + text[p + length :]
    _check_any(text)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(_SAMPLES), st.integers(0, 5000))
def test_fuzz_truncations(sample: str, cut: int) -> None:
    _check_any(sample[: cut % (len(sample) + 1)])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.litmus"
    path.write_bytes(data)
    try:
        parse_file(path)
    except LitmusError as e:
        assert str(e).startswith(f"{path}:")
    _check_any("AArch64 T\n" + data.decode("latin-1"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_random_text_after_header(text: str) -> None:
    _check_any("AArch64 T\n{ 0:X0=1; }\n P0 ;\n NOP ;\n" + text)
    _check_any("AArch64 T\n{ " + text)


# ------------------------------------------------------------ herd -> Keystone


def _layout(t: LitmusTest) -> dict[str, int]:
    return {th.name: 0x10000 * (th.proc + 1) + (0x8000 if th.handler else 0)
            for th in t.threads}


@pytest.mark.parametrize("path", FILES, ids=_ids(FILES))
def test_every_instruction_assembles(path: Path) -> None:
    t = parse_file(path)
    bases = _layout(t)
    labels = process_labels(t, bases)
    for th in t.threads:
        words = assemble_thread(t, th, bases[th.name], labels.get(th.proc, {}))
        assert len(words) == len(th.instructions())
        assert all(0 <= w < 2**32 for w in words)
    for v in t.init.values():
        if isinstance(v, Instr):
            encode_instruction_value(v)


def test_every_vmsa_instruction_assembles() -> None:
    failures = []
    for path in VMSA_FILES:
        t = parse_file(path)
        bases = _layout(t)
        labels = process_labels(t, bases)
        for th in t.threads:
            try:
                assemble_thread(t, th, bases[th.name], labels.get(th.proc, {}))
            except LitmusError as e:
                failures.append(str(e))
    assert failures == []


def test_a_branch_to_a_register_named_like_a_label_is_an_error() -> None:
    t = parse_litmus("AArch64 T\n{ }\n P0 ;\n L0: BR L0 ;\nexists (0:X0=0)\n", "t.litmus")
    with pytest.raises(LitmusError, match=re.escape("t.litmus:4: cannot assemble 'BR L0'")):
        assemble_thread(t, t.threads[0], 0x1000)


def test_handler_adr_to_a_label_of_its_thread(suite: dict[str, LitmusTest]) -> None:
    t = suite["S-self+dmb.st+fault"]
    bases = {"P0": 0x10000, "P1": 0x20000, "P1.F": 0x30000}
    labels = process_labels(t, bases)
    assert labels[1] == {"m0": 0x20000, "l1": 0x20004}
    h = t.handler_of(1)
    assert h is not None
    words = assemble_thread(t, h, bases["P1.F"], labels[1])
    # ADR X9,l1 at 0x30008: offset 0x20004 - 0x30008 = -0x10004
    off = -0x10004 & 0x1FFFFF
    assert words[2] == 0x10000000 | (off & 3) << 29 | (off >> 2) << 5 | 9


def test_pc_relative_encodings() -> None:
    at = 0x10000
    assert assemble_line("B l", at, {"l": 0x10040}) == 0x14000010
    assert assemble_line("B l", at, {"l": 0xFF00}) == 0x17FFFFC0
    assert assemble_line("BL .+8", at) == 0x94000002
    assert assemble_line("B.NE l", at, {"l": 0x10100}) == 0x54000801
    assert assemble_line("CBNZ W2,l", at, {"l": 0x10008}) == 0x35000042
    assert assemble_line("CBZ X3, l", at, {"l": 0xFFF0}) == 0xB4FFFF83
    assert assemble_line("TBZ W0,#3,l", at, {"l": 0x10020}) == 0x36180100
    assert assemble_line("TBNZ X5,#40,l", at, {"l": 0xFFF8}) == 0xB747FFC5
    assert assemble_line("ADR X9,l", at, {"l": 0x10013}) == 0x70000089
    assert assemble_line("ADR X9,.-0x7f0", at) == 0x10FFC089
    assert assemble_line("ADRP X0,l", 0x10FF8, {"l": 0x23456}) == 0xF0000080
    assert assemble_line("LDR X0,l", at, {"l": 0x10100}) == 0x58000800
    assert assemble_line("LDRSW X1,l", at, {"l": 0x10100}) == 0x98000801
    # labels named like registers or assembler keywords are fine: Keystone never sees them
    assert assemble_line("B lsl", at, {"lsl": at + 4}) == 0x14000001
    assert assemble_line("B X1", at, {"X1": at + 4}) == 0x14000001


def test_pc_relative_agrees_with_keystone_where_keystone_is_right() -> None:
    import keystone

    ks = keystone.Ks(keystone.KS_ARCH_ARM64, keystone.KS_MODE_LITTLE_ENDIAN)
    for ins in ("B", "BL", "B.EQ", "CBZ W1,", "CBNZ X2,", "TBZ W3,#2,", "ADR X4,", "LDR W5,"):
        for delta in (4, 64, 4096):
            sep = " " if not ins.endswith(",") else ""
            src = f"{ins}{sep}l\n" + "NOP\n" * (delta // 4 - 1) + "l: NOP"
            enc, _ = ks.asm(src, 0x4000)
            want = int.from_bytes(bytes(enc[:4]), "little")
            assert assemble_line(f"{ins}{sep}l", 0x4000, {"l": 0x4000 + delta}) == want, src


@pytest.mark.parametrize(
    "text, what",
    [
        ("B .+3", "multiple of 4"),
        ("B .+0x8000000", "out of range"),
        ("CBNZ W2,.+1048576", "out of range"),
        ("LDR X0,.+2", "multiple of 4"),
        ("ADR X0,.+1048576", "out of range"),
        ("TBZ W0,#32,.+8", "bit number"),
        ("B nowhere", "has no address"),
        ("B #8", "expected a label"),
        ("ADR W0,.+4", "X register"),
        ("UDF #65536", "0..65535"),
        ("LDAPRB X0,[X1]", "W register"),
        ("CAS W0,X1,[X2]", "sizes"),
        ("STADDA W0,[X1]", "no acquire"),
        ("LDAPR W0,[X1,#8]", "no offset"),
        (".inst 0x0", "no mnemonic"),
        ("MOV X0,.", "directives"),
        ("DC CVAP,X1", "0 bytes"),
        ("FROB X0", "Keystone"),
    ],
)
def test_assembly_errors(text: str, what: str) -> None:
    with pytest.raises(LitmusError) as info:
        assemble_line(text, 0x1000, {}, where="t.litmus:3")
    msg = str(info.value)
    assert msg.startswith(f"t.litmus:3: cannot assemble '{text}'"), msg
    assert what in msg, msg


def test_keystone_rejected_spellings_become_words() -> None:
    capstone = pytest.importorskip("capstone")
    cs = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    cases = {
        "UDF #0": "udf #0",
        "LDAPR W0,[X1]": "ldapr w0, [x1]",
        "LDAPR X0,[SP]": "ldapr x0, [sp]",
        "LDAPRH W2,[X3,#0]": "ldaprh w2, [x3]",
        "STLUR W0,[X1,#-4]": "stlur w0, [x1, #-4]",
        "LDAPUR X0,[X1,#8]": "ldapur x0, [x1, #8]",
        "CASAL X0,X1,[X2]": "casal x0, x1, [x2]",
        "CASLH W4,W5,[SP]": "caslh w4, w5, [sp]",
        "SWPLB W0,W1,[X2]": "swplb w0, w1, [x2]",
        "LDADDAL X0,X1,[X2]": "ldaddal x0, x1, [x2]",
        "LDSMAXLB W0,W1,[X2]": "ldsmaxlb w0, w1, [x2]",
        "STADD W0,[X2]": "stadd w0, [x2]",
        "STSETLH W1,[X9]": "stsetlh w1, [x9]",
    }
    for herd, disasm in cases.items():
        out = to_keystone(herd)
        assert out.startswith(".word 0x"), out
        word = assemble_line(herd)
        (ins,) = cs.disasm(word.to_bytes(4, "little"), 0)
        assert f"{ins.mnemonic} {ins.op_str}" == disasm


def test_identity_and_rewrite_labels() -> None:
    assert to_keystone("STR W0,[X1]") == "STR W0,[X1]"
    assert to_keystone("DC CVAU,X1") == "DC CVAU,X1"
    assert assemble_line("MOV w9,#2") == 0x52800049
    assert rewrite_labels("ADR X9,l1", 0x1000, {"l1": 0x800}) == "ADR X9,.-2048"
    assert rewrite_labels("CBNZ W2, l1", 0x1000, {"l1": 0x1010}) == "CBNZ W2,.+16"
    assert rewrite_labels("B.NE l", 0x1000, {"l": 0x1000}) == "B.NE .+0"
    assert rewrite_labels("STR W0,[X1]", 0x1000, {"X1": 0}) == "STR W0,[X1]"
    assert rewrite_labels("B other", 0x1000, {"l": 0}) == "B other"


def test_instruction_values() -> None:
    assert encode_instruction_value("NOP") == 0xD503201F
    assert encode_instruction_value(Instr("NOP")) == 0xD503201F
    assert encode_instruction_value('instr:"B .+4"') == 0x14000001
    assert encode_instruction_value('instr:"ADR X3,.+4"') == 0x10000023
    assert encode_instruction_value(Instr("BL .+8")) == 0x94000002
    assert encode_instruction_value("MOV W9,#1") == 0x52800029
    with pytest.raises(LitmusError, match="not a label"):
        encode_instruction_value("B l0")
    with pytest.raises(LitmusError, match="ADRP"):
        encode_instruction_value("ADRP X0,.+4096")
