"""What ``os.fork()`` costs with execmem packs mapped (``execmem.native._fork``).

Before a fork the parent copies every dual-mode view into a private snapshot, and the
child moves the snapshots over its views: the fork gets slower with the bytes of
mapped views.  Measured: ``os.fork()`` + the child's ``os._exit(0)`` + ``waitpid``,
with N whole packs (2 MiB each, fully mapped: the worst case) held by one backend,
against the same process holding none, interleaved, medians.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from execmem.bench._measure import Step, median
from execmem.native import NativeBackend

PACK = 2 << 20


def _fork_seconds() -> float:
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child leaves at once
        os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - started


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
            with_packs: list[float] = []
            without: list[float] = []
            for _ in range(repeats):
                for r in reservations:  # views mapped: the hooks copy them
                    if not r.mapped:
                        backend.map(r)
                with_packs.append(_fork_seconds())
                for r in reservations:  # the same memory unmapped: nothing to copy
                    backend.unmap(r)
                without.append(_fork_seconds())
        rows.append(
            {
                "packs": n,
                "view_bytes": n * PACK,
                "fork_seconds": median(with_packs),
                "fork_seconds_without_views": median(without),
                "extra_seconds_per_mib": (median(with_packs) - median(without)) / max(1, n * PACK >> 20),
            }
        )
    return {"mode": mode, "rows": rows, "repeats": repeats}


__all__ = ["PACK", "fork_benchmark"]
