"""Guest code and allocator set-up shared by the verification scenarios.

The writer is the machine's host CPU running the allocator core (the same code as
natively; its recipe steps become model actions).  Other CPUs run guest code that
reaches the JIT'd code the way a program would: through a published function
pointer (:data:`CALLER`).  A *mutation* is the same flow with one recipe step
removed or moved (``Recipe.without`` / ``Recipe.moved_before``, see :func:`mutated`)
or the quarantine disabled, built as data (``ArchSpec.with_recipes`` /
``without_quarantine``) and handed to the machine, whose allocator runs what its
spec says.
"""

from __future__ import annotations

from collections.abc import Callable

import execmem
from execmem import arch as _arch
from execmem.emu import Machine, MachineState
from execmem.verify._framework import first_fault

ANSWER = 42
#: A function returning ``value`` and the guest code that calls through a pointer.
FUNCTION = {
    "arm64": "movz x0, #{value}\nret",
    "x86_64": "mov eax, {value}\nret",
}
#: Loads the pointer at [x3]/[rbx]; if set, calls it; the result stays in x0/rax.
CALLER = {
    "arm64": "ldr x1, [x3]\ncbz x1, done\nblr x1\ndone:",
    "x86_64": "mov rsi, [rbx]\ntest rsi, rsi\njz done\ncall rsi\ndone:",
}
POINTER_REG = {"arm64": "x3", "x86_64": "rbx"}
CALLED_REG = {"arm64": "x1", "x86_64": "rsi"}
RESULT_REG = {"arm64": "x0", "x86_64": "rax"}


def allocator(m: Machine) -> execmem.Allocator:
    """An allocator on ``m`` with one-page packs of 64-byte chunks (few model steps)."""
    return execmem.Allocator(backend=m, pack_size=0x1000, granularity=64, keep_empty=1)


def text(a: execmem.Allocator, arch: str, value: int) -> execmem.JitText:
    """A text holding :data:`FUNCTION` returning ``value``, written, not yet mapped."""
    t = a.jit_text_alloc(16)
    t.write(0, execmem.asm(FUNCTION[arch].format(value=value), arch, t.address))
    return t


def caller_hazard(m: Machine, arch: str, cpus: tuple[int, ...], expected: int, *, writer: bool = False) -> Callable[[MachineState], str]:
    """A fault anywhere, or a caller (among ``cpus``; with ``writer``, CPU0's own call
    too) that called the function and got anything but ``expected``."""

    def hazard(st: MachineState) -> str:
        faulted = first_fault(st, range(m.ncpus), "executed trap filler or a torn instruction")
        if faulted:
            return faulted
        for c in cpus:
            if m.reg(st, c, CALLED_REG[arch]) and (m.reg(st, c, RESULT_REG[arch]) & 0xFFFF_FFFF) != expected:
                return f"CPU{c} ran stale code (got {m.reg(st, c, RESULT_REG[arch]) & 0xFFFF_FFFF:#x})"
        if writer and st.cpus[0].results and st.cpus[0].results[-1] & 0xFFFF_FFFF != expected:
            return f"the writer ran stale code (got {st.cpus[0].results[-1]:#x})"
        return ""

    return hazard


def mutated(arch: str, recipe: str, *, without: str = "", moved: tuple[str, str] | None = None) -> _arch.ArchSpec:
    """``arch``'s spec with one recipe mutated: steps removed (``a+b``) or one moved
    before another."""
    spec = _arch.get(arch)
    r = spec.recipe(recipe)
    if without:
        for name in without.split("+"):
            r = r.without(name)
    if moved:
        r = r.moved_before(*moved)
    return spec.with_recipes(**{recipe: r})


__all__ = [
    "ANSWER",
    "CALLED_REG",
    "CALLER",
    "FUNCTION",
    "POINTER_REG",
    "RESULT_REG",
    "allocator",
    "caller_hazard",
    "mutated",
    "text",
]
