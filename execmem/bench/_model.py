"""Benchmarks of the modeled machine for ``execmem bench``: guest throughput against
raw Unicorn (``_emu.guest_throughput``), exhaustive exploration of the litmus
catalog (``execmem.litmus._cli.run_all``) and of a two-thread program
(``_emu.exploration_time``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from execmem._progress import Step
from execmem.bench import _emu

#: Where the checkout vendors herd7's catalog (with its NOTICE).
CATALOG = Path("tests") / "data" / "herd" / "aarch64-ifetch"


def find_catalog(explicit: str | None = None) -> Path | None:
    """The catalog folder: ``explicit``, else ``tests/data/herd/aarch64-ifetch``
    relative to the project root (the checkout holding ``execmem/``), else to the cwd."""
    if explicit:
        return Path(explicit)
    root = Path(__file__).resolve().parents[2]
    for base in (root, Path.cwd()):
        candidate = (base / CATALOG).resolve()
        if candidate.is_dir():
            return candidate
    return None


def emulator(*, quick: bool, step: Step | None = None) -> dict[str, Any]:
    iterations, repeats = (200_000, 3) if quick else (2_000_000, 5)
    out: dict[str, Any] = {}
    for arch in _emu.modeled():
        if step is not None:
            step(f"modeled machine vs raw Unicorn, {arch}")
        t = _emu.guest_throughput(arch, iterations=iterations, repeats=repeats)
        out[arch] = {
            "instructions": t.instructions,
            "raw_mips": t.raw_mips,
            "model_mips": t.model_mips,
            "ratio": t.ratio,
        }
    return {"emu_ratio_vs_raw": min(v["ratio"] for v in out.values()), "by_arch": out, "repeats": repeats}


def litmus(catalog: Path | None, *, quick: bool, step: Step | None = None) -> dict[str, Any]:
    from execmem.litmus._cli import collect, read_kinds, run_all

    if step is not None:
        step("exhaustive exploration, two-thread program")
    seconds, states = _emu.exploration_time(repeats=3 if quick else 5)
    out: dict[str, Any] = {"two_thread": {"seconds": seconds, "final_states": states}}
    if catalog is None or not catalog.is_dir():
        out["catalog"] = {"path": None if catalog is None else str(catalog), "skipped": "catalog not found"}
        return out
    files = collect([str(catalog)])
    total = len(files)
    if quick:
        files = files[:5]
    if step is not None:
        step(f"litmus catalog, {len(files)} tests")
    jobs = 1 if quick else 0
    started = time.perf_counter()
    results = run_all(files, jobs=jobs)
    wall = time.perf_counter() - started
    kinds_file = catalog / "kinds.txt"
    kinds = read_kinds(str(kinds_file)) if kinds_file.is_file() else {}
    compared = [r for r in results if r.name in kinds]
    out["catalog"] = {
        "path": str(catalog),
        "tests": len(results),
        "of": total,
        "workers": 1 if jobs == 1 else os.cpu_count() or 1,
        "seconds": wall,
        "cpu_seconds": sum(r.seconds for r in results),
        "slowest": max(((r.seconds, r.name) for r in results), default=(0.0, ""))[1],
        "agree": sum(r.verdict == kinds[r.name] for r in compared),
        "compared": len(compared),
        "errors": sum(r.verdict in ("error", "unsupported") for r in results),
    }
    return out


__all__ = ["CATALOG", "emulator", "find_catalog", "litmus"]
