"""bf: a Brainfuck JIT for x86-64, with loops and I/O through callbacks.

    python -m execmem.examples.bf            # run the bundled programs, JIT vs interpreter
    python -m execmem.examples.bf prog.b     # run a file (input from stdin)

The compiled program is one function ``run(ctx)``.  Input and output go through
two callbacks, ``getc(ctx)`` and ``putc(ctx, byte)``, reached by indirect calls.
The callbacks are themselves machine code published with execmem (they read and
append to buffers in ``ctx``): Python callbacks made with ``ctypes.CFUNCTYPE``
would be libffi closures, which live in writable-and-executable pages.

Runs of ``+ - < >`` are folded, ``[-]`` becomes a store of zero; the tape has
30,000 cells of one byte that wrap around.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from collections.abc import Sequence

import execmem

TAPE = 30_000

PROGRAMS = {
    "hello": "++++++++[>++++[>++>+++>+++>+<<<<-]>+>+>->>+[<]<-]>>.>---.+++++++..+++.>>.<-.<.+++.------.--------.>>+.>++.",
    # reads its input and writes it back reversed
    "reverse": ">,[>,]<[.<]",
    # prints the printable ASCII characters from ' ' to '~'
    "ascii": "++++++++[>++++<-]>." + "+." * 94,
    # three nested loops of 100 iterations each: about 10^6 inner iterations that
    # copy a counter into two cells, then clear them
    "busy": "+" * 100 + "[>" + "+" * 100 + "[>" + "+" * 100 + "[->+>+<<]>[-]>[-]<<" + "<-]" + "<-]" + ">>>>+.",
}


class BFError(ValueError):
    """The program has unbalanced brackets."""


def parse(source: str) -> list[tuple[str, int]]:
    """Ops with run-length folding: ('+', n), ('>', n), ('[', 0), (']', 0), ('.', 0), (',', 0), ('0', 0)."""
    ops: list[tuple[str, int]] = []
    code = [c for c in source if c in "+-<>[].,"]
    depth = 0
    i = 0
    while i < len(code):
        c = code[i]
        if c in "+-<>":
            n = 0
            kind = "+" if c in "+-" else ">"
            while i < len(code) and code[i] in ("+-" if kind == "+" else "<>"):
                n += 1 if code[i] in "+>" else -1
                i += 1
            if n:
                ops.append((kind, n))
            continue
        if code[i : i + 3] == ["[", "-", "]"]:
            ops.append(("0", 0))
            i += 3
            continue
        depth += {"[": 1, "]": -1}.get(c, 0)
        if depth < 0:
            raise BFError("unbalanced ']'")
        ops.append((c, 0))
        i += 1
    if depth:
        raise BFError("unbalanced '['")
    return ops


def interpret(source: str, data: bytes = b"") -> bytes:
    """A plain Python interpreter of the same language (the baseline)."""
    ops = parse(source)
    jump = {}
    stack = []
    for k, (op, _) in enumerate(ops):
        if op == "[":
            stack.append(k)
        elif op == "]":
            j = stack.pop()
            jump[j], jump[k] = k, j
    tape = bytearray(TAPE)
    ptr = pc = inp = 0
    out = bytearray()
    while pc < len(ops):
        op, n = ops[pc]
        if op == "+":
            tape[ptr] = (tape[ptr] + n) & 0xFF
        elif op == ">":
            ptr = (ptr + n) % TAPE
        elif op == "0":
            tape[ptr] = 0
        elif op == ".":
            out.append(tape[ptr])
        elif op == ",":
            tape[ptr] = data[inp] if inp < len(data) else 0
            inp += 1
        elif (op == "[" and not tape[ptr]) or (op == "]" and tape[ptr]):
            pc = jump[pc]
        pc += 1
    return bytes(out)


class _Context(ctypes.Structure):
    """What the compiled code and the callbacks share (rdi at entry)."""

    _fields_ = [
        ("tape", ctypes.c_void_p),  # 0
        ("getc", ctypes.c_void_p),  # 8
        ("putc", ctypes.c_void_p),  # 16
        ("inbuf", ctypes.c_void_p),  # 24
        ("inlen", ctypes.c_uint64),  # 32
        ("inpos", ctypes.c_uint64),  # 40
        ("outbuf", ctypes.c_void_p),  # 48
        ("outcap", ctypes.c_uint64),  # 56
        ("outlen", ctypes.c_uint64),  # 64
    ]


# getc(ctx) -> byte (0 at end of input); putc(ctx, byte): append if there is room.
_GETC = """
    mov rax, [rdi + 40]
    cmp rax, [rdi + 32]
    jae eof
    mov rcx, [rdi + 24]
    movzx eax, byte ptr [rcx + rax]
    inc qword ptr [rdi + 40]
    ret
eof:
    xor eax, eax
    ret
"""
_PUTC = """
    mov rax, [rdi + 64]
    cmp rax, [rdi + 56]
    jae full
    mov rcx, [rdi + 48]
    mov byte ptr [rcx + rax], sil
    inc qword ptr [rdi + 64]
