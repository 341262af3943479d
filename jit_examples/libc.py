"""libc: JIT code that calls C library functions directly, placed near them.

    python -m execmem.examples.libc

``length2(a, b)`` returns ``strlen(a) + strlen(b)``, compiled twice:

* ``direct``: two ``call strlen`` (x86-64 ``call rel32``, arm64 ``BL``), which reach
  only +-2 GiB / +-128 MiB: the text is allocated with ``near=strlen`` so that they do
  (``compile_function(..., near=...)``);
* ``register``: the absolute address loaded into a register and called through it,
  which works from anywhere and costs an instruction or four more.

The function's address is looked up with ctypes and handed to the assembler by name
(``symbols={"strlen": address}``): the source says ``call strlen``, and ``asm`` refuses
it if the text ended up out of its reach.  Each result is checked against Python's
``len``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
from collections.abc import Sequence

import execmem

_DIRECT = {
    "x86_64": """
        push rbx
        push r12
        sub rsp, 8
        mov r12, rsi
        call strlen
        mov rbx, rax
        mov rdi, r12
        call strlen
        add rax, rbx
        add rsp, 8
        pop r12
        pop rbx
        ret""",
    "arm64": """
        stp x29, x30, [sp, #-32]!
        stp x19, x20, [sp, #16]
        mov x20, x1
        bl strlen
        mov x19, x0
        mov x0, x20
        bl strlen
        add x0, x0, x19
        ldp x19, x20, [sp, #16]
        ldp x29, x30, [sp], #32
        ret""",
}


def _register_call(arch: str, address: int) -> str:
    """A call through a register holding ``address`` (x86-64 movabs, arm64 movz/movk)."""
    if arch == "x86_64":
        return f"mov rax, {address}\ncall rax"
    parts = [f"movz x16, #{address & 0xFFFF}"]
    parts += [f"movk x16, #{address >> s & 0xFFFF}, lsl #{s}" for s in (16, 32, 48)]
    return "\n".join([*parts, "blr x16"])


def sources(arch: str, strlen: int) -> dict[str, str]:
    """The two versions of ``length2`` for ``arch``: ``direct`` calls ``strlen`` by name
    (resolved through ``symbols=``), ``register`` through its address in a register."""
    direct = _DIRECT[arch]
    register = direct.replace("call strlen" if arch == "x86_64" else "bl strlen", _register_call(arch, strlen))
    return {"direct": direct, "register": register}


def run(words: Sequence[bytes] = (b"", b"jit", b"execmem", b"x" * 1000)) -> dict[str, object]:
    """Compile both versions, call them on every pair of ``words``; the figures."""
    arch = execmem.arch.host().name
    if arch not in _DIRECT:
        raise execmem.UnsupportedError(f"the libc example has no {arch} version")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    strlen = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    assert strlen is not None
    out: dict[str, object] = {"strlen": strlen}
    with execmem.Allocator() as a:
        for kind, source in sources(arch, strlen).items():
            near = strlen if kind == "direct" else None
            f = a.compile_function(
                source,
                ctypes.c_size_t,
                (ctypes.c_char_p, ctypes.c_char_p),
                name=f"length2_{kind}",
                near=near,
                symbols={"strlen": strlen},
            )
            got = [f(x, y) for x in words for y in words]
            want = [len(x) + len(y) for x in words for y in words]
            if got != want:
                raise AssertionError(f"{kind}: {got} != {want}")
            out[kind] = {"address": f.text.address, "distance": f.text.address - strlen, "size": f.text.size, "calls": len(got)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(prog="execmem example libc", description=__doc__.splitlines()[0]).parse_args(argv)
    figures = run()
    strlen = figures["strlen"]
    print(f"strlen at {strlen:#x}")
    print(f"{'version':10} {'text':>18} {'from strlen':>14} {'bytes':>6} {'calls':>6}")
    for kind in ("direct", "register"):
        row = figures[kind]
        assert isinstance(row, dict)
        print(f"{kind:10} {row['address']:#18x} {row['distance']:+14,} {row['size']:6} {row['calls']:6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
