"""Inputs that crashed, stalled or fooled Keystone 0.9.2, given to ``execmem.asm`` in a
child process (a crash there fails the test instead of ending pytest).

Each answer must be correct bytes or an ``AssemblyError``, never a dead process or
one that stops answering, and its CPU time is reported by the child.  Hypothesis
then generates sources from statements, directives, blanks and comments and checks
the same, plus the bytes against known encodings."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import keystone
import paths
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from programs import HOLD_LOCKS, SLOWDOWN, const, needs_programs

import execmem
from execmem import _asm_engine
from execmem import arch as _arch
from execmem._asm_engine import Helper, KeystoneFailure

ROOT = paths.ROOT

#: The child: answers ``{"source", "arch", "syntax"?, "stack"?}`` lines with the
#: result of ``execmem.asm`` (run in a thread with a ``stack``-byte stack if given),
#: its CPU time and anything Keystone printed on stderr.
CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, tempfile, threading, time
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    import execmem, execmem._asm_engine
    # Emulated (QEMU, EXECMEM_TEST_SLOWDOWN=10): Keystone needs that much more CPU time.
    execmem._asm_engine.HELPER_CPU_SECONDS *= float(os.environ.get("EXECMEM_TEST_SLOWDOWN", "1"))
    execmem._asm_engine.HELPER_WALL_SECONDS *= float(os.environ.get("EXECMEM_TEST_SLOWDOWN", "1"))
    err = tempfile.TemporaryFile()
    os.dup2(err.fileno(), 2)
    for line in sys.stdin:
        request = json.loads(line)
        answer = {}
        def call():
            try:
                answer["ok"] = execmem.asm(request["source"], request["arch"], syntax=request.get("syntax")).hex()
            except execmem.ExecmemError as exc:
                answer["error"] = type(exc).__name__
                answer["message"] = str(exc)
            except BaseException as exc:
                answer["bug"] = repr(exc)
        start, at = time.process_time(), err.seek(0, 2)
        if request.get("stack"):
            threading.stack_size(request["stack"])
            t = threading.Thread(target=call)
            t.start()
            t.join()
        else:
            call()
        answer["cpu"] = time.process_time() - start
        err.seek(at)
        answer["stderr"] = err.read().decode("latin-1")[-500:]
        print(json.dumps(answer), flush=True)
    """
)


