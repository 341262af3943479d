"""``execmem litmus [--json|--summary] [--kinds FILE] [--variant V,...] [-j N] PATH...``

Runs herd7 AArch64 litmus tests on the modeled machine and prints herd7's output
(``_report``); with ``--kinds`` also the agreement with a herd kinds file, overall
and by category of test."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from execmem._errors import ExecmemError
from execmem._parallel import run_jobs
from execmem._progress import Progress, Step
from execmem.emu._explore import MAX_MEMORY
from execmem.litmus._parse import read_text
from execmem.litmus._report import by_category, herd_block, summary_line
from execmem.litmus._run import LitmusResult, run_file


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".litmus files or folders of them")
    parser.add_argument("--json", action="store_true", help="print a JSON array of results")
    parser.add_argument(
        "--summary", action="store_true",
        help="one line per test (verdict, final states, states explored, seconds) instead of herd7's output",
    )
    parser.add_argument("--kinds", metavar="FILE", help="compare with a herd kinds file (NAME Allowed|Forbidden)")
    parser.add_argument("-j", "--jobs", type=int, default=0, help="worker processes (default: one per CPU)")
    parser.add_argument("--scheduler", metavar="ADDRESS", help="run the tests on a Dask cluster instead")
    parser.add_argument("--max-states", type=int, default=1_000_000, help="state budget per test")
    parser.add_argument(
        "--max-memory", type=int, default=MAX_MEMORY >> 20, metavar="MB",
        help=f"memory budget per test (default {MAX_MEMORY >> 20} MB): past it the test reports 'budget exceeded'",
    )
    parser.add_argument(
        "--variant", default="", metavar="V[,V...]",
        help="herd's -variant: vmsa (translation tables), fatal|precise or handled|imprecise (faults)",
    )


def collect(paths: list[str]) -> list[str]:
    files: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            # Regular files only: opening a fifo named *.litmus would block forever.
            files.extend(str(f) for f in sorted(path.glob("*.litmus")) if f.is_file())
        elif path.is_file():
            files.append(str(path))
        elif path.exists():
            raise ExecmemError(f"{p}: not a regular file or directory")
        else:
            raise ExecmemError(f"{p}: no such file or directory")
    if not files:
        raise ExecmemError("no .litmus files found")
    return files


#: herd's spellings of a kind (lib/constrGen.ml ``parse_kind``).
_KINDS = {"Allow": "Allowed", "Allowed": "Allowed", "Forbid": "Forbidden", "Forbidden": "Forbidden",
          "Require": "Required", "Required": "Required"}
VARIANTS = frozenset({"vmsa", "fatal", "precise", "handled", "imprecise"})


def read_kinds(path: str) -> dict[str, str]:
    kinds: dict[str, str] = {}
    text = read_text(path, 1 << 20, ExecmemError)
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or line.lstrip().startswith("#"):
            continue
        if len(fields) < 2 or fields[1] not in _KINDS:
            raise ExecmemError(f"{path}:{n}: expected 'NAME Allowed|Forbidden|Required'")
        kinds[fields[0]] = _KINDS[fields[1]]
    return kinds


def parse_variants(text: str) -> frozenset[str]:
    words = frozenset(w.strip().lower() for w in text.split(",") if w.strip())
    unknown = words - VARIANTS
    if unknown:
        raise ExecmemError(f"--variant: unknown {', '.join(sorted(unknown))} (known: {', '.join(sorted(VARIANTS))})")
    return words


def run_all(
    files: list[str],
    *,
    jobs: int = 0,
    max_states: int = 1_000_000,
    max_memory: int = MAX_MEMORY,
    step: Step | None = None,
    variants: frozenset[str] = frozenset(),
    scheduler: str | None = None,
) -> list[LitmusResult]:
    """Run every file in worker processes (or on a Dask cluster, see
    :func:`~execmem._parallel.run_jobs`); results in input order.  ``step`` is told
    each test's name as its result arrives."""
    job = functools.partial(run_file, max_states=max_states, max_memory=max_memory, variants=variants)
    return run_jobs(
        job, files, jobs=jobs, scheduler=scheduler, done=None if step is None else lambda _f, r: step(r.name)
    )


def run(args: argparse.Namespace) -> int:
    if args.jobs < 0:
        raise ExecmemError(f"-j/--jobs must be 0 (one per CPU) or more, not {args.jobs}")
    if args.max_states < 1 or args.max_memory < 1:
        raise ExecmemError("--max-states and --max-memory must be positive")
    files = collect(args.paths)
    kinds = read_kinds(args.kinds) if args.kinds else None
    variants = parse_variants(args.variant)
    with Progress(len(files)) as progress:
        results = run_all(
            files, jobs=args.jobs, max_states=args.max_states, max_memory=args.max_memory << 20,
            step=progress.step, variants=variants, scheduler=args.scheduler,
        )
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    elif args.summary:
        width = max(len(r.name) for r in results)
        for r in results:
            print(summary_line(r, width))
    else:
        print("\n".join(herd_block(r) for r in results), end="")
    failed = [r for r in results if r.verdict in ("error", "unsupported", "unknown")]
    if kinds is None:
        return 1 if any(r.verdict in ("error", "unknown") for r in results) else 0
    compared = [r for r in results if r.name in kinds]
    disagree = [r for r in compared if not r.agrees(kinds[r.name])]
    out = sys.stderr if args.json else sys.stdout
    for r in disagree:
        print(f"DISAGREE {r.name}: herd says {kinds[r.name]}, the model says {r.verdict} {r.detail}".rstrip(), file=out)
    missing = [r.name for r in results if r.name not in kinds]
    if missing:
        print(f"no kind for {len(missing)} test(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}", file=out)
    print(f"agree {len(compared) - len(disagree)}/{len(compared)}", file=out)
    if any(r.categories != ("other",) for r in compared):
        print("\n".join(by_category(compared, kinds)), file=out)
    return 1 if disagree or failed else 0
