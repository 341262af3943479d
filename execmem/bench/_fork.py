"""What ``os.fork()`` costs with execmem packs mapped (``execmem.native._fork``).

Before a fork the parent copies every dual-mode view into a private snapshot, and the
child moves the snapshots over its views: the fork gets slower with the bytes of
mapped views.  Measured: the CPU time the forking thread spends in ``os.fork()``
(the hooks' copies, the kernel's copy of the page tables; CPU time, so that other
processes of a busy machine do not count), with N whole packs (2 MiB each, fully
mapped: the worst case) held by one backend, against the same packs unmapped (nothing
to copy), interleaved, medians; and the wall time of fork + the child's exit + wait.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from execmem._progress import Step
from execmem.bench._measure import median
from execmem.native import NativeBackend

PACK = 2 << 20


def _fork_seconds() -> tuple[float, float]:
    """(CPU seconds of this thread in ``os.fork()``, wall seconds until the child is reaped)."""
    started, cpu = time.perf_counter(), time.thread_time()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves at once
        os._exit(0)
    cpu = time.thread_time() - cpu
    os.waitpid(pid, 0)
    return cpu, time.perf_counter() - started


def fork_benchmark(packs: Sequence[int], repeats: int, *, mode: str = "dual", step: Step | None = None) -> dict[str, Any]:
    rows = []
    ret = b"\xc3"  # never run: the bytes only have to be there
    for n in packs:
        if step is not None:
            step(f"fork with {n} packs mapped")
        with NativeBackend(mode, huge_pages=False) as backend:
            reservations = [backend.reserve(PACK, PACK) for _ in range(n)]
            for r in reservations:
                backend.write(r, 0, ret)
                backend.map(r)
            with_packs: list[tuple[float, float]] = []
            without: list[tuple[float, float]] = []
            for _ in range(repeats):
                for r in reservations:  # views mapped: the hooks copy them
                    if not r.mapped:
                        backend.map(r)
                with_packs.append(_fork_seconds())
                for r in reservations:  # the same memory unmapped: nothing to copy
                    backend.unmap(r)
                without.append(_fork_seconds())
        cpu, cpu_without = median([c for c, _ in with_packs]), median([c for c, _ in without])
        rows.append(
            {
                "packs": n,
                "view_bytes": n * PACK,
                "fork_cpu_seconds": cpu,
                "fork_cpu_seconds_without_views": cpu_without,
                "extra_cpu_seconds_per_mib": (cpu - cpu_without) / max(1, n * PACK >> 20),
                "fork_wall_seconds": median([w for _, w in with_packs]),
            }
        )
    return {"mode": mode, "rows": rows, "repeats": repeats}


__all__ = ["PACK", "fork_benchmark"]
