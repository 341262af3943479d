"""``execmem bench [--json] [--quick] [--plot FILE] [--markdown FILE] [--mode M]``

execmem against the usual mmap + mprotect per function and against one RWX mapping
with a bump pointer, measured side by side in one run (``_publish``), fork with packs
mapped (``_fork``), and the modeled machine against raw Unicorn (``_model``).
Ratios are between medians of the same run; the targets are printed as PASS/FAIL
lines and never asserted.  ``--quick`` (N = 100 and 1000, fewer repeats, five
litmus tests) only checks that everything works.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from execmem import __version__
from execmem._errors import ExecmemError
from execmem._plot import check_png
from execmem._progress import Progress
from execmem.bench import _debuginfo, _fork, _model, _publish, _report
from execmem.bench._measure import machine, revision

FULL = {"sizes": (100, 1000, 10_000), "repeats": 5, "churn_ops": 20_000, "calls": 200_000, "fork_packs": (0, 1, 4, 16), "fork_repeats": 11}
QUICK = {"sizes": (100, 1000), "repeats": 2, "churn_ops": 2_000, "calls": 20_000, "fork_packs": (0, 1), "fork_repeats": 3}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quick", action="store_true", help="small N, fewer repeats, 5 litmus tests: a smoke run")
    parser.add_argument("--plot", metavar="FILE", help="also draw time and address space per function vs N into this PNG (matplotlib)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as a Markdown page (docs/bench.md)")
    parser.add_argument("--mode", choices=("dual", "mprotect", "rwx"), default="dual", help="execmem's native mode (default: dual)")
    parser.add_argument("--repeats", type=int, help="repeats per measurement (default: 5, quick: 2)")
    parser.add_argument("--litmus", metavar="DIR", help="litmus catalog folder (default: tests/data/herd/aarch64-ifetch of the checkout)")


def collect(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement and return the report (without printing)."""
    plan = QUICK if args.quick else FULL
    repeats = args.repeats if args.repeats is not None else int(plan["repeats"])  # type: ignore[call-overload]
    if repeats < 1:
        raise ExecmemError(f"--repeats must be at least 1, not {repeats}")
    sizes: tuple[int, ...] = plan["sizes"]  # type: ignore[assignment]
    catalog = _model.find_catalog(args.litmus)
    if args.litmus and (catalog is None or not catalog.is_dir()):
        raise ExecmemError(f"{args.litmus}: no such litmus folder")
    packs: tuple[int, ...] = plan["fork_packs"]  # type: ignore[assignment]
    modes, baselines = len(_publish.MODES), len(_publish.BASELINES)
    steps = repeats * len(sizes) * modes + repeats * (1 + baselines) + repeats + len(packs) + 2 + 2 + repeats
    progress = Progress(steps)
    try:
        publish = _publish.publish_benchmark(sizes, repeats, mode=args.mode, step=progress.step)
        churn = _publish.churn_benchmark(int(plan["churn_ops"]), repeats, mode=args.mode, step=progress.step)  # type: ignore[call-overload]
        call = _publish.call_benchmark(int(plan["calls"]), repeats, mode=args.mode, step=progress.step)  # type: ignore[call-overload]
        debuginfo = _debuginfo.debuginfo_benchmark(min(sizes[-1], 1000), repeats, mode=args.mode, step=progress.step)
        fork = _fork.fork_benchmark(packs, int(plan["fork_repeats"]), mode=args.mode, step=progress.step)  # type: ignore[call-overload]
        emu = _model.emulator(quick=args.quick, step=progress.step)
        litmus = _model.litmus(catalog, quick=args.quick, step=progress.step)
    finally:
        progress.close()
    first = next(r for r in publish if r["mode"] != "baseline")
    report: dict[str, Any] = {
        "config": {
            "arch": platform.machine(),
            "execmem": __version__,
            "revision": revision(),
            "mode": args.mode,
            "backing": first["backing"],
            "huge_pages_obtained_bytes": first["huge_pages_obtained_bytes"],
            "sync_mechanism": first["sync_mechanism"],
            "repeats": repeats,
            "quick": bool(args.quick),
            "sizes": list(sizes),
            "idle_thread_during_publish": True,
        },
        "machine": machine(),
        "publish": publish,
        "baseline_note": _report.BASELINE_NOTE,
        "churn": churn,
        "call": call,
        "debuginfo": debuginfo,
        "fork": fork,
        "emu_ratio_vs_raw": emu["emu_ratio_vs_raw"],
        "emu": emu,
        "litmus": litmus,
    }
    report["targets"] = _report.targets(report)
    return report


def _command(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces this run."""
    out = ["execmem", "bench"]
    out += ["--quick"] if args.quick else []
    out += ["--json"] if args.json else []
    out += ["--mode", args.mode] if args.mode != "dual" else []
    out += ["--repeats", str(args.repeats)] if args.repeats is not None else []
    out += ["--litmus", args.litmus] if args.litmus else []
    out += ["--plot", args.plot] if args.plot else []
    out += ["--markdown", args.markdown]
    return out


def run(args: argparse.Namespace) -> int:
    plot = args.plot
    if plot:
        check_png(plot, "--plot")  # before the minutes of measuring, not after
    report = collect(args)
    text = _report.table(report)
    if plot:
        _report.plot(report, plot)
    if args.markdown:
        command = " ".join(shlex.quote(a) for a in _command(args))
        relative = None
        if plot:
            try:
                relative = str(Path(plot).resolve().relative_to(Path(args.markdown).resolve().parent))
            except ValueError:
                relative = str(Path(plot).resolve())
        try:
            Path(args.markdown).write_text(_report.markdown(report, command, text, relative))
        except OSError as exc:
            raise ExecmemError(f"cannot write {args.markdown}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(text)
        if plot:
            print(f"\nplot: {plot}")
    if plot and args.json:
        print(f"plot: {plot}", file=sys.stderr)
    return 0


__all__ = ["FULL", "QUICK", "collect", "configure", "run"]