class Child:
    """The child process, restarted after it dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def asm(self, source: str, arch: str, timeout: float = 60 * SLOWDOWN, **extra: Any) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD], cwd=ROOT, text=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"source": source, "arch": arch, **extra}) + "\n")
        self.proc.stdin.flush()
        start = time.monotonic()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            return {"hung": True}
        line = self.proc.stdout.readline()
        if not line:
            status = self.proc.wait()
            self.proc = None
            return {"died": status}
        answer: dict[str, Any] = json.loads(line)
        answer["wall"] = time.monotonic() - start
        return answer


@pytest.fixture(scope="module")
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


def assert_sound(answer: dict[str, Any]) -> None:
    """Bytes or an AssemblyError, from a live child, within about a second of CPU."""
    assert "hung" not in answer and "died" not in answer and "bug" not in answer, answer
    assert "ok" in answer or answer["error"] == "AssemblyError", answer
    assert answer["cpu"] < 1.5 * SLOWDOWN, answer  # this process; the helper bounds its own CPU time
    assert "error:" not in answer["stderr"], answer  # no Keystone diagnostic path was taken


SPACES = " " * 100_000
ATTACKS: list[tuple[str, str, str, str]] = [
    # (name, arch, source, expected: hex bytes, or a regex the AssemblyError matches)
    ("100k spaces on a line segfaulted", "x86_64", "nop" + SPACES + "\nret", "per line"),
    ("100k tabs on a line segfaulted", "arm64", "nop\n" + "\t" * 100_000, "per line"),
    ("the same blanks over lines are fine", "x86_64", ("nop" + " " * 60_000 + "\n") * 2, "9090"),
    ("/* */ chains recursed per comment", "x86_64", "nop " + "/**/" * 10_000, "90"),
    ("CFI ended the process (Unfinished frame)", "x86_64", ".cfi_startproc\n.cfi_def_cfa_offset 16", "not accepted"),
    (".incbin read a file into the code", "x86_64", '.incbin "/etc/passwd"', "not accepted"),
    (".rept 100000000 ran 53 s in C", "x86_64", ".rept 100000000\nnop\n.endr", "literal integer"),
    ("huge .space segfaulted under RLIMIT_AS", "x86_64", ".space 0x7fffffff", "literal integer"),
    ("huge .zero", "arm64", ".zero 0x100000000", "literal integer"),
    ("huge .fill", "x86_64", ".fill 0x1000001, 4, 0", "more than asm"),
    ("a >2**64 literal looped forever", "x86_64", ".quad 0x10000000000000000", "below 2"),
    ("258 unary minus signs looped forever", "x86_64", ".byte " + "-" * 300 + "1", "operator and bracket"),
    ("3000 '+' overflowed a thread stack", "arm64", ".byte " + "+".join(["1"] * 3000), "operator and bracket"),
    ("'l ::' looped forever", "x86_64", "nop\nl ::", "cannot start with"),
    ("a prefix before junk looped forever", "x86_64", "rep [rax]", "followed by an instruction"),
    ("a mnemonic glued to punctuation looped", "x86_64", "rep*", "cannot be followed by"),
    ("'$' in a data expression looped forever", "x86_64", ".byte $ < x", "not accepted in a data"),
    ("'@' in an operand looped (fuzzing)", "arm64", "eax @?l:` call", "not accepted in an operand"),
    ("junk in braces looped forever", "x86_64", "nop 1{*", "braces"),
    ("punctuation starting a statement looped", "arm64", "nop\n[", "cannot start with"),
    ("an undefined subtracted name was taken as 0", "x86_64", "mov eax, l2 - l1\nl2:", "undefined symbol 'l1'"),
    ("naming an undefined symbol tried '$ = 0', which looped", "arm64", "b l1\nmovz x0, #1,$ lsl #16", "undefined symbol 'l1'"),
    ("x86 .word with a value out of range looped", "x86_64", ".word 0x123456, 78", "out of range"),
    ("arm64 .word dropped a value", "arm64", ".word 0x100000000 + 1, 1", "out of range"),
    ("-2**63 / -1 crashed the process (SIGFPE)", "x86_64", "mov rax, -0x8000000000000000 / -1", "division"),
    ("the same in data", "arm64", ".quad -0x8000000000000000 % 0xffffffffffffffff", "division"),
    ("arm64 .byte of a label looped forever", "arm64", "m: nop\n.byte m", "differences of labels"),
    ("movz fixups ended the process", "arm64", "movz x0, #:abs_g0:l\nl: ret", "relocation"),
    # Assembled in the helper process, where Keystone may end its own process:
    ("TBZ beyond 32 KiB ended the process", "arm64", "tbz x0, #1, l\n.space 0x8000\nl: ret", r"line 2: .*fixup value out of range"),
    ("a misaligned branch target ended it", "arm64", "b l\n.byte 1\nl: ret", r"line 2: .*not sufficiently aligned"),
    # (Located by assembling prefixes: the failure appears once "m:" moves away from "l".)
    ("a label offset in a load ended it", "arm64", "ldr x0, [x1, #(l - m)]\nm: nop\nl: ret", r"line 2: .*imm12.*included"),
    ("big but fine: helper", "arm64", ".rept 9000\nnop\n.endr\nret", "1f2003d5" * 9000 + "c0035fd6"),
    ("strings on arm64: helper", "arm64", "adr x0, s\nret\ns: .asciz \"hi\"", "40000010c0035fd668690000"[:22]),
]


@pytest.mark.parametrize(("name", "arch", "source", "expected"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack(child: Child, name: str, arch: str, source: str, expected: str) -> None:
    answer = child.asm(source, arch)
    assert_sound(answer)
    if "ok" in answer:
        assert answer["ok"] == expected, name
    else:
        assert re.search(expected, answer["message"]), answer["message"]


def test_big_sources_run_in_the_helper_and_stay_correct(child: Child) -> None:
    answer = child.asm(".rept 50000\nmov eax, 1\n.endr\n.fill 0x200000, 1, 0x90\nret", "x86_64")
    assert_sound(answer)
    code = bytes.fromhex(answer["ok"])
    assert code[:250_000] == bytes.fromhex("b801000000") * 50_000 and code[250_000:] == b"\x90" * 0x200000 + b"\xc3"


def test_deep_but_bounded_operands_in_a_small_thread_stack(child: Child) -> None:
    """64 nested parentheses (the operand limit) assemble on a 256 KiB thread stack;
    about 3,000 overflowed it."""
    answer = child.asm("mov x0, #" + "(" * 31 + "1" + ")" * 31, "arm64", stack=256 << 10)
    assert_sound(answer)
    assert answer["ok"] == "200080d2"


def test_later_calls_survive_keystone_diagnostics(child: Child) -> None:
    """A Keystone handle kept a stale line-number cache after printing a diagnostic,
    and the next diagnostic, in a later call, crashed the process; asm() opens a
    fresh handle for every call.  Each pair below crashed a reused handle."""
    for _ in range(10):
        answer = child.asm("rep movsb byte ptr [rax - 1], fs:[rax]\nl:\nadd qword ptr [l], 0x61, st(1)", "x86_64")
        assert_sound(answer)
        assert "line 3" in answer["message"]
        assert_sound(child.asm("mov eax, l2 - l1\n.quad l2 - l1", "x86_64"))
        answer = child.asm(".p2align 3, 0\nrep\nmovabs rax, 0x1122334455667788\n.byte 1, 2, 3\nl2: .quad l2 - l1\nl1:", "x86_64")
        assert_sound(answer)
        assert answer["ok"].startswith("f348b8")


#: Raw Keystone 0.9.2 on inputs the docs say it mishandles: (name, script body,
#: expected stdout or "SIGSEGV"/"exit 1: ..." for a dead process).
KEYSTONE = [
    ("drops an AT&T statement in Intel mode", "ks.asm('push rbp\\nmovq %rsp, %rbp\\npop rbp\\nret', 0, True)[0].hex()", "555dc3"),
    ("returns nothing for jmp dword", "ks.asm('jmp dword 0x100\\nret', 0, True)", "(None, 0)"),
    ("truncates an out-of-reach jmp", "ks.asm('jmp 0x100000000', 0, True)[0].hex()", "e9fbffffff"),
    ("takes an undefined subtracted name as 0", "ks.asm('.quad 5 - y', 0, True)[0].hex()", "0500000000000000"),
    (
        "reads numbers as hex once a syntax is set",
        "(setattr(ks, 'syntax', keystone.KS_OPT_SYNTAX_ATT), ks.asm('movl $10, %eax', 0, True)[0].hex())[1]",
        "b810000000",  # mov eax, 16
    ),
    ("so ignores .balign 16 (0x16 is no power of two)", "(setattr(ks, 'syntax', keystone.KS_OPT_SYNTAX_INTEL), ks.asm('nop\\n.balign 16\\nnop', 0, True)[0].hex())[1]", "9090"),
    ("crashes on 100,000 spaces", "ks.asm('nop' + ' ' * 100000, 0, True)", "SIGSEGV"),
    ("exits on CFI directives", "ks.asm('.cfi_startproc\\n.cfi_def_cfa_offset 16', 0, True)", "exit 1: LLVM ERROR: Unfinished frame!"),
    (
        "misplaces resolver values in PC-relative operands",
        "(setattr(ks, 'sym_resolver', resolve), ks.asm('call ext', 0x1000, True)[0].hex())[1]",
        "e80f000000",  # a call to 0x1014, not 0x1010 (e80b000000)
    ),
    (
        "makes a writable+executable page for a ctypes callback",
        "(resolve, any(' rwxp ' in line for line in open('/proc/self/maps')))[1]",
        "True",
    ),
]


@pytest.mark.parametrize(("name", "expression", "expected"), KEYSTONE, ids=[k[0] for k in KEYSTONE])
def test_keystone_0_9_2_misbehaves_as_documented(name: str, expression: str, expected: str) -> None:
    """Why asm() does what it does; if Keystone is upgraded, these say what changed."""
    script = textwrap.dedent(
        f"""
        import ctypes, keystone
        ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
        @keystone.keystone.KS_SYM_RESOLVER
        def resolve(name, value):
            value[0] = 0x1010
            return True
        print({expression})
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    if expected == "SIGSEGV":
        assert r.returncode == -11, r
    elif expected.startswith("exit 1: "):
        assert r.returncode == 1 and expected[len("exit 1: ") :] in r.stderr, r
    else:
        assert r.returncode == 0 and r.stdout.strip() == expected, r


