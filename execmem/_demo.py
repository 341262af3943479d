"""``execmem demo``: assemble, publish, call, live-patch and free a few functions on
this host, and show what the native backend obtained and did.

Until the allocator core lands this drives the native backend directly, running the
architecture's recipes step by step exactly as the core does (``publish_fresh`` for
the batch, ``patch`` for the live update).
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from execmem._errors import UnsupportedError
from execmem.arch import ArchSpec, Recipe, host

#: Demo programs per architecture (C calling convention of the host).  ``{add}`` and
#: ``{hook}`` are replaced by absolute addresses; ``patch_site`` is the offset of the
#: instruction of ``probe`` that is replaced live by ``patch_new`` (both allowed to be
#: modified while other threads execute them: a 5-byte NOP by a CALL on x86-64, a NOP
#: by a BL on arm64), inside one aligned word.
PROGRAMS: dict[str, dict[str, str]] = {
    "x86_64": {
        "add": "lea rax, [rdi + rsi]; ret",
        "fib": "xor eax, eax; mov ecx, 1; test rdi, rdi; jz done; again: lea rdx, [rax + rcx]; "
        "mov rax, rcx; mov rcx, rdx; dec rdi; jnz again; done: ret",
        "add_plus_one": "mov rax, {add}; push rbp; call rax; pop rbp; add rax, 1; ret",
        "hook": "add rax, 1000; ret",
        # mov rax, rdi; nop5 (Keystone 0.9.2 mis-assembles the long NOP, hence .byte); ret
        "probe": "mov rax, rdi; .byte 0x0f, 0x1f, 0x44, 0x00, 0x00; ret",
        "patch_site": "3",
        "patch_new": "call {hook}",
    },
    "arm64": {
        "add": "add x0, x0, x1; ret",
        "fib": "mov x1, #0; mov x2, #1; cbz x0, done; again: add x3, x1, x2; mov x1, x2; mov x2, x3; "
        "subs x0, x0, #1; b.ne again; done: mov x0, x1; ret",
        "add_plus_one": "stp x29, x30, [sp, #-16]!; movz x16, #{add_0}; movk x16, #{add_1}, lsl #16; "
        "movk x16, #{add_2}, lsl #32; movk x16, #{add_3}, lsl #48; blr x16; "
        "ldp x29, x30, [sp], #16; add x0, x0, #1; ret",
        "hook": "add x0, x0, #1000; ret",
        "probe": "stp x29, x30, [sp, #-16]!; nop; ldp x29, x30, [sp], #16; ret",
        "patch_site": "4",
        "patch_new": "bl {hook}",
    },
}

SIGNATURES: dict[str, tuple[int, str]] = {  # arity, how the call is shown
    "add": (2, "add(2, 40)"),
    "fib": (1, "fib(50)"),
    "add_plus_one": (2, "add_plus_one(20, 21)"),
    "probe": (1, "probe(5)"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("dual", "mprotect", "rwx"),
        default="dual",
        help="native mapping mode (default: dual mapping; rwx only for comparison)",
    )
    parser.add_argument("--no-huge-pages", action="store_true", help="do not ask for large pages")


def _assembler(spec: ArchSpec) -> Callable[[str, int], bytes]:
    if spec.engines.keystone is None:
        raise UnsupportedError(f"the demo needs an assembler for {spec.name}; Keystone has none")
    import keystone

    ks = keystone.Ks(*spec.engines.keystone)

    def assemble(source: str, address: int) -> bytes:
        encoding, _ = ks.asm(source, address)
        return bytes(encoding or b"")

    return assemble


@dataclass
class _Text:
    name: str
    offset: int
    code: bytes


def _fill(source: str, addresses: dict[str, int]) -> str:
    values: dict[str, object] = {}
    for name, address in addresses.items():
        values[name] = hex(address)
        for i in range(4):
            values[f"{name}_{i}"] = hex(address >> (16 * i) & 0xFFFF)
    return source.format(**values)


def _run_recipe(backend: object, recipe: Recipe, ranges: list[tuple[int, int]], actions: dict[str, Callable[[], None]]) -> None:
    """Each step: its own verb when it has one (write, map, atomic_store), else run_step."""
    features = backend.cache_features  # type: ignore[attr-defined]
    for step in recipe.effective(features):
        if step.name in actions:
            actions[step.name]()
        else:
            backend.run_step(step.name, ranges)  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> int:
    from execmem.native import NativeBackend, _procmaps

    started = time.perf_counter()
    spec = host()
    program = PROGRAMS.get(spec.name)
    if program is None:
        raise UnsupportedError(f"no demo program for {spec.name}")
    assemble = _assembler(spec)
    with NativeBackend(args.mode, huge_pages=not args.no_huge_pages) as backend:
        pack = backend.reserve(2 << 20, 16)
        base = pack.address
        # Lay the texts out 64-byte aligned (the allocator's default granularity).
        texts: dict[str, _Text] = {}
        offset = 0
        addresses: dict[str, int] = {}
        for name in ("add", "hook", "fib", "add_plus_one", "probe"):
            addresses[name] = base + offset
            code = assemble(_fill(program[name], addresses), base + offset)
            texts[name] = _Text(name, offset, code)
            offset += -(-len(code) // 64) * 64
        ranges = [(base + t.offset, len(t.code)) for t in texts.values()]

        def write_all() -> None:
            for t in texts.values():
                backend.write(pack, t.offset, t.code)

        # One batch: every text written, then the whole pack made executable once.
        _run_recipe(backend, spec.publish_fresh, ranges, {"write": write_all, "map": lambda: backend.map(pack)})

        proto = {1: ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64), 2: ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)}
        arguments = {"add": (2, 40), "fib": (50,), "add_plus_one": (20, 21), "probe": (5,)}
        results: list[tuple[str, str]] = []
        for name, (arity, shown) in SIGNATURES.items():
            fn = proto[arity](base + texts[name].offset)
            results.append((shown, str(fn(*arguments[name]))))

        # Live update of probe: one aligned word, one atomic store, then the patch recipe.
        probe = texts["probe"]
        site = probe.offset + int(program["patch_site"])
        new = assemble(_fill(program["patch_new"], addresses), base + site)
        word = spec.patch_rule.word
        word_at = site - site % word
        current = bytearray(ctypes.string_at(base + word_at, word))
        current[site - word_at : site - word_at + len(new)] = new
        _run_recipe(
            backend,
            spec.patch,
            [(base + word_at, word)],
            {"atomic_store": lambda: backend.atomic_store(pack, word_at, bytes(current))},
        )
        after = proto[1](base + probe.offset)(5)
        results.append(("probe(5) after live patch", f"{after}  (nop -> call hook, one {word}-byte atomic store)"))

        # Free fib: trap-refill through the writable side, then synchronize the batch.
        fib_text = texts["fib"]
        traps = spec.trap_bytes(len(fib_text.code))
        _run_recipe(
            backend,
            spec.publish,
            [(base + fib_text.offset, len(traps))],
            {"write": lambda: backend.write(pack, fib_text.offset, traps)},
        )
        freed = ctypes.string_at(base + fib_text.offset, len(traps))
        results.append(("fib after free", f"{freed[:8].hex(' ')} ... ({'all traps' if freed == traps else 'NOT TRAPS'})"))

        image = ctypes.string_at(base, pack.size)
        used = sum(len(t.code) for t in texts.values() if t is not fib_text)
        unused_traps = image.count(spec.trap_fill) * len(spec.trap_fill)
        wx = _procmaps.wx_violations(backend.owned_ranges())
        stats = backend.stats()
        elapsed = time.perf_counter() - started
        _print(spec, stats, base, pack.size, len(texts), used, unused_traps, wx, results, elapsed)
    return 0


def _print(
    spec: ArchSpec,
    stats: object,
    base: int,
    size: int,
    count: int,
    used: int,
    unused_traps: int,
    wx: Sequence[object],
    results: list[tuple[str, str]],
    elapsed: float,
) -> None:
    s = dict(stats)  # type: ignore[call-overload]
    backing = s["backing_detail"]
    huge = s["huge_pages"]
    sync = s["sync"]
    steps = ", ".join(f"{k} x{v}" for k, v in s["steps"].items())
    runs = ", ".join(f"{k} x{v}" for k, v in sync.get("remote_cse_runs", {}).items()) or "never ran"
    syscalls = ", ".join(f"{k} {v}" for k, v in sorted(s["syscalls"].items()))
    backing_text = str(backing["kind"])
    if backing.get("memfd_exec_flag") is not None:
        backing_text += " (MFD_EXEC)" if backing["memfd_exec_flag"] else " (without MFD_EXEC)"
    if backing.get("notes"):
        backing_text += "; " + "; ".join(backing["notes"])
    huge_text = f"{huge['obtained_bytes'] >> 10} KiB of {huge['executable_bytes'] >> 10} KiB executable (from /proc/self/smaps)"
    if "hugetlb" in huge:
        huge_text += f"; hugetlb: {huge['hugetlb']}"
    rows = [
        ("architecture", spec.name),
        ("mode", s["mode"]),
        ("backing", backing_text),
        ("pack", f"{base:#x}, {size >> 10} KiB: {count} texts published in one batch, 1 freed ({used} bytes of live code)"),
        ("trap fill", f"{spec.trap_fill.hex(' ')}: {unused_traps} bytes of the pack are traps"),
        ("W^X", "no mapping is writable and executable" if not wx else f"{len(wx)} RWX mapping(s) (rwx mode)"),
        ("huge pages", huge_text),
        ("local_cse", sync.get("how", {}).get("local_cse", "-")),
        ("remote_cse", f"{sync.get('remote_cse')} ({runs})"),
        ("recipe steps", steps),
        ("system calls", f"{s['syscalls_total']}: {syscalls}"),
    ]
    width = max(len(k) for k, _ in rows + results)
    print("execmem demo: native backend on this host")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print("results")
    for key, value in results:
        print(f"  {key:<{width}}  {value}")
    print(f"  {'time':<{width}}  {elapsed * 1000:.1f} ms")