full:
    ret
"""


def compile_x86(ops: list[tuple[str, int]]) -> str:
    """rbx = tape base, r12 = cell index, r13 = ctx."""
    lines = ["push rbx", "push r12", "push r13", "mov r13, rdi", "mov rbx, [rdi]", "xor r12d, r12d"]
    stack: list[int] = []
    label = 0
    for op, n in ops:
        if op == "+":
            lines.append(f"add byte ptr [rbx + r12], {n & 0xFF}")
        elif op == ">":
            # wrap the index into [0, TAPE)
            lines += [f"add r12, {n % TAPE}", f"cmp r12, {TAPE}", f"jb ok{label}", f"sub r12, {TAPE}", f"ok{label}:"]
            label += 1
        elif op == "0":
            lines.append("mov byte ptr [rbx + r12], 0")
        elif op == ".":
            lines += ["mov rdi, r13", "movzx esi, byte ptr [rbx + r12]", "call qword ptr [r13 + 16]"]
        elif op == ",":
            lines += ["mov rdi, r13", "call qword ptr [r13 + 8]", "mov byte ptr [rbx + r12], al"]
        elif op == "[":
            stack.append(label)
            lines += [f"open{label}:", "cmp byte ptr [rbx + r12], 0", f"je close{label}"]
            label += 1
        elif op == "]":
            k = stack.pop()
            lines += ["cmp byte ptr [rbx + r12], 0", f"jne open{k}", f"close{k}:"]
    lines += ["pop r13", "pop r12", "pop rbx", "ret"]
    return "\n".join(lines)


class JIT:
    """Compiles Brainfuck programs; the I/O callbacks are published once."""

    def __init__(self, allocator: execmem.Allocator | None = None) -> None:
        if execmem.arch.host().name != "x86_64":
            raise execmem.UnsupportedError("the bf example generates x86-64 code")
        self.allocator = allocator or execmem.default_allocator()
        self._callbacks = []
        for name, src in (("bf_getc", _GETC), ("bf_putc", _PUTC)):
            size = len(execmem.asm(src, address=0))
            t = self.allocator.jit_text_alloc(size, name=name)
            t.write(0, execmem.asm(src, address=t.address))
            self._callbacks.append(t)
        self.allocator.publish(self._callbacks)

    def compile(self, source: str, name: str = "bf_program") -> Program:
        """``source`` as machine code; ``name`` is what profilers and debuggers show."""
        text_src = compile_x86(parse(source))
        size = len(execmem.asm(text_src, address=0))
        t = self.allocator.jit_text_alloc(size, name=name)
        try:
            t.write(0, execmem.asm(text_src, address=t.address))
            t.map()
        except BaseException:
            t.free()
            raise
        return Program(self, t, size)


class Program:
    def __init__(self, jit: JIT, text: execmem.JitText, size: int) -> None:
        self.jit, self.text, self.size = jit, text, size
        self._run = text.function(None, ctypes.POINTER(_Context))

    def free(self) -> None:
        """Gives the code back (after the quarantine epoch); the program cannot run again."""
        self.text.free()

    def __call__(self, data: bytes = b"", *, max_output: int = 1 << 16) -> bytes:
        tape = (ctypes.c_uint8 * TAPE)()
        inbuf = ctypes.create_string_buffer(data, len(data) or 1)
        outbuf = ctypes.create_string_buffer(max_output)
        getc, putc = self.jit._callbacks
        ctx = _Context(
            ctypes.addressof(tape), getc.address, putc.address, ctypes.addressof(inbuf), len(data), 0,
            ctypes.addressof(outbuf), max_output, 0,
        )
        self._run(ctypes.byref(ctx))
        return outbuf.raw[: ctx.outlen]


def _time(fn: object, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m execmem.examples.bf", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="a Brainfuck program (default: the bundled ones)")
    parser.add_argument("--input", default="hello, world", help="input for the bundled programs")
    args = parser.parse_args(argv)
    jit = JIT()
    if args.file:
        with open(args.file) as fh:
            program = jit.compile(fh.read(), name=f"bf_{os.path.basename(args.file)}")
        sys.stdout.buffer.write(program(sys.stdin.buffer.read()))
        return 0
    print(f"{'program':10} {'output':34} {'JIT':>10} {'interpreter':>12} {'speed-up':>9}")
    for name, source in PROGRAMS.items():
        data = args.input.encode()
        program = jit.compile(source, name=f"bf_{name}")
        out = program(data)
        expected = interpret(source, data)
        if out != expected:
            print(f"{name}: JIT and interpreter disagree", file=sys.stderr)
            return 1
        t_jit = _time(lambda program=program, data=data: program(data))
        t_py = _time(lambda source=source, data=data: interpret(source, data), repeats=1)
        shown = out.decode("latin-1").replace("\n", "\\n")
        shown = shown if len(shown) <= 32 else shown[:29] + "..."
        print(f"{name:10} {shown!r:34} {t_jit * 1e3:8.2f}ms {t_py * 1e3:10.1f}ms {t_py / t_jit:8.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