# -- the helper process itself ---------------------------------------------------------------


def test_helper_contains_a_crash_and_bounds_cpu_time() -> None:
    spec = _arch.get("x86_64")
    assert spec.asm is not None
    syntax = spec.asm.syntaxes[0]
    with Helper() as helper:
        with pytest.raises(KeystoneFailure, match="Unfinished frame") as info:
            helper.assemble(spec, syntax, ".cfi_startproc\n.cfi_def_cfa_offset 16", 0)
        assert info.value.crashed
        start = time.monotonic()
        with pytest.raises(KeystoneFailure, match=r"more than 1 s of CPU"):
            helper.assemble(spec, syntax, ".byte " + "-" * 300 + "1", 0)  # loops forever in C
        assert time.monotonic() - start < 20
        assert helper.assemble(spec, syntax, "nop", 0) == b"\x90"  # a new helper after the crash
        with pytest.raises(KeystoneFailure) as refused:
            helper.assemble(spec, syntax, "bogus", 0)
        assert refused.value.errno == keystone.KS_ERR_ASM_MNEMONICFAIL and not refused.value.crashed


def test_a_helper_timeout_is_not_located(monkeypatch: pytest.MonkeyPatch) -> None:
    """Locating a failure by prefixes would give the helper log2(statements) more
    requests, each up to its CPU bound: after a timeout, asm() stops."""
    requests = []
    assemble = Helper.assemble

    def counted(self: Helper, *args: Any) -> bytes:
        requests.append(args)
        return assemble(self, *args)

    monkeypatch.setattr(Helper, "assemble", counted)
    monkeypatch.setattr(_asm_engine, "HELPER_CPU_SECONDS", 0.001)
    with pytest.raises(execmem.AssemblyError, match=r"more than 0.001 s of CPU time; the statement was not located"):
        execmem.asm(".rept 20000\nmov eax, 1\n.endr", "x86_64")  # > INPROCESS_STATEMENTS: the helper
    assert len(requests) == 1

