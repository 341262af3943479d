"""What the profiler and debugger support costs per published function.

The same N functions as the publishing table are published with each configuration
of ``Allocator(perf_map=, jitdump=, gdb=)`` (all off, each alone, all three), one by
one and as one batch, configuration after configuration within each repeat, with
the idle second thread alive as there.  Reported: medians, and each configuration's
extra microseconds per function over "off" in the same run.  With them off the
allocator holds no sink at all: "off" is the plain allocator.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import execmem
from execmem._progress import Step
from execmem.arch import host
from execmem.bench._measure import idle_thread, median
from execmem.bench._publish import functions
from execmem.native import NativeBackend

CONFIGS: dict[str, dict[str, bool]] = {
    "off": {},
    "perf_map": {"perf_map": True},
    "jitdump": {"jitdump": True},
    "gdb": {"gdb": True},
    "all": {"perf_map": True, "jitdump": True, "gdb": True},
}


def _publish(codes: Sequence[bytes], *, batched: bool, mode: str, options: dict[str, Any]) -> float:
    """Seconds to allocate, write and publish ``codes`` (warm allocator, sinks open)."""
    with NativeBackend(mode) as backend, execmem.Allocator(backend=backend, **options) as allocator:
        warm = allocator.jit_text_alloc(len(codes[0]))  # the pack mapped, membarrier registered
        warm.write(0, codes[0])
        warm.map()
        started = time.perf_counter()
        if batched:
            allocator.publish(allocator.jit_text_alloc_many([len(c) for c in codes]), list(codes))
        else:
            for code in codes:
                text = allocator.jit_text_alloc(len(code))
                text.write(0, code)
                text.map()
        return time.perf_counter() - started


def debuginfo_benchmark(n: int, repeats: int, *, mode: str = "dual", step: Step | None = None) -> dict[str, Any]:
    codes = [code for code, _ in functions(host(), n, seed=11)]
    perf_map = Path(f"/tmp/perf-{os.getpid()}.map")
    had_perf_map = perf_map.exists()
    times: dict[tuple[str, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="execmem-bench-jitdump-") as directory, idle_thread():
        for _ in range(repeats):
            for config, flags in CONFIGS.items():
                options: dict[str, Any] = {**flags, "jitdump": directory if flags.get("jitdump") else None}
                for batched in (False, True):
                    times.setdefault((config, batched), []).append(_publish(codes, batched=batched, mode=mode, options=options))
            if step is not None:
                step("debuginfo cost")
    if not had_perf_map:
        perf_map.unlink(missing_ok=True)
    rows = []
    for batched in (False, True):
        off = median(times["off", batched]) / n
        for config in CONFIGS:
            per_function = median(times[config, batched]) / n
            rows.append({
                "config": config,
                "batched": batched,
                "us_per_function": per_function * 1e6,
                "extra_us_per_function": (per_function - off) * 1e6,
            })
    return {"n": n, "repeats": repeats, "mode": mode, "rows": rows}


def table_lines(result: dict[str, Any]) -> list[str]:
    """The report's lines for ``debuginfo_benchmark``'s result."""
    lines = [
        f"Profiler and debugger support, N = {result['n']:,}: us per published function, and extra over all off",
        "  (Allocator(perf_map=True), jitdump=DIRECTORY, gdb=True; all = the three at once)",
    ]
    for batched, label in ((False, "one by one"), (True, "one batch ")):
        rows = [r for r in result["rows"] if r["batched"] is batched]
        cells = [
            f"{r['config']} {r['us_per_function']:.2f}" + ("" if r["config"] == "off" else f" ({r['extra_us_per_function']:+.2f})")
            for r in rows
        ]
        lines.append(f"  {label}: " + ", ".join(cells))
    return lines


__all__ = ["CONFIGS", "debuginfo_benchmark", "table_lines"]
