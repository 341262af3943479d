"""``execmem demo``: the public API end to end on this host, in well under a second.

Assembles a few functions with ``execmem.asm`` (``add``, a loop computing ``fib``,
``add_plus_one`` which calls ``add`` by its absolute address, and ``answer``),
publishes them in one batch, calls them through ``JitText.function``, live-patches
``answer`` with ``JitText.update`` while another thread keeps calling it, frees
``fib``, and prints what the allocator and the native backend report in
``Allocator.stats()`` - nothing printed is assumed, everything is read back.
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import execmem
from execmem._errors import UnsupportedError
from execmem.arch import ArchSpec, host

#: Placeholder for absolute addresses while sizing the code (large: full-width encodings).
PLACEHOLDER = 0x7F00_1234_5000


@dataclass(frozen=True)
class Program:
    """The demo's functions for one architecture (host C calling convention).

    ``{add}`` (or ``{add_0}``..``{add_3}``, its 16-bit pieces) is ``add``'s address.
    ``patch`` replaces one whole instruction of ``answer`` at ``patch_offset`` by
    ``patch`` - inside one aligned word and allowed while other threads execute it -
    changing the result from ``before`` to ``after``.
    """

    sources: dict[str, str]
    patch_offset: int
    patch: str
    before: int
    after: int


PROGRAMS: dict[str, Program] = {
    "x86_64": Program(
        sources={
            "add": "lea rax, [rdi + rsi]; ret",
            "fib": "xor eax, eax; mov ecx, 1; test rdi, rdi; jz done; again: lea rdx, [rax + rcx]; "
            "mov rax, rcx; mov rcx, rdx; dec rdi; jnz again; done: ret",
            # movabs: 10 bytes whatever the address; push rbp keeps the stack 16-byte
            # aligned at the inner call (System V).
            "add_plus_one": "movabs rax, {add}; push rbp; call rax; pop rbp; add rax, 1; ret",
            "answer": "mov eax, 7; ret",
        },
        # The 5-byte mov (b8 imm32) lies in the first aligned 8-byte word: one atomic store.
        patch_offset=0,
        patch="mov eax, 42",
        before=7,
        after=42,
    ),
    "arm64": Program(
        sources={
            "add": "add x0, x0, x1; ret",
            "fib": "mov x1, #0; mov x2, #1; cbz x0, done; again: add x3, x1, x2; mov x1, x2; mov x2, x3; "
            "subs x0, x0, #1; b.ne again; done: mov x0, x1; ret",
            "add_plus_one": "stp x29, x30, [sp, #-16]!; movz x16, #{add_0}; movk x16, #{add_1}, lsl #16; "
            "movk x16, #{add_2}, lsl #32; movk x16, #{add_3}, lsl #48; blr x16; "
            "ldp x29, x30, [sp], #16; add x0, x0, #1; ret",
            "answer": "b seven; mov x0, #42; ret; seven: mov x0, #7; ret",
        },
        # B -> NOP: both may be modified while other CPUs execute them (Arm ARM B2.2.5).
        patch_offset=0,
        patch="nop",
        before=7,
        after=42,
    ),
}

#: (function, arguments) called after publishing, in this order.
CALLS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("add", (2, 40)),
    ("fib", (50,)),
    ("add_plus_one", (20, 21)),
    ("answer", ()),
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("dual", "mprotect", "rwx"),
        default="dual",
        help="native mapping mode (default: dual mapping; rwx only for comparison)",
    )
    parser.add_argument("--no-huge-pages", action="store_true", help="do not ask for large pages")


def fill(source: str, addresses: dict[str, int]) -> str:
    """``source`` with ``{name}`` and ``{name_0}``..``{name_3}`` replaced by addresses."""
    values: dict[str, str] = {}
    for name, address in addresses.items():
        values[name] = hex(address)
        for i in range(4):
            values[f"{name}_{i}"] = hex(address >> (16 * i) & 0xFFFF)
    return source.format(**values)


def program_for(spec: ArchSpec) -> Program:
    program = PROGRAMS.get(spec.name)
    if program is None:
        raise UnsupportedError(f"the demo has no program for {spec.name} (it has {', '.join(PROGRAMS)})")
    return program


def _live_update(text: execmem.JitText, program: Program, spec: ArchSpec) -> tuple[str, Counter[int]]:
    """Patch ``answer`` while another thread keeps calling it; what that thread saw."""
    new = execmem.asm(program.patch, arch=spec.name, address=text.address + program.patch_offset)
    call = text.function(ctypes.c_int64)
    seen: Counter[int] = Counter()
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            seen[call()] += 1

    worker = threading.Thread(target=caller, name="demo-caller", daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 1.0
        while not seen and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            text.update(program.patch_offset, new)
        except execmem.UnsafePatchError as exc:
            return f"refused: {str(exc).split(';')[0]}", seen
        deadline = time.monotonic() + 1.0
        while not seen[program.after] and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        stop.set()
        worker.join()
    return f"{call()}  ({len(new)}-byte instruction replaced by one atomic store)", seen


def run(args: argparse.Namespace) -> int:
    from execmem.native import NativeBackend, _procmaps

    started = time.perf_counter()
    spec = host()
    program = program_for(spec)
    names = list(program.sources)
    placeholders = dict.fromkeys(names, PLACEHOLDER)
    with NativeBackend(args.mode, huge_pages=not args.no_huge_pages) as backend, execmem.Allocator(backend=backend) as alloc:
        # Addresses are fixed at allocation: size each text, then assemble it in place.
        sizes = {n: len(execmem.asm(fill(src, placeholders), address=PLACEHOLDER)) for n, src in program.sources.items()}
        texts = {n: alloc.jit_text_alloc(sizes[n]) for n in names}
        addresses = {n: t.address for n, t in texts.items()}
        for name, text in texts.items():
            code = execmem.asm(fill(program.sources[name], addresses), address=text.address)
            if len(code) != text.size:
                raise UnsupportedError(f"{name}: the code changed size once placed ({len(code)} != {text.size})")
            text.write(0, code)
        execmem.publish(texts.values())  # one batch: one synchronization for all

        results: list[tuple[str, str]] = []
        for name, arguments in CALLS:
            fn = texts[name].function(ctypes.c_int64, *(ctypes.c_int64,) * len(arguments))
            results.append((f"{name}({', '.join(map(str, arguments))})", str(fn(*arguments))))
        outcome, seen = _live_update(texts["answer"], program, spec)
        results.append(("answer() after live update", outcome))
        if seen:
            shown = ", ".join(f"{value} x{count}" for value, count in sorted(seen.items()))
            others = set(seen) - {program.before, program.after}
            verdict = "never anything else" if not others else f"UNEXPECTED {sorted(others)}"
            results.append(("answer() in another thread", f"{shown}  ({verdict})"))

        fib = texts["fib"]
        address, size = fib.address, fib.size
        fib.free()
        freed = ctypes.string_at(address, size)
        traps = spec.trap_bytes(size)
        if freed == traps:
            state = "all traps"
        elif fib._pack.chunks.dirty:  # the refill comes with the next epoch (execmem._packs)
            state = "refilled with traps at the next epoch"
        else:
            state = "NOT TRAPS"
        results.append(("fib after free", f"{freed[:6].hex(' ')} ... ({state})"))
        try:
            fib.function(ctypes.c_int64, ctypes.c_int64)
        except execmem.UseAfterFreeError as exc:
            results.append(("fib.function() after free", f"{type(exc).__name__}: {exc}"))

        stats = alloc.stats()
        pack = cast(list[dict[str, Any]], stats["packs"])[0]
        image = ctypes.string_at(pack["address"], pack["size"])
        wx = _procmaps.wx_violations(backend.owned_ranges())
        elapsed = time.perf_counter() - started
        _print(stats, spec, image, wx, results, elapsed)
    return 0


def _runs(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counter.items()) or "none"


def _print(
    stats: Mapping[str, object],
    spec: ArchSpec,
    image: bytes,
    wx: list[Any],
    results: list[tuple[str, str]],
    elapsed: float,
) -> None:
    s = cast(dict[str, Any], stats)
    b = cast(dict[str, Any], s["backend"])
    backing = b["backing_detail"]
    huge, sync = b["huge_pages"], b["sync"]
    pack = s["packs"][0]
    backing_text = str(backing["kind"])
    if backing.get("memfd_exec_flag") is not None:
        backing_text += " (MFD_EXEC)" if backing["memfd_exec_flag"] else " (without MFD_EXEC)"
    if backing.get("notes"):
        backing_text += "; " + "; ".join(backing["notes"])
    obtained = huge.get("obtained_bytes")
    huge_text = (
        f"{obtained >> 10} KiB of {huge['executable_bytes'] >> 10} KiB executable (from /proc/self/smaps)"
        if obtained is not None
        else f"unknown ({huge.get('error')})"
    )
    if "hugetlb" in huge:
        huge_text += f"; hugetlb: {huge['hugetlb']}"
    runs = cast(dict[str, int], sync.get("remote_cse_runs", {}))
    mechanism = sync.get("remote_cse") or "none selected (never needed)"
    remote = f"{mechanism}: ran {sum(runs.values())} time(s)"
    trap = spec.trap_fill
    trap_bytes = image.count(trap) * len(trap)
    texts = cast(dict[str, int], s["texts"])
    rows = [
        ("architecture", s["arch"]),
        ("mode", b["mode"]),
        ("backing", backing_text),
        ("pack", f"{pack['address']:#x}, {pack['size'] >> 10} of {cast(int, pack['capacity']) >> 10} KiB, "
         f"{'mapped' if pack['mapped'] else 'not mapped'}: "
         f"live {pack['live_bytes']} B, quarantined {pack['quarantined_bytes']} B"),
        ("texts", ", ".join(f"{k} {v}" for k, v in texts.items() if v)),
        ("trap fill", f"{trap.hex(' ')}: {trap_bytes} of the pack's {len(image)} bytes are traps"),
        ("W^X", "no mapping is writable and executable" if not wx else f"{len(wx)} RWX mapping(s) (rwx mode)"),
        ("huge pages", huge_text),
        ("local_cse", sync.get("how", {}).get("local_cse", "-")),
        ("remote_cse", remote),
        ("recipes", _runs(cast(dict[str, int], s["recipes"]))),
        ("steps", _runs(cast(dict[str, int], s["steps"]))),
        ("epochs", f"started {s['epochs']['started']}, completed {s['epochs']['completed']}"),
        ("system calls", f"{b['syscalls_total']}: {_runs(dict(sorted(b['syscalls'].items())))}"),
    ]
    width = max(len(k) for k, _ in rows + results)
    print(f"execmem demo: the public API on this host ({len(results)} results)")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("results")
    for key, value in results:
        print(f"  {key:<{width}}  {value}")
    print(f"  {'time':<{width}}  {elapsed * 1000:.1f} ms")


__all__ = ["CALLS", "PROGRAMS", "Program", "configure", "fill", "program_for", "run"]
