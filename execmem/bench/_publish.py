"""Native benchmarks: publishing N small functions, alloc/free churn, call overhead.

Every measurement runs execmem and the baselines (``_baseline``: ``baseline``, one
mmap + write + mprotect per function; ``rwx-bump``, one RWX mapping, a bump pointer
and a memmove per function) in the same process, interleaved repeat by repeat, and
reports medians; ratios are taken between medians of the same run.  A second, idle
Python thread is alive throughout: execmem synchronizes other threads with membarrier,
and the point is to count what that really costs.

Publishing
    Functions are ``return k`` (``mov eax, k; ret`` on x86-64, ``movz``/``movk``/``ret``
    on arm64) padded with the trap instruction to 16-64 bytes.  The template is
    assembled once and its immediate patched per function, so Keystone is not timed.
    Each execmem repeat starts a new allocator and publishes two warm-up texts
    (untimed) so its first pack is mapped and the ``remote_cse`` mechanism chosen and
    registered: the timed part is the steady state a JIT sees.  Modes: ``execmem``
    (``jit_text_alloc`` + ``write`` + ``map`` per function: one by one),
    ``execmem-batched`` (one ``jit_text_alloc_many`` for all the sizes, then one
    ``publish(texts, codes)``: what a JIT compiling a module does), ``baseline`` and
    ``rwx-bump`` (its mapping is made before the timed part).  Then every function is
    freed one by one, timed too (``rwx-bump`` frees nothing).
Churn
    A seeded plan of allocations (16..4096 bytes, each written and published) and
    frees of random live ones, replayed on execmem and on both baselines.
Calls
    A published function called through ``JitText.function`` (which counts calls in
    flight so that ``free`` can defer reclaiming) versus a plain ctypes pointer to the
    same address, and to the same code published by each baseline.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import execmem
from execmem._errors import UnsupportedError
from execmem._progress import Step
from execmem.arch import ArchSpec, host
from execmem.bench._baseline import BaselineJit, RwxBump
from execmem.bench._measure import count_vmas, idle_thread, median, memory_of, process_rss
from execmem.native import NativeBackend

MODES = ("execmem", "execmem-batched", "baseline", "rwx-bump")
#: The modes that are not execmem.
BASELINES = ("baseline", "rwx-bump")

# -- the functions ---------------------------------------------------------------------------


def _x86_64() -> Callable[[int], bytes]:
    probe = execmem.asm("mov eax, 0x12345678; ret", arch="x86_64")
    at = probe.index((0x12345678).to_bytes(4, "little"))
    template = execmem.asm("mov eax, 0; ret", arch="x86_64")

    def encode(value: int) -> bytes:
        return template[:at] + value.to_bytes(4, "little") + template[at + 4 :]

    return encode


def _arm64() -> Callable[[int], bytes]:
    template = execmem.asm("movz w0, #0; movk w0, #0, lsl #16; ret", arch="arm64")
    words = [int.from_bytes(template[i : i + 4], "little") for i in range(0, len(template), 4)]

    def encode(value: int) -> bytes:
        out = list(words)
        out[0] |= (value & 0xFFFF) << 5  # imm16 is bits [20:5] of MOVZ/MOVK
        out[1] |= (value >> 16 & 0xFFFF) << 5
        return b"".join(w.to_bytes(4, "little") for w in out)

    return encode


_ENCODERS: dict[str, Callable[[], Callable[[int], bytes]]] = {"x86_64": _x86_64, "arm64": _arm64}


def encoder(spec: ArchSpec) -> Callable[[int], bytes]:
    """``value -> code returning value`` for ``spec``, checked once against Keystone."""
    make = _ENCODERS.get(spec.name)
    if make is None:
        raise UnsupportedError(f"the benchmark has no function template for {spec.name}")
    encode = make()
    sample = 0x1234ABCD
    source = {"x86_64": f"mov eax, {sample:#x}; ret", "arm64": "movz w0, #0xabcd; movk w0, #0x1234, lsl #16; ret"}
    if encode(sample) != execmem.asm(source[spec.name], arch=spec.name):
        raise UnsupportedError(f"the {spec.name} function template does not encode like Keystone")
    return encode


def functions(spec: ArchSpec, n: int, seed: int) -> list[tuple[bytes, int]]:
    """``n`` (code, value) pairs: ``return value`` padded with traps to 16..64 bytes."""
    encode = encoder(spec)
    rng = random.Random(seed)
    unit = spec.insn_align
    out = []
    for i in range(n):
        value = (i * 2654435761 + 12345) & 0x7FFFFFFF
        code = encode(value)
        size = max(len(code), rng.randint(16, 64) // unit * unit)
        out.append((code + spec.trap_bytes(size)[len(code) :], value))
    return out


# -- publishing ------------------------------------------------------------------------------


def _backend_counts(backend: NativeBackend) -> tuple[Counter[str], int]:
    stats = backend.stats()
    sync = stats["sync"]
    runs = sync.get("remote_cse_runs", {}) if isinstance(sync, dict) else {}
    return Counter(cast(Mapping[str, int], stats["syscalls"])), sum(runs.values())


def _live_bytes(allocator: execmem.Allocator) -> int:
    """Bytes of chunks allocated to texts (``stats()["totals"]["live_bytes"]``)."""
    totals = cast(Mapping[str, int], allocator.stats()["totals"])
    return totals["live_bytes"]


@dataclass
class Sample:
    """One timed run of one mode at one N."""

    seconds: float
    free_seconds: float
    syscalls: dict[str, int]
    syncs: int
    memory: dict[str, int]
    executable: int
    vmas: int
    vmas_delta: int
    process_rss_delta: int
    calls_ok: int
    footprint: int
    mechanism: str | None = None
    backing: str | None = None
    huge_bytes: int | None = None


def _publish_execmem(codes: Sequence[tuple[bytes, int]], *, batched: bool, mode: str) -> Sample:
    restype = ctypes.c_uint32
    vmas0, rss0 = count_vmas(), process_rss()
    backend = NativeBackend(mode)
    allocator = execmem.Allocator(backend=backend)
    try:
        for code, _ in codes[:2]:  # warm-up: the pack mapped, remote_cse chosen (untimed)
            warm = allocator.jit_text_alloc(len(code))
            warm.write(0, code)
            warm.map()
        calls0, syncs0 = _backend_counts(backend)
        live0 = _live_bytes(allocator)
        texts = []
        started = time.perf_counter()
        if batched:
            texts = allocator.jit_text_alloc_many([len(code) for code, _ in codes])
            allocator.publish(texts, [code for code, _ in codes])
        else:
            for code, _ in codes:
                text = allocator.jit_text_alloc(len(code))
                text.write(0, code)
                text.map()
                texts.append(text)
        seconds = time.perf_counter() - started
        calls1, syncs1 = _backend_counts(backend)
        vmas, rss = count_vmas(), process_rss()
        footprint = _live_bytes(allocator) - live0
        memory = memory_of(backend.owned_ranges())
        executable = sum(size for _, size in backend.executable_ranges())
        ok = sum(text.function(restype)() == value for text, (_, value) in zip(texts, codes, strict=True))
        stats = backend.stats()
        sync, huge = stats["sync"], stats["huge_pages"]
        mechanism = sync.get("remote_cse") if isinstance(sync, dict) else None
        backing = str(stats["backing"])
        obtained = huge.get("obtained_bytes") if isinstance(huge, dict) else None
        started = time.perf_counter()
        for text in texts:
            text.free()
        free_seconds = time.perf_counter() - started
    finally:
        allocator.close()
        backend.close()
    calls1.subtract(calls0)
    return Sample(
        seconds, free_seconds, {k: v for k, v in calls1.items() if v}, syncs1 - syncs0, memory, executable,
        vmas, vmas - vmas0, rss - rss0, ok, footprint, mechanism, backing, obtained,
    )


def _rwx_capacity(sizes: Sequence[int]) -> int:
    """What a bump allocator needs for ``sizes`` (16-byte aligned functions)."""
    return sum((size + 15) // 16 * 16 for size in sizes)


def _publish_baseline(codes: Sequence[tuple[bytes, int]], *, rwx: bool = False) -> Sample:
    prototype = ctypes.CFUNCTYPE(ctypes.c_uint32)
    vmas0, rss0 = count_vmas(), process_rss()
    jit: BaselineJit | RwxBump = RwxBump(_rwx_capacity([len(code) for code, _ in codes])) if rwx else BaselineJit()
    try:
        started = time.perf_counter()
        addresses = [jit.publish(code) for code, _ in codes]
        seconds = time.perf_counter() - started
        syscalls = dict(jit.syscalls)
        vmas, rss = count_vmas(), process_rss()
        ranges = jit.ranges()
        memory = memory_of(ranges)
        ok = sum(prototype(address)() == value for address, (_, value) in zip(addresses, codes, strict=True))
        started = time.perf_counter()
        for address in addresses:
            jit.free(address)
        free_seconds = time.perf_counter() - started
    finally:
        jit.close()
    return Sample(
        seconds, free_seconds, syscalls, 0, memory, memory["address_space"], vmas, vmas - vmas0, rss - rss0, ok,
        memory["address_space"],
    )


def publish_benchmark(
    sizes: Sequence[int], repeats: int, *, mode: str = "dual", seed: int = 1, step: Step | None = None
) -> list[dict[str, Any]]:
    """Rows (one per N and mode) of medians over ``repeats`` interleaved runs."""
    spec = host()
    samples: dict[tuple[int, str], list[Sample]] = {}
    programs = {n: functions(spec, n, seed + n) for n in sizes}
    with idle_thread():
        for rep in range(repeats):
            for n in sizes:
                codes = programs[n]
                k = rep % len(MODES)
                order = MODES[k:] + MODES[:k]  # rotate: no mode always runs first
                for name in order:
                    if step is not None:
                        step(f"publish {n} functions, {name}, repeat {rep + 1}/{repeats}")
                    if name in BASELINES:
                        sample = _publish_baseline(codes, rwx=name == "rwx-bump")
                    else:
                        sample = _publish_execmem(codes, batched=name == "execmem-batched", mode=mode)
                    samples.setdefault((n, name), []).append(sample)
    rows = []
    for n in sizes:
        base = median([s.seconds for s in samples[(n, "baseline")]])
        floor = median([s.seconds for s in samples[(n, "rwx-bump")]])
        for name in MODES:
            runs = samples[(n, name)]
            last = runs[-1]  # sizes, counts and VMAs do not vary between repeats
            seconds = median([s.seconds for s in runs])
            syscalls = sum(last.syscalls.values())
            rows.append(
                {
                    "n": n,
                    "mode": name,
                    "seconds_per_function": seconds / n,
                    "speedup_vs_baseline": base / seconds if seconds else float("inf"),
                    "times_rwx_floor": seconds / floor if floor else float("inf"),
                    # A bump pointer frees nothing: no free time to compare.
                    "free_seconds_per_function": None if name == "rwx-bump" else median([s.free_seconds for s in runs]) / n,
                    "address_space_per_function": last.memory["address_space"] / n,
                    "executable_address_space_per_function": last.executable / n,
                    "footprint_per_function": last.footprint / n,
                    "rss_per_function": last.memory["rss"] / n,
                    "pss_per_function": last.memory["pss"] / n,
                    "process_rss_delta_per_function": median([s.process_rss_delta for s in runs]) / n,
                    "vmas": last.vmas,
                    "vmas_delta": last.vmas_delta,
                    "vmas_own": last.memory["vmas"],
                    "syscalls_per_function": syscalls / n,
                    "syscalls": last.syscalls,
                    "syncs_per_function": last.syncs / n,
                    "syncs": last.syncs,
                    "sync_mechanism": last.mechanism,
                    "backing": last.backing,
                    "huge_pages_obtained_bytes": last.huge_bytes,
                    "calls_ok": last.calls_ok,
                    "calls": n,
                    "repeats": len(runs),
                }
            )
    return rows


# -- churn -----------------------------------------------------------------------------------


def churn_plan(ops: int, seed: int, *, cap: int = 256) -> list[int | float]:
    """Allocation sizes (int, 16..4096) and frees (float in [0, 1): which live one)."""
    rng = random.Random(seed)
    plan: list[int | float] = []
    live = 0
    for _ in range(ops):
        if live == 0 or (live < cap and rng.random() < 0.55):
            plan.append(rng.randint(16, 4096))
            live += 1
        else:
            plan.append(rng.random())
            live -= 1
    return plan


def _replay(plan: Sequence[int | float], alloc: Callable[[int], Any], free: Callable[[Any], None]) -> list[Any]:
    live: list[Any] = []
    for op in plan:
        if isinstance(op, int):
            live.append(alloc(op))
        else:
            i = int(op * len(live))
            live[i], live[-1] = live[-1], live[i]
            free(live.pop())
    return live


def _churn_baseline(plan: Sequence[int | float], code: bytes, *, rwx: bool = False) -> tuple[float, int]:
    jit: BaselineJit | RwxBump = RwxBump(_rwx_capacity([op for op in plan if isinstance(op, int)])) if rwx else BaselineJit()
    try:
        started = time.perf_counter()
        _replay(plan, lambda size: jit.publish(code[:size]), jit.free)
        return time.perf_counter() - started, sum(jit.syscalls.values())
    finally:
        jit.close()


def _churn_execmem(plan: Sequence[int | float], code: bytes, mode: str) -> tuple[float, int, int]:
    backend = NativeBackend(mode)
    allocator = execmem.Allocator(backend=backend)
    try:

        def publish(size: int) -> execmem.JitText:
            text = allocator.jit_text_alloc(size)
            text.write(0, code[:size])
            text.map()
            return text

        calls0, _ = _backend_counts(backend)
        started = time.perf_counter()
        _replay(plan, publish, execmem.JitText.free)
        seconds = time.perf_counter() - started
        calls1, _ = _backend_counts(backend)
        peak = cast(int, backend.stats()["peak_bytes_reserved"])
        return seconds, sum((calls1 - calls0).values()), peak
    finally:
        allocator.close()
        backend.close()


def churn_benchmark(ops: int, repeats: int, *, mode: str = "dual", seed: int = 7, step: Step | None = None) -> dict[str, Any]:
    spec = host()
    plan = churn_plan(ops, seed)
    image = spec.trap_bytes(4096)
    ret = execmem.asm("ret", arch=spec.name)
    code = ret + image[len(ret) :]
    page = BaselineJit().page
    peak = current = 0
    sizes: list[int] = []
    for op in plan:  # the baseline's peak executable VA, from the plan (no timing cost)
        if isinstance(op, int):
            sizes.append(-(-op // page) * page)
            current += sizes[-1]
            peak = max(peak, current)
        else:
            i = int(op * len(sizes))
            sizes[i], sizes[-1] = sizes[-1], sizes[i]
            current -= sizes.pop()
    names = ("execmem", *BASELINES)
    times: dict[str, list[float]] = {name: [] for name in names}
    syscalls: dict[str, int] = {}
    peak_execmem = 0
    with idle_thread():
        for rep in range(repeats):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                if step is not None:
                    step(f"churn {ops} operations, {name}, repeat {rep + 1}/{repeats}")
                if name in BASELINES:
                    seconds, syscalls[name] = _churn_baseline(plan, code, rwx=name == "rwx-bump")
                else:
                    seconds, syscalls[name], peak_execmem = _churn_execmem(plan, code, mode)
                times[name].append(seconds)
    e, b, r = (median(times[name]) for name in names)
    return {
        "operations": len(plan),
        "allocations": sum(isinstance(op, int) for op in plan),
        "seed": seed,
        "sizes": [16, 4096],
        "threads": 1,
        "idle_thread": True,
        "execmem_ops_per_second": len(plan) / e,
        "baseline_ops_per_second": len(plan) / b,
        "rwx_ops_per_second": len(plan) / r,
        "ratio": b / e,
        "ratio_vs_rwx": r / e,
        "execmem_syscalls_per_op": syscalls["execmem"] / len(plan),
        "baseline_syscalls_per_op": syscalls["baseline"] / len(plan),
        "execmem_peak_executable_bytes": peak_execmem,
        "baseline_peak_executable_bytes": peak,
        # A bump pointer keeps everything it ever handed out.
        "rwx_peak_executable_bytes": _rwx_capacity([op for op in plan if isinstance(op, int)]),
        "repeats": repeats,
    }


# -- call overhead ---------------------------------------------------------------------------


def call_benchmark(calls: int, repeats: int, *, mode: str = "dual", step: Step | None = None) -> dict[str, Any]:
    """ns per call of ``return 42``: through ``function()``, and through a plain ctypes
    pointer to the same text, to the baseline's copy and to the RWX floor's copy."""
    spec = host()
    code = encoder(spec)(42)
    backend = NativeBackend(mode)
    allocator = execmem.Allocator(backend=backend)
    naive, floor = BaselineJit(), RwxBump(len(code))
    prototype = ctypes.CFUNCTYPE(ctypes.c_uint32)
    try:
        text = allocator.jit_text_alloc(len(code))
        text.write(0, code)
        text.map()
        callables: dict[str, Callable[[], Any]] = {
            "function": text.function(ctypes.c_uint32),
            "ctypes": prototype(text.address),
            "baseline": prototype(naive.publish(code)),
            "rwx-bump": prototype(floor.publish(code)),
        }
        if any(fn() != 42 for fn in callables.values()):
            raise UnsupportedError("the call benchmark's function did not return 42")
        times: dict[str, list[float]] = {name: [] for name in callables}
        loop = range(calls)
        names = list(callables)
        with idle_thread():
            for rep in range(repeats):
                if step is not None:
                    step(f"{calls} calls, repeat {rep + 1}/{repeats}")
                k = rep % len(names)
                for name in names[k:] + names[:k]:
                    fn = callables[name]
                    started = time.perf_counter()
                    for _ in loop:
                        fn()
                    times[name].append(time.perf_counter() - started)
    finally:
        allocator.close()
        backend.close()
        naive.close()
        floor.close()
    ns = {name: median(values) / calls * 1e9 for name, values in times.items()}
    return {
        "calls": calls,
        "function_ns_per_call": ns["function"],
        "ctypes_ns_per_call": ns["ctypes"],
        "baseline_ns_per_call": ns["baseline"],
        "rwx_ns_per_call": ns["rwx-bump"],
        "ratio": ns["function"] / ns["ctypes"],
        "ratio_vs_baseline": ns["function"] / ns["baseline"],
        "ratio_vs_rwx": ns["function"] / ns["rwx-bump"],
        "idle_thread": True,
        "repeats": repeats,
    }


__all__ = ["BASELINES", "MODES", "call_benchmark", "churn_benchmark", "churn_plan", "encoder", "functions", "publish_benchmark"]
