"""The JIT examples: each checked against a reference implementation."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from programs import needs_programs

from execmem.examples import bf, bpf, calc, hotswap

X86 = platform.machine().lower() in ("x86_64", "amd64")
# calc and hotswap generate code for the host (x86-64 or arm64); bf and bpf are
# compilers to x86-64 only (an arm64 code generator for them is a port, not a test).
native = needs_programs
x86_compiler = pytest.mark.skipif(not X86, reason="the bf and bpf examples compile to x86-64 only")

# ------------------------------------------------------------------------ calc
numbers = st.integers(min_value=-(2**63), max_value=2**64 - 1).map(calc.Num)
variables = st.sampled_from("abcxyz").map(calc.Var)
expressions = st.recursive(
    numbers | variables,
    lambda inner: st.one_of(
        inner.map(calc.Neg),
        st.builds(calc.Bin, st.sampled_from(["+", "-", "*", "&", "|", "^", "<<", ">>"]), inner, inner),
    ),
    max_leaves=12,
)
environments = st.fixed_dictionaries({v: st.integers(-(2**63), 2**63 - 1) for v in "abcxyz"})


@native
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs=st.lists(expressions, min_size=4, max_size=4), env=environments)
def test_calc_native_matches_python(exprs: list[calc.Expr], env: dict[str, int]) -> None:
    """2,000 random expressions (four per example)."""
    with calc.Compiler() as compiler:
        for expr in exprs:
            assert compiler.compile(expr)(**env) == calc.evaluate(expr, env)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expr=expressions, env=environments)
def test_calc_arm64_on_the_modeled_machine_matches_python(expr: calc.Expr, env: dict[str, int]) -> None:
    with calc.Compiler("arm64") as compiler:
        fn = compiler.compile(expr)
        assert fn(**env) == calc.evaluate(expr, env)


def test_calc_reuses_one_machine_for_many_expressions() -> None:
    with calc.Compiler("arm64") as compiler:
        results = [compiler.compile(f"a * {k} + b")(a=3, b=k) for k in range(20)]
    assert results == [3 * k + k for k in range(20)]


def test_calc_rejects_what_it_does_not_compile() -> None:
    for bad in ("a / b", "f(x)", "a +", "1.5 * a", "A + 1"):
        with pytest.raises(calc.CalcError):
            calc.parse(bad)


@native
def test_calc_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "execmem", "example", "calc", "a*b-c", "a=6", "b=7", "c=2"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith("a*b-c = 40")


# -------------------------------------------------------------------------- bf
@x86_compiler
@pytest.mark.parametrize("name", sorted(bf.PROGRAMS))
def test_bf_jit_matches_the_interpreter(name: str) -> None:
    jit = bf.JIT()
    data = b"execmem"
    assert jit.compile(bf.PROGRAMS[name])(data) == bf.interpret(bf.PROGRAMS[name], data)


@x86_compiler
def test_bf_io_callbacks() -> None:
    assert bf.JIT().compile(bf.PROGRAMS["reverse"])(b"abc") == b"cba"
    assert bf.JIT().compile(bf.PROGRAMS["hello"])() == b"Hello World!\n"


@x86_compiler
@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="+-<>.,[]", max_size=40), st.binary(max_size=8))
def test_bf_random_programs(source: str, data: bytes) -> None:
    try:
        ops = bf.parse(source)
    except bf.BFError:
        return
    if any(op == "[" for op, _ in ops):
        return  # random loops may never terminate
    program = _bf_jit().compile(source)
    try:
        assert program(data) == bf.interpret(source, data)
    finally:
        program.free()


_BF_JIT: list[bf.JIT] = []


def _bf_jit() -> bf.JIT:
    """One JIT (two published callbacks) for all the random programs."""
    if not _BF_JIT:
        _BF_JIT.append(bf.JIT())
    return _BF_JIT[0]


def test_bf_rejects_unbalanced_brackets() -> None:
    for bad in ("[", "]", "[[]", "+]["):
        with pytest.raises(bf.BFError):
            bf.parse(bad)


# ------------------------------------------------------------------------- bpf
packets = st.one_of(
    st.builds(bpf.packet, st.sampled_from([6, 17, 1]), st.integers(0, 65535), st.sampled_from([53, 80, 443, 0]),
              ethertype=st.sampled_from([0x800, 0x806, 0x86DD]), frag=st.sampled_from([0, 0x2000, 5])),
    st.binary(max_size=80),
)


_FILTERS: dict[str, bpf.Filter] = {}


@x86_compiler
@settings(max_examples=300, deadline=None)
@given(packets)
def test_bpf_filters_match_the_interpreter(pkt: bytes) -> None:
    for name, prog in bpf.FILTERS.items():
        if name not in _FILTERS:
            _FILTERS[name] = bpf.Filter(prog)
        assert _FILTERS[name](pkt) == bpf.interpret(prog, pkt)


@st.composite
def programs(draw: st.DrawFn) -> list[bpf.Insn]:
    """Random valid cBPF programs (forward jumps only, ending in RET)."""
    n = draw(st.integers(1, 12))
    out = []
    for pc in range(n):
        remaining = n - pc - 1
        kind = draw(st.sampled_from(["ld", "ldx", "alu", "jmp", "st", "misc"] if remaining else ["ret"]))
        k = draw(st.integers(0, 2**32 - 1))
        if kind == "ld":
            code = bpf.LD | draw(st.sampled_from([bpf.W, bpf.H, bpf.B])) | draw(st.sampled_from([bpf.ABS, bpf.IND, bpf.IMM, bpf.LEN]))
            k = draw(st.integers(0, 70)) if code & 0xE0 in (bpf.ABS, bpf.IND) else k
            out.append(bpf.Insn(code, 0, 0, k))
        elif kind == "ldx":
            code = draw(st.sampled_from([bpf.LDX | bpf.IMM, bpf.LDX | bpf.LEN, bpf.LDX | bpf.B | bpf.MSH, bpf.LDX | bpf.MEM]))
            k = draw(st.integers(0, 15)) if code == bpf.LDX | bpf.MEM else draw(st.integers(0, 70)) if code & 0xE0 == bpf.MSH else k
            out.append(bpf.Insn(code, 0, 0, k))
        elif kind == "alu":
            op = draw(st.sampled_from([bpf.ADD, bpf.SUB, bpf.MUL, bpf.DIV, bpf.OR, bpf.AND, bpf.LSH, bpf.RSH, bpf.NEG, bpf.MOD, bpf.XOR]))
            src = draw(st.sampled_from([bpf.K, bpf.X_SRC]))
            if op in (bpf.DIV, bpf.MOD) and src == bpf.K and k == 0:
                k = 1
            out.append(bpf.Insn(bpf.ALU | op | src, 0, 0, k))
        elif kind == "jmp":
            op = draw(st.sampled_from([bpf.JA, bpf.JEQ, bpf.JGT, bpf.JGE, bpf.JSET]))
            jt, jf = draw(st.integers(0, remaining - 1)), draw(st.integers(0, remaining - 1))
            target = draw(st.integers(0, remaining - 1)) if op == bpf.JA else k
            out.append(bpf.Insn(bpf.JMP | op | draw(st.sampled_from([bpf.K, bpf.X_SRC])), jt, jf, target))
        elif kind == "st":
            out.append(bpf.Insn(draw(st.sampled_from([bpf.ST, bpf.STX])), 0, 0, draw(st.integers(0, 15))))
        elif kind == "misc":
            out.append(bpf.Insn(bpf.MISC | draw(st.sampled_from([bpf.TAX, bpf.TXA]))))
        else:
            out.append(bpf.Insn(bpf.RET | draw(st.sampled_from([0, bpf.RET_A])), 0, 0, k))
    return out


@x86_compiler
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.binary(max_size=80))
def test_bpf_random_programs_match_the_interpreter(prog: list[bpf.Insn], pkt: bytes) -> None:
    f = bpf.Filter(prog)
    try:
        assert f(pkt) == bpf.interpret(prog, pkt)
    finally:
        f.free()


def test_bpf_rejects_invalid_programs() -> None:
    for bad in ([], [bpf.Insn(0x15, 5, 5, 0), bpf.Insn(0x6)], [bpf.Insn(0x28, 0, 0, 12)]):
        with pytest.raises(bpf.BPFError):
            bpf.validate(bad)


# --------------------------------------------------------------------- hotswap
@native
def test_hotswap_every_call_returns_a_published_version() -> None:
    figures = hotswap.run(workers=4, versions=400)
    assert figures["bad"] == []
    assert figures["versions_seen"] >= 2
    assert figures["calls"] > 0


def test_hotswap_protocol_on_the_modeled_machine() -> None:
    seen, schedules, _finals = hotswap.explore_on_machine(runs=60, seed=1)
    assert schedules == 60
    assert seen <= {1, 2} and seen
