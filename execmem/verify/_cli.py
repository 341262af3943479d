"""``execmem verify``: run the seed scenario catalog and its mutations."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from execmem._errors import ExecmemError
from execmem._parallel import run_jobs
from execmem._progress import Progress
from execmem.verify._catalog import find, scenarios, variants
from execmem.verify._framework import Result, Variant, run_variant, show


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON array of results")
    parser.add_argument("--arch", help="only this architecture (arm64, x86_64)")
    parser.add_argument("--scenario", help="only this scenario")
    parser.add_argument("--list", action="store_true", help="list scenarios and variants, run nothing")
    parser.add_argument("--show", metavar="S/VARIANT", help="print one variant's counterexample and draw its timeline")
    parser.add_argument("--svg", metavar="FILE", help="where --show writes the timeline (default: S-ARCH-VARIANT.svg)")
    parser.add_argument("-j", "--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run on this Dask cluster (needs the dask extra)")
    parser.add_argument("--max-states", type=int, default=500_000, help="state budget per variant")
    parser.add_argument("--markdown", action="store_true", help="print the results as a Markdown table")
    parser.add_argument(
        "--complete", action="store_true", help="explore unsafe variants completely too (default: stop at the first witness)"
    )


def _selected(args: argparse.Namespace) -> list[Variant]:
    known = {s.name for s in scenarios()}
    if args.scenario and args.scenario not in known:
        raise ExecmemError(f"unknown scenario {args.scenario!r}; known: {', '.join(sorted(known))}")
    chosen = variants(scenario_name=args.scenario, arch=args.arch)
    if not chosen:
        raise ExecmemError("no variant matches the selection")
    return chosen


def _run_one(variant_id: str, max_states: int, complete: bool = False) -> Result:
    return run_variant(find(variant_id), max_states=max_states, first_witness=not complete)


def run_many(
    chosen: list[Variant],
    *,
    jobs: int = 0,
    scheduler: str | None = None,
    max_states: int = 500_000,
    complete: bool = False,
    progress: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run variants in worker processes (or on a Dask cluster, see
    :func:`~execmem._parallel.run_jobs`); results in input order."""
    job = functools.partial(_run_one, max_states=max_states, complete=complete)
    return run_jobs(
        job, [v.id for v in chosen], jobs=jobs, scheduler=scheduler,
        done=None if progress is None else lambda _id, r: progress(r),
    )


def _table(results: Iterable[Result], markdown: bool) -> str:
    rows = [("scenario", "arch", "variant", "expected", "observed", "schedules", "states", "seconds")]
    rows += [
        (r.scenario, r.arch, r.variant, r.expected, r.observed if not r.error else f"error: {r.error}",
         f"{r.schedules}" if r.complete else f">={r.schedules}", str(r.states), f"{r.seconds:.2f}")
        for r in results
    ]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def run(args: argparse.Namespace) -> int:
    if args.jobs < 0:
        raise ExecmemError(f"-j/--jobs must be 0 (one per CPU) or more, not {args.jobs}")
    if args.list:
        for sc in scenarios():
            print(f"{sc.name}  (seeds/{sc.seed}): {sc.summary}")
            for v in sc.variants():
                print(f"    {v.arch:7} {v.name:24} expected {v.expected}: {v.why}")
        return 0
    if args.show:
        variant = find(args.show)
        with Progress(0) as progress:
            result = run_variant(
                variant, max_states=args.max_states, first_witness=not args.complete,
                progress=lambda states: progress.note(f"{variant.id}: {states:,} states explored"),
            )
        if result.error:
            raise ExecmemError(f"{variant.id}: {result.error}")
        print(f"{variant.id}: expected {result.expected}, observed {result.observed} ({result.why})")
        if not result.counterexample:
            print("no counterexample: every explored schedule is safe")
            return 0 if result.ok else 1
        text, svg = show(variant, result)
        print(text)
        path = Path(args.svg or f"{variant.scenario}-{variant.arch}-{variant.name}.svg")
        path.write_text(svg)
        print(f"timeline written to {path}")
        return 0 if result.ok else 1
    chosen = _selected(args)
    with Progress(len(chosen)) as progress:
        results = run_many(
            chosen, jobs=args.jobs, scheduler=args.scheduler, max_states=args.max_states, complete=args.complete,
            progress=lambda r: progress.step(f"{r.scenario}/{r.arch}/{r.variant}: {'ok' if r.ok else 'MISMATCH'}"),
        )
    bad = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        print(_table(results, args.markdown))
        for r in bad:
            what = r.error or f"expected {r.expected}, observed {r.observed}"
            print(f"MISMATCH {r.scenario}/{r.arch}/{r.variant}: {what}", file=sys.stderr)
        print(f"{len(results) - len(bad)}/{len(results)} variants as expected")
    return 1 if bad else 0
