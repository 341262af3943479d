"""``execmem.asm``: every statement accounted for, the directive policy, limits,
``syntax=``, ``symbols=``, ``{disp32}`` and errors that name the failing line.

Inputs that could crash or stall Keystone are run in child processes by
``test_asm_attacks.py``; everything here is safe in the test process."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import capstone
import paths
import pytest

import execmem
from execmem import _asm_source
from execmem._errors import AssemblyError, UnsupportedError

X86 = (capstone.CS_ARCH_X86, capstone.CS_MODE_64)
ARM64 = (capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)


def disasm(code: bytes, address: int, arch: str = "x86_64") -> list[tuple[str, str]]:
    cs = capstone.Cs(*(X86 if arch == "x86_64" else ARM64))
    out = [(m, o) for _, _, m, o in cs.disasm_lite(code, address)]
    assert sum(s for _, s, _, _ in cs.disasm_lite(code, address)) == len(code), "undecodable bytes"
    return out


def refused(source: str, arch: str = "x86_64", match: str | None = None, **kw: Any) -> str:
    with pytest.raises(AssemblyError, match=match) as info:
        execmem.asm(source, arch, **kw)
    return str(info.value)


def test_x86_64_and_addresses() -> None:
    assert execmem.asm("mov eax, 42\nret", "x86_64") == b"\xb8\x2a\x00\x00\x00\xc3"
    # A relative jump depends on where the code is placed.
    assert execmem.asm("jmp 0x2000", "x86_64", 0x1000) != execmem.asm("jmp 0x2000", "x86_64", 0x1800)
    assert execmem.asm("", "x86_64") == b""
    assert execmem.asm("# nothing\n\n  ;; /* at all */", "x86_64") == b""


def test_arm64() -> None:
    assert execmem.asm("mov x0, #42\nret", "arm64") == bytes.fromhex("400580d2c0035fd6")
    assert execmem.asm("mov x0, #1 // comment\nret", "aarch64") == execmem.asm("mov x0, #1\nret", "arm64")
    assert execmem.asm("# a comment ; nop\nret", "arm64") == execmem.asm("ret", "arm64")


@pytest.mark.parametrize(
    ("arch", "source", "line", "text"),
    [
        ("x86_64", "mov eax, 1\nbogus eax\nret", 2, "bogus eax"),
        ("x86_64", "jmp done\nnop\nnop\nfrobnicate\ndone: ret", 4, "frobnicate"),  # forward label
        ("x86_64", "jmp missing\nret", 1, "jmp missing"),  # undefined symbol
        ("x86_64", "mov eax, [nowhere]\nret", 1, "mov eax, [nowhere]"),
        ("arm64", "b.ne later\nmov x0, #1\n\nadd x0, x0, #1\nxyz x0\nlater:\nret", 5, "xyz x0"),
        ("arm64", "cbz x0, out\nmov x0, #1\nout: ret\nmov q0, x1", 4, "mov q0, x1"),
        ("arm64", "\n".join(["nop"] * 200 + ["bad"] + ["nop"] * 55), 201, "bad"),
        ("x86_64", "nop; nop; bogus; nop", 1, "bogus"),  # several statements on a line
        ("x86_64", "/* two\nlines */ nop\nbogus", 3, "bogus"),  # a comment spanning lines
    ],
)
def test_error_names_the_failing_line(arch: str, source: str, line: int, text: str) -> None:
    message = refused(source, arch)
    assert f"line {line}:" in message and repr(text) in message and arch in message


# -- every statement accounted for ------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "source", "line"),
    [
        # Keystone 0.9.2 returned b"" (or fewer bytes) and no error for each of these.
        ("x86_64", "push rbp\nmovq %rsp, %rbp\npop rbp\nret", 2),  # AT&T in Intel mode: dropped
        ("x86_64", "jmp dword 0x100", 1),  # empty output
        ("x86_64", "nop\njmp dword 0x100\nret", 2),
        ("arm64", "mov x0,#1\nadd x0,x0,#1 #2\nret", 2),  # empty output
        ("arm64", "nop\nadd x0, x0, x1 # c\nret", 2),  # "#" mid-statement: silently nothing
        ("x86_64", ".section .foo", 1),
        ("x86_64", '.error "boom"', 1),
        ("arm64", ".inst 0xd65f03c0", 1),  # dropped even next to other code
    ],
)
def test_statements_keystone_drops_are_errors(arch: str, source: str, line: int) -> None:
    assert f"line {line}:" in refused(source, arch)


@pytest.mark.parametrize(
    ("source", "offsets", "output", "problem"),
    [
        # Keystone's answer as it could come back: each wrong one is caught.
        ("nop\nret", [0, 1, 2], "90c3", None),
        ("nop\nret", [0, 1, 1], "90", "no machine code"),
        ("nop\nret", [0, 1, 2], "0fc3", "do not decode"),
        ("fstsw ax", [0, 3], "9bdfe0", None),  # WAIT + FNSTSW: two instructions, one statement (SDM)
        ("mov eax, 1", [0, 5], "b801000000", None),
        ("mov eax, 1", [0, 3], "b80100", "do not decode|not whole"),
        ("rep\nmovsb", [0, 1, 2], "f3a4", None),
        ("nop\nrep", [0, 1, 2], "90f3", "prefix without"),
        (".byte 1, 2\n.balign 4, 0xcc", [0, 2, 4], "0102cccc", None),
        (".byte 1, 2\n.balign 4, 0xcc", [0, 2, 4], "0103cccc", "0103 where the directive gives 0102"),
        (".byte 1, 2\n.balign 4, 0xcc", [0, 2, 4], "0102cc90", "gives cccc"),
        (".byte 1, 2\n.balign 4, 0xcc", [0, 2, 2], "0102", "multiple of 4"),
        (".space 2, 7", [0, 2], "0707", None),
        (".space 2, 7", [0, 1], "07", "1 bytes where the directive gives 2"),
        ('.asciz "a"', [0, 2], "6100", None),
        ('.asciz "a"', [0, 2], "6200", "where the directive gives 6100"),
        ("jmp 0x100000000", [0, 5], "e9fbffffff", "out of reach"),
    ],
)
def test_accounting_catches_what_keystone_could_get_wrong(source: str, offsets: list[int], output: str, problem: str | None) -> None:
    from execmem._asm import _Job, _Mismatch
    from execmem._asm_engine import Helper

    spec = execmem.arch.get("x86_64")
    assert spec.asm is not None
    statements = _asm_source.parse(source, spec, spec.asm.syntaxes[0])
    labels = {label: k for k, st in enumerate(statements) for label in st.labels}
    job = _Job(spec, spec.asm, spec.asm.syntaxes[0], 0, {}, Helper())
    if problem is None:
        job._account(statements, offsets, bytes.fromhex(output), labels, partial=False)
    else:
        with pytest.raises(_Mismatch, match=problem):
            job._account(statements, offsets, bytes.fromhex(output), labels, partial=False)


def test_at_and_t_syntax_on_request() -> None:
    att = execmem.asm("push %rbp\nmovq %rsp, %rbp\naddq $8, %rsp\npop %rbp\nret", "x86_64", syntax="att")
    intel = execmem.asm("push rbp\nmov rbp, rsp\nadd rsp, 8\npop rbp\nret", "x86_64")
    assert att == intel == bytes.fromhex("554889e54883c4085dc3")
    # Keystone's AT&T mode read unprefixed numbers as hex ($10 was 16); asm() writes them in hex.
    assert execmem.asm("movl $10, %eax\n.balign 16", "x86_64", syntax="att")[:5] == bytes.fromhex("b80a000000")
    assert execmem.asm("mov eax, 10", "x86_64") == bytes.fromhex("b80a000000")  # and after it, Intel too
    assert "syntax='att'" in refused("movq %rsp, %rbp", "x86_64")  # a mix names the fix
    assert "Intel" in refused("mov eax, dword ptr [rbx]", "x86_64", syntax="att")
    assert execmem.asm("nop", "x86_64", syntax="INTEL") == b"\x90"
    with pytest.raises(UnsupportedError, match="intel, att"):
        execmem.asm("nop", "x86_64", syntax="nasm")
    with pytest.raises(UnsupportedError, match="gnu"):
        execmem.asm("nop", "arm64", syntax="att")


def test_prefixes_join_their_instruction() -> None:
    assert execmem.asm("rep movsb\nrep; stosb", "x86_64") == bytes.fromhex("f3a4f3aa")
    assert execmem.asm("lock\nadd dword ptr [rax], 1", "x86_64") == bytes.fromhex("f0830001")
    assert "prefix without an instruction" in refused("nop\nrep", "x86_64")
    assert "followed by an instruction" in refused("rep [rax]", "x86_64")  # Keystone looped on it


def test_data_and_alignment_are_accounted_for_by_size() -> None:
    code = execmem.asm("nop\n.byte 1, 2\n.balign 8\nret\n.quad 0x1122334455667788", "x86_64", 0x1000)
    assert code[:3] == b"\x90\x01\x02" and code[8] == 0xC3 and code[9:] == bytes.fromhex("8877665544332211")
    assert disasm(code[3:8], 0x1003) == [("nop", "dword ptr [rax + rax]")]  # NOP padding, one instruction
    # Alignment is of the address, not of the offset: at 0x1001 the pad is one byte shorter.
    assert len(execmem.asm("nop\n.balign 8\nret", "x86_64", 0x1001)) == 8


@pytest.mark.parametrize(
    ("arch", "source", "expected"),
    [
        ("x86_64", ".byte 1, 2, 0xff, -1", "0102ffff"),
        ("x86_64", ".short 0x1234", "3412"),
        ("x86_64", ".word 1", "0100"),
        ("arm64", ".word 1", "01000000"),
        ("x86_64", ".long 0x12345678", "78563412"),
        ("x86_64", ".quad 1", "0100000000000000"),
        ("x86_64", '.ascii "a\\n", "\\101\\\\"', "610a415c"),
        ("x86_64", '.asciz "ab"', "616200"),
        ("x86_64", ".byte (1 + 2) * 3, ~0, 1 << 4, 'a'", "09ff1061"),
        ("x86_64", "nop\n.balign 4, 0xcc", "90cccccc"),
        ("x86_64", "nop\n.p2align 2, 0", "90000000"),
        ("arm64", "nop\n.balign 16\nret", "1f2003d5" * 4 + "c0035fd6"),
        ("x86_64", ".space 3", "000000"),
        ("x86_64", ".space 2, 0xcc", "cccc"),
        ("x86_64", ".zero 2", "0000"),
        ("x86_64", ".fill 2, 2, 0x1234", "34123412"),
        ("x86_64", ".fill 3", "000000"),
        ("x86_64", ".rept 3\nnop\n.endr", "909090"),
        ("x86_64", ".rept 2\n.rept 2\nnop\n.endr\nret\n.endr", "9090c39090c3"),
        ("x86_64", ".rept 0\nnop\n.endr", ""),
    ],
)
def test_accepted_directives(arch: str, source: str, expected: str) -> None:
    assert execmem.asm(source, arch).hex() == expected


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ('.incbin "/etc/passwd"', "not accepted"),  # read the file into the code
        ('.include "x.s"', "not accepted"),
        (".section .foo", "not accepted"),
        (".text", "not accepted"),
        (".cfi_startproc", "not accepted"),  # ended the process: LLVM ERROR
        ('.warning "w"', "not accepted"),
        (".globl f", "not accepted"),
        (".intel_syntax noprefix", "not accepted"),
        (".code32", "not accepted"),
        (".org 0x100", "not accepted"),
        (".macro m\nnop\n.endm", "not accepted"),
        (".frobnicate", "not accepted"),
        (".set x, 1", "assignments"),
        (".equ x, 1", "assignments"),
        ("x = 1", "assignments"),
        (".align 16", "balign"),  # bytes or a power of two, depending on the architecture
        (".balign 3", "power of two"),
        (".balign 8192", r"\[1, 4096\]"),
        (".p2align 13", r"\[0, 12\]"),
        (".balign 8, 0x100", "fill byte"),
        (".space n", "literal integer"),
        (".space 0x4000001", "literal integer"),  # more than asm() produces
        (".fill 0x1000001, 4", "more than asm"),
        (".fill 1, 5", r"\[1, 4\]"),  # above 4 Keystone keeps 4 bytes of the value
        (".rept 3\nnop", "without .endr"),
        (".endr", "without .rept"),
        (".rept 100001\nnop\n.endr", "literal integer"),
        (".rept 1000\n.rept 1000\nnop\n.endr\n.endr", "more than 100000 statements"),
        (".byte", "one or more values"),
        (".byte 1, %", "division"),  # Keystone looped forever on this (a modulo without operand)
        (".byte 1, (", "malformed"),
        (".byte 300", "out of range|Literal value"),
        (".ascii abc", "takes strings"),
        ('.ascii "\\x41"', "escapes"),  # Keystone has no hex escapes
        (".byte 0x10000000000000000", "below 2"),  # Keystone looped forever on this
    ],
)
def test_directive_policy(source: str, match: str) -> None:
    message = refused(source, match=match)
    assert "line " in message


def test_limits() -> None:
    assert "accepts at most" in refused("nop\n" * (_asm_source.MAX_SOURCE // 4 + 1))
    assert "per line" in refused("nop " + " " * _asm_source.MAX_LINE)
    assert "100000 statements" in refused("nop\n" * (_asm_source.MAX_STATEMENTS + 1))
    assert "operator and bracket" in refused("mov eax, " + "(" * 65 + "1" + ")" * 65)
    assert "at most" in refused(".space 0x1000000\n" * 5)  # 80 MiB of output
    assert "control character" in refused("nop\x0cnop")
    assert "NUL" in refused("nop\0nop")
    assert "strings" in refused('mov eax, 1 + "abcd"')
    assert "cannot start with" in refused('mov eax, "abcd"')
    assert "relocation" in refused("ldr x0, [x1, :lo12:sym]", "arm64")
    assert "literal pools" in refused("ldr x0, =0x1234", "arm64")
    assert "cannot start with" in refused("l ::")  # Keystone looped forever on this
    assert "cannot start with" in refused("1: nop")
    assert "reserved" in refused(f"{_asm_source.PROBE}1: nop")


def test_blanks_and_comments_are_normalized() -> None:
    spaced = "mov" + " " * 50_000 + "eax," + "\t" * 10_000 + "1 /* a */ /**/ # c\nret // c"
    assert execmem.asm(spaced, "x86_64") == execmem.asm("mov eax, 1\nret", "x86_64")
    assert execmem.asm("nop # c ; ret", "x86_64") == b"\x90"  # x86: "#" comments to the end of the line


# -- PC-relative targets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "source", "address"),
    [
        # Keystone 0.9.2 encoded each of these silently with a wrong target.
        ("x86_64", "jmp 0x100000000", 0),
        ("x86_64", "call 0x100000000", 0x1000),
        ("x86_64", "loop l\n.space 200\nl: ret", 0),  # no long form: truncated
        ("arm64", "b 0x10000000", 0),
        ("arm64", "b.eq l\n.space 0x100000\nl: ret", 0),
        ("arm64", "cbz x0, 0x100000", 0),
        ("arm64", "ldr x0, 0x100000", 0),
    ],
)
def test_out_of_reach_targets_are_errors(arch: str, source: str, address: int) -> None:
    assert "out of reach" in refused(source, arch, address=address)


def test_targets_in_reach_are_encoded_as_written() -> None:
    code = execmem.asm("jmp 0x7fff0000\ncall l\nl: jne .\nloop l", "x86_64", 0x1000)
    assert [op for _, op in disasm(code, 0x1000)] == ["0x7fff0000", "0x100a", "0x100a", "0x100a"]
    code = execmem.asm("b 0x7fff000\nbl l\nl: cbz x0, .\nadr x1, l\ntbz w0, #3, l - 4", "arm64", 0x1000)
    assert [op for _, op in disasm(code, 0x1000, "arm64")] == [
        "#0x7fff000", "#0x1008", "x0, #0x1008", "x1, #0x1008", "w0, #3, #0x1004"
    ]
    assert "0x1000 as 0x2000" in refused("nop\nnop\nl: nop\nadrp x1, l", "arm64", address=0x1000)  # Keystone's bug
    assert "cannot check" in refused("jmp 2 * 8")  # asm() evaluates only sums of terms: refused


def test_disp32_keeps_a_near_jump_long() -> None:
    near = execmem.asm("jmp l\nl: ret", "x86_64")
    long = execmem.asm("{disp32} jmp l\nl: ret", "x86_64", 0x1000)
    assert near == bytes.fromhex("eb00c3") and long == bytes.fromhex("e900000000c3")
    assert execmem.asm("{disp32} call 0x1010", "x86_64", 0x1000) == bytes.fromhex("e80b000000")
    assert "out of reach" in refused("{disp32} jmp 0x100000000")
    assert "applies to" in refused("{disp32} b l\nl: ret", "arm64")
    assert "applies to" in refused("{disp32} mov eax, 1")


# -- symbols= ---------------------------------------------------------------------------------


def test_symbols_resolve_external_names() -> None:
    base, far, near = 0x7F00_0000_0000, 0x7F00_1234_5670, 0x7F00_0000_0040
    code = execmem.asm("call printf\njmp near\nmov rax, printf", "x86_64", base, symbols={"printf": far, "near": near})
    assert code.startswith(execmem.asm(f"call {far:#x}\njmp {near:#x}", "x86_64", base))
    assert disasm(code, base) == [("call", f"{far:#x}"), ("jmp", f"{near:#x}"), ("movabs", f"rax, {far:#x}")]
    refused("jmp near", symbols={"near": 0x1040}, address=base)  # 0x7f0000000000 away
    assert execmem.asm("bl helper", "arm64", 0x10000, symbols={"helper": 0x10000 + 64}) == bytes.fromhex("10000094")


def test_unresolved_and_bad_symbols() -> None:
    assert "undefined symbol 'printf'" in refused("nop\ncall printf")
    assert "undefined symbol 'foo'" in refused("mov rax, foo", symbols={"bar": 1})
    assert "undefined symbol 'y'" in refused(".quad 5 - y")  # Keystone took y as 0
    assert "both a label" in refused("f: ret", symbols={"f": 1})
    assert "not an identifier" in refused("nop", symbols={"1x": 1})
    assert "not an identifier" in refused("nop", symbols={_asm_source.PROBE + "x": 1})
    assert "64-bit" in refused("nop", symbols={"x": 1 << 64})
    with pytest.raises(TypeError):
        execmem.asm("nop", "x86_64", symbols=["x"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        execmem.asm("nop", "x86_64", symbols={"x": "1"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        execmem.asm("nop", "x86_64", symbols={"x": True})


def test_what_asm_does_not_check() -> None:
    """The README's limit: Keystone truncates an out-of-range immediate that is not a
    branch target, and asm() passes it on."""
    assert execmem.asm("mov al, 300", "x86_64") == b"\xb0\x2c"


def test_readme_states_the_limits_asm_enforces() -> None:
    readme = (paths.ROOT / "README.md").read_text()
    section = readme.split("### Assembling: `asm`", 1)[1].split("\n### ", 1)[0]
    x86, arm = execmem.arch.get("x86_64").asm, execmem.arch.get("arm64").asm
    assert x86 is not None and arm is not None
    for stated in (
        f"{_asm_source.MAX_SOURCE:,} characters",
        f"{_asm_source.MAX_LINE:,} per",
        f"{_asm_source.MAX_STATEMENTS:,} statements",
        f"{_asm_source.MAX_OUTPUT >> 20} MiB of output",
        f"most {_asm_source.MAX_OPERATORS} operator",
        f"up to {_asm_source.MAX_ALIGN} bytes",
        f"more than {execmem._asm.INPROCESS_STATEMENTS:,} statements",
        f"{x86.inprocess_output >> 20} MiB (x86-64)",
        f"{arm.inprocess_output >> 10} KiB (arm64)",
    ):
        assert stated in section, stated
    for directive in _asm_source.ACCEPTED.replace("/", " ").split():
        assert directive in section, directive


# -- arguments --------------------------------------------------------------------------------


def test_riscv64_has_no_keystone() -> None:
    with pytest.raises(UnsupportedError, match="Keystone"):
        execmem.asm("nop", "riscv64")


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        execmem.asm(b"nop", "x86_64")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        execmem.asm("nop", "x86_64", address="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        execmem.asm("nop", "x86_64", syntax=1)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedError):
        execmem.asm("nop", "pdp11")
    with pytest.raises(AssemblyError):
        execmem.asm("nop", "x86_64", address=-1)
    with pytest.raises(AssemblyError, match="aligned"):
        execmem.asm("nop", "arm64", address=2)


def test_every_keystone_user_reads_numbers_as_written_after_an_att_call() -> None:
    # Setting any Keystone option (syntax="att") makes Keystone read unprefixed numbers
    # as hex in every later handle of the process; the model's guest programs, the
    # host routines and herd's instructions must not change meaning.  A fresh
    # interpreter, so that nothing before has set one.
    code = (
        "import execmem\n"
        "from execmem import arch\n"
        "from execmem.emu._machine import assemble\n"
        "from execmem.litmus._herdasm import assemble_line\n"
        "from execmem.native import _routines\n"
        "spec = arch.get('x86_64')\n"
        "before = (assemble(arch.get('arm64'), 'movz x0, #10', 0)[0], assemble_line('AND W2,W1,#64'),"
        " _routines.assemble(spec))\n"
        "execmem.asm('movl $10, %eax', 'x86_64', syntax='att')\n"
        "after = (assemble(arch.get('arm64'), 'movz x0, #10', 0)[0], assemble_line('AND W2,W1,#64'),"
        " _routines.assemble(spec))\n"
        "assert before == after, (before, after)\n"
        "assert before[0] == bytes.fromhex('400180d2')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