def test_helper_survives_keystone_diagnostics_in_later_requests() -> None:
    """The helper opens a fresh handle per request too: with one kept per architecture,
    the second of these requests (texts as ``asm`` writes them, probe labels and
    offset table) crashed it, the stale line-number cache of
    ``test_later_calls_survive_keystone_diagnostics``."""
    spec = _arch.get("x86_64")
    assert spec.asm is not None
    syntax = spec.asm.syntaxes[0]
    movsb = "__execmem_0: rep movsb byte ptr [rax - 0x1], fs:[rax]\n__execmem_1: l:\n"
    with Helper() as helper:
        for _ in range(3):
            with pytest.raises(KeystoneFailure) as refused:  # a warning, then an error
                helper.assemble(
                    spec, syntax, movsb + "__execmem_2: add qword ptr [l], 0x61, st(0x1)\n__execmem_3:\n"
                    ".long __execmem_1 - __execmem_0, __execmem_2 - __execmem_0, __execmem_3 - __execmem_0", 0,
                )
            assert not refused.value.crashed, refused.value
            code = helper.assemble(spec, syntax, movsb + "__execmem_2:\n.long __execmem_1 - __execmem_0, __execmem_2 - __execmem_0", 0)
            assert code == bytes.fromhex("f364a4" "03000000" "03000000")  # a warning only

