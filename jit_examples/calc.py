"""calc: compile integer arithmetic expressions to machine code.

    python -m execmem.examples.calc "a*b + 3*(c - a)" a=2 b=5 c=7
    python -m execmem.examples.calc --arch arm64 "x*x - 1" x=12

Expressions use + - * & | ^ << >> and unary minus over 64-bit integers (two's
complement wrap-around, like C; ``>>`` is arithmetic) and variables a..z.  The
compiled function takes a pointer to 26 int64 values (one per letter) and returns
an int64.  On the host architecture it runs natively through execmem; for arm64 on
an x86 host it runs on the modeled machine (``execmem.emu.Machine``), published by
the same allocator.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import execmem

VARIABLES = string.ascii_lowercase
MASK = (1 << 64) - 1


class CalcError(ValueError):
    """The expression uses something calc does not compile."""


@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Neg:
    operand: Expr


@dataclass(frozen=True)
class Bin:
    op: str
    left: Expr
    right: Expr


Expr = Num | Var | Neg | Bin
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}


def parse(text: str) -> Expr:
    """Parse with Python's own grammar, keeping only what calc supports."""
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as exc:
        raise CalcError(f"syntax error: {exc.msg}") from None

    def build(node: ast.AST) -> Expr:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return Num(node.value & MASK)
        if isinstance(node, ast.Name) and node.id in VARIABLES:
            return Var(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return Neg(build(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return Bin(_OPS[type(node.op)], build(node.left), build(node.right))
        raise CalcError(f"unsupported: {ast.dump(node)[:60]}")

    return build(tree)


def signed(value: int) -> int:
    value &= MASK
    return value - (1 << 64) if value >> 63 else value


def evaluate(expr: Expr, env: dict[str, int]) -> int:
    """Reference semantics in Python (64-bit wrap-around)."""
    if isinstance(expr, Num):
        return signed(expr.value)
    if isinstance(expr, Var):
        return signed(env.get(expr.name, 0))
    if isinstance(expr, Neg):
        return signed(-evaluate(expr.operand, env))
    a, b = evaluate(expr.left, env), evaluate(expr.right, env)
    if expr.op in ("<<", ">>"):
        b &= 63  # the hardware uses the low 6 bits of the count
        return signed(a << b) if expr.op == "<<" else a >> b
    return signed({"+": a + b, "-": a - b, "*": a * b, "&": a & b, "|": a | b, "^": a ^ b}[expr.op])


# --------------------------------------------------------------- code generation
class _X86:
    """Stack-machine code: the value of every subexpression ends in rax."""

    def gen(self, e: Expr) -> list[str]:
        if isinstance(e, Num):
            return [f"movabs rax, {e.value:#x}"]
        if isinstance(e, Var):
            return [f"mov rax, qword ptr [rdi + {8 * VARIABLES.index(e.name)}]"]
        if isinstance(e, Neg):
            return [*self.gen(e.operand), "neg rax"]
        out = [*self.gen(e.right), "push rax", *self.gen(e.left), "pop rcx"]
        out += {
            "+": ["add rax, rcx"], "-": ["sub rax, rcx"], "*": ["imul rax, rcx"], "&": ["and rax, rcx"],
            "|": ["or rax, rcx"], "^": ["xor rax, rcx"], "<<": ["shl rax, cl"], ">>": ["sar rax, cl"],
        }[e.op]
        return out

    def function(self, e: Expr) -> str:
        return "\n".join([*self.gen(e), "ret"])


class _Arm64:
    """Stack-machine code: the value ends in x0, the variables' base is in x9."""

    def gen(self, e: Expr) -> list[str]:
        if isinstance(e, Num):
            v = e.value
            out = [f"movz x0, #{v & 0xFFFF}"]
            out += [f"movk x0, #{(v >> s) & 0xFFFF}, lsl #{s}" for s in (16, 32, 48) if (v >> s) & 0xFFFF]
            return out
        if isinstance(e, Var):
            return [f"ldr x0, [x9, #{8 * VARIABLES.index(e.name)}]"]
        if isinstance(e, Neg):
            return [*self.gen(e.operand), "neg x0, x0"]
        out = [*self.gen(e.right), "str x0, [sp, #-16]!", *self.gen(e.left), "ldr x1, [sp], #16"]
        out += {
            "+": ["add x0, x0, x1"], "-": ["sub x0, x0, x1"], "*": ["mul x0, x0, x1"], "&": ["and x0, x0, x1"],
            "|": ["orr x0, x0, x1"], "^": ["eor x0, x0, x1"], "<<": ["lsl x0, x0, x1"], ">>": ["asr x0, x0, x1"],
        }[e.op]
        return out

    def function(self, e: Expr) -> str:
        return "\n".join(["mov x9, x0", *self.gen(e), "ret"])


_GENERATORS: dict[str, _X86 | _Arm64] = {"x86_64": _X86(), "arm64": _Arm64()}


def compile_source(expr: Expr, arch: str) -> str:
    try:
        return _GENERATORS[arch].function(expr)
    except KeyError:
        raise execmem.UnsupportedError(f"calc generates x86_64 and arm64 code, not {arch}") from None


class Compiler:
    """Compiles expressions into functions published by one execmem allocator.

    ``arch`` defaults to the host; any other architecture runs on a modeled machine.
    Functions compiled inside ``with compiler.batch():`` are published with one
    synchronization.
    """

    def __init__(self, arch: str | None = None) -> None:
        host = execmem.arch.host().name
        self.arch = execmem.arch.get(arch).name if arch else host
        self.machine = None
        if self.arch == host:
            self.allocator = execmem.Allocator()
        else:
            from execmem.emu import Machine

            self.machine = Machine(self.arch, cpus=1)
            self.allocator = execmem.Allocator(backend=self.machine, pack_size=0x4000)
            self.env_address = self.machine.alloc(8 * len(VARIABLES))

    def compile(self, text_or_expr: str | Expr) -> CompiledExpression:
        expr = parse(text_or_expr) if isinstance(text_or_expr, str) else text_or_expr
        source = compile_source(expr, self.arch)
        # The code is position-independent: assemble once to learn its size, then
        # again for the address the allocator hands out.
        size = len(execmem.asm(source, self.arch, 0))
        t = self.allocator.jit_text_alloc(size)
        try:
            code = execmem.asm(source, self.arch, t.address)
            t.write(0, code)
            t.map()
        except BaseException:
            t.free()
            raise
        return CompiledExpression(self, expr, t, len(code))

    def close(self) -> None:
        self.allocator.close()

    def __enter__(self) -> Compiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CompiledExpression:
    def __init__(self, compiler: Compiler, expr: Expr, text: execmem.JitText, code_size: int) -> None:
        self.compiler, self.expr, self.text, self.code_size = compiler, expr, text, code_size
        if compiler.machine is None:
            self._fn = text.function(ctypes.c_int64, ctypes.POINTER(ctypes.c_int64))

    def __call__(self, **env: int) -> int:
        values = [signed(env.get(v, 0)) for v in VARIABLES]
        machine = self.compiler.machine
        if machine is None:
            array = (ctypes.c_int64 * len(VARIABLES))(*values)
            return int(self._fn(array))
        machine.poke(self.compiler.env_address, b"".join((v & MASK).to_bytes(8, "little") for v in values))
        return signed(machine.call(self.text.address, self.compiler.env_address))

    def free(self) -> None:
        self.text.free()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m execmem.examples.calc", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="target architecture (default: host; others run on the modeled machine)")
    parser.add_argument("--show", action="store_true", help="print the generated assembly")
    parser.add_argument("expression")
    parser.add_argument("bindings", nargs="*", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    env = {}
    for binding in args.bindings:
        name, _, value = binding.partition("=")
        if name not in VARIABLES or not value.lstrip("-").isdigit():
            parser.error(f"bad binding {binding!r} (use e.g. a=3)")
        env[name] = int(value)
    try:
        expr = parse(args.expression)
    except CalcError as exc:
        parser.error(str(exc))
    with Compiler(args.arch) as compiler:
        if args.show:
            print(compile_source(expr, compiler.arch))
        fn = compiler.compile(expr)
        result = fn(**env)
        where = "natively" if compiler.machine is None else "on the modeled machine"
        print(f"{args.expression} = {result}   ({compiler.arch}, {fn.code_size} bytes of code at {fn.text.address:#x}, run {where})")
        expected = evaluate(expr, env)
        if result != expected:
            print(f"MISMATCH: Python says {expected}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