def test_fork_while_another_thread_holds_the_assembler_lock() -> None:
    """The child gets a fresh lock (``os.register_at_fork``), not one held forever: with
    the plain lock of before, the child's first ``asm`` waited forever."""
    script = textwrap.dedent(
        """
        import os, signal, threading, execmem, execmem._asm_engine as engine
        def in_child(source, expected):
            signal.alarm(20)  # a deadlock ends the child with SIGALRM
            ok = execmem.asm(source, "x86_64") == expected
            ok = ok and engine.decode_one(execmem.arch.get("x86_64"), b"\\x90", 0) == "nop"
            os._exit(0 if ok else 1)
        held, release = threading.Event(), threading.Event()
        def hold():
            with engine._lock:
                held.set()
                release.wait()
        t = threading.Thread(target=hold)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            in_child("nop", b"\\x90")
        release.set()
        t.join()
        assert os.waitpid(pid, 0)[1] == 0
        stop = []
        def loop():  # and forks while other threads keep assembling
            while not stop:
                execmem.asm("mov eax, 1\\nret", "x86_64")
        workers = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
        for w in workers:
            w.start()
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                in_child("ret", b"\\xc3")
            assert os.waitpid(pid, 0)[1] == 0
        stop.append(True)
        for w in workers:
            w.join()
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr[-2000:]


@needs_programs
def test_fork_while_other_threads_hold_every_lock_of_the_library() -> None:
    """Issue 10 item 4: the assembler's, the allocator's, the call gates' and the
    default allocator's locks, each held by another thread at the fork; the child
    assembles, decodes, calls an inherited function and gets a default allocator of
    its own."""
    script = HOLD_LOCKS + textwrap.dedent(
        f"""
        import ctypes, os, signal, threading, execmem, execmem._asm_engine as engine, execmem._default as default
        from execmem import _gates
        a = execmem.Allocator()
        t = a.jit_text_alloc(64); t.write(0, bytes.fromhex({const(7).hex()!r})); t.map()
        fn = t.function(ctypes.c_int)
        parent_default = execmem.default_allocator()
        locks = [engine._lock, a._lock, _gates.gate_pool().lock, _gates._pools_lock, default._default_lock]
        release, threads = hold_all(locks)  # every lock is held by another thread now
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a deadlocked child dies of SIGALRM
            ok = execmem.asm("ret", "x86_64") == b"\\xc3" and fn() == 7
            ok = ok and engine.decode_one(execmem.arch.get("x86_64"), b"\\x90", 0) == "nop"
            try:
                a.jit_text_alloc(16)
                ok = False
            except execmem.ForkedProcessError:
                pass
            ok = ok and execmem.default_allocator() is not parent_default
            execmem.jit_text_alloc(16).free()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        release.set()
        for th in threads: th.join(10)
        assert status == 0, f"child status {{status:#x}}"
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr[-2000:]


# -- generated sources ------------------------------------------------------------------------

#: Position-independent statements with their encodings (one per architecture), and
#: statements every one of which asm() must refuse.
GOOD = {
    "x86_64": [
        ("nop", "90"), ("ret", "c3"), ("mov eax, 1", "b801000000"), ("push rbp", "55"), ("xor eax, eax", "31c0"),
        ("add rax, rdi", "4801f8"), ("mov rax, [rbx + rcx*8 + 16]", "488b44cb10"), ("rep movsb", "f3a4"),
        ("lock add dword ptr [rax], 1", "f0830001"), ("movabs rax, 0x1122334455667788", "48b88877665544332211"),
        ("vaddps zmm0 {k1}, zmm1, zmm2", "62f1744958c2"), (".byte 1, 2", "0102"), (".quad 0x10", "1000000000000000"),
        ('.ascii "a;b"', "613b62"), (".fill 2, 2, 0x1234", "34123412"), ("mov al, 'a'", "b061"),
    ],
    "arm64": [
        ("nop", "1f2003d5"), ("ret", "c0035fd6"), ("mov x0, #1", "200080d2"), ("add x0, x0, x1", "0000018b"),
        ("ldr x0, [x1, #8]", "200440f9"), ("str x1, [sp, #-16]!", "e10f1ff8"), ("dsb ish", "9f3b03d5"),
        ("ld1 {v0.16b, v1.16b}, [x0]", "00a0404c"), ("movz x0, #1, lsl #16", "2000a0d2"), (".word 0x12345678", "78563412"),
        (".quad 1", "0100000000000000"), (".byte 1, 2, 3, 4", "01020304"),
    ],
}
BAD = [
    "bogus", "movq %rsp, %rbp", "jmp dword 0x100", ".section .x", '.error "e"', ".cfi_startproc", ".byte 300",
    "x = 5", ".set x, 1", '.incbin "/etc/passwd"', ".align 4", "(", "1:", "l ::", "rep*", ".quad 0x10000000000000000",
    "mov x0, #0x10000000000000000", "add x0,x0,#1 #2", "call printf", ".fill 100000000, 8", ".inst 0x1", "[", ".endr",
]
BLANKS = st.sampled_from(["", " ", "\t", "  \t ", " " * 2000, " /* c */ ", "/*\n*/"])


@st.composite
def sources(draw: st.DrawFn) -> tuple[str, str, str | None, list[int]]:
    """(arch, source, expected hex or None, lines of the bad statements)."""
    arch = draw(st.sampled_from(["x86_64", "arm64"]))
    lines: list[str] = []
    expected: list[str] = []
    bad_lines: list[int] = []
    line = 1
    for _ in range(draw(st.integers(1, 8))):
        text = ""
        for i in range(draw(st.integers(1, 3))):
            text += (";" if i else "") + draw(BLANKS)
            if draw(st.integers(0, 9)) == 0:
                text += draw(st.sampled_from(BAD))
                bad_lines.append(line + text.count("\n"))
            else:
                source, code = draw(st.sampled_from(GOOD[arch]))
                text += source
                expected.append(code)
            text += draw(BLANKS)
        comment = draw(st.sampled_from(["", " // c", " /* c */"] + ([" # c ; nop"] if arch == "x86_64" else [])))
        lines.append(text + comment)
        line += 1 + text.count("\n")
    return arch, "\n".join(lines), None if bad_lines else "".join(expected), bad_lines


@settings(parent=settings.get_profile("execmem"), max_examples=150)
@given(case=sources())
def test_generated_sources(child: Child, case: tuple[str, str, str | None, list[int]]) -> None:
    arch, source, expected, bad_lines = case
    answer = child.asm(source, arch)
    assert_sound(answer)
    if expected is not None:
        assert answer.get("ok") == expected, (source, answer)
    else:
        assert "error" in answer, (source, answer)
        line = int(answer["message"].split("line ", 1)[1].split(":", 1)[0])
        assert line in bad_lines, (source, answer["message"], bad_lines)


NOISE = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=127), max_size=60) | st.lists(
    st.sampled_from(["nop", "ret", "mov", "eax", "x0", ",", " ", "[", "]", "(", ")", "+", "-", "*", "#", "1",
                     "0x10", ":", ";", "\n", ".", ".byte", ".quad", ".rept", ".endr", '"', "'", "l", "l:", "jmp", "b",
                     "%", "$", "=", "!", "~", "<<", "/", "{", "}", "@", "\\", "lsl", "ptr", "lock", "rep", "{disp32}",
                     "//", "/*", "*/", "99999999999999999999", "tbz", "cbz", "adr", "ldr", "-", "`", "?", "&", "|", "^"]),
    max_size=30,
).map("".join)


@settings(parent=settings.get_profile("execmem"), max_examples=300)
@given(source=NOISE, arch=st.sampled_from(["x86_64", "arm64"]))
def test_generated_noise(child: Child, source: str, arch: str) -> None:
    assert_sound(child.asm(source, arch))


def test_child_cpu_time_is_reported() -> None:
    """The bound asserted above is meaningful: the child measures its own CPU time."""
    c = Child()
    try:
        answer = c.asm("nop", "x86_64")
        assert answer["ok"] == "90" and 0 <= answer["cpu"] < 1.5
    finally:
        c.close()
