"""``python -m execmem.bench.soak [--ops N] [--mode dual|mprotect] [--sample-every K] [--json] [--seed S] [--quiet]``

Why: the test suite runs thousands of operations, but a leak of one VMA, one file
descriptor or a few hundred bytes per publish only shows after a million.  This
runs a seeded mix of alloc / write / publish (single, ``publish([...])``,
``batch()``, in place) / live update (dual mode) / call-and-check / free against
one allocator, keeping at most ``--max-live`` texts (default 2,000), and every K
operations samples the process's RSS, VMAs, execmem's VMAs and open fds, and looks
for writable+executable mappings over everything the backend owns (or named
execmem).  The verdict compares the mean of the last quarter of samples with the
second quarter (the first is warm-up): "bounded" when RSS grew by less than 10% or
4 MiB and the VMA and fd counts did not grow.  Exit status 1 on unbounded growth, a
wrong call result, a W+X observation or anything left mapped after ``close``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from typing import Any

from execmem import _gates
from execmem._allocator import Allocator
from execmem._errors import UnsupportedError
from execmem._gates import JitFunction
from execmem._progress import Progress, Step, set_quiet
from execmem._text import JitText
from execmem.bench._measure import idle_thread, process_rss
from execmem.native import NativeBackend, _procmaps

KEYS = ("rss", "vmas", "execmem_vmas", "fds", "live", "packs")
RSS_TOLERANCE = (0.10, 4 << 20)  # relative, absolute (bytes): the larger one applies
COUNT_TOLERANCE = (0.05, 2)  # VMAs and fds may not grow by more than this


def const_fn(value: int, size: int = 6) -> bytes:
    """``mov eax, value; ret`` padded with int3 to ``size`` bytes (x86-64)."""
    return (b"\xb8" + (value & 0xFFFFFFFF).to_bytes(4, "little") + b"\xc3").ljust(size, b"\xcc")


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.70:
        return rng.randint(6, 128)
    if r < 0.90:
        return rng.randint(129, 1024)
    return rng.randint(1025, 4096) if r < 0.98 else rng.randint(4097, 12288)


def execmem_vmas(owned: list[tuple[int, int]], vmas: list[_procmaps.Vma]) -> list[_procmaps.Vma]:
    """VMAs named after execmem or overlapping a range the backend owns."""
    return [v for v in vmas if "execmem" in v.path or any(v.overlaps(s, n) for s, n in owned)]


def sample(a: Allocator, op: int, live: int, touched: set[tuple[int, int]]) -> tuple[dict[str, int], list[str]]:
    """One sample, and every W+X mapping seen (over owned ranges, or named execmem)."""
    backend = a.backend
    assert isinstance(backend, NativeBackend)
    vmas = _procmaps.read_maps()
    owned = backend.owned_ranges()
    touched.update(owned)
    ours = execmem_vmas(owned, vmas)
    wx = [f"op {op}: {v}" for v in _procmaps.wx_violations(None, ours)]
    packs = len(a._pool.packs) + len(a._pool.retired)
    row = {"op": op, "rss": process_rss(), "vmas": len(vmas), "execmem_vmas": len(ours),
           "fds": len(os.listdir("/proc/self/fd")), "live": live, "packs": packs}
    return row, wx


def verdict(samples: list[dict[str, int]]) -> dict[str, Any]:
    """Second quarter (after warm-up) against the last quarter of the samples."""
    n = len(samples)
    if n < 8:
        return {"bounded": False, "why": f"too few samples ({n} < 8) to judge growth"}
    q2, q4 = samples[n // 4 : n // 2], samples[3 * n // 4 :]
    out: dict[str, Any] = {"bounded": True, "why": []}
    for key in ("rss", "vmas", "execmem_vmas", "fds"):
        before = statistics.fmean(s[key] for s in q2)
        after = statistics.fmean(s[key] for s in q4)
        rel, absolute = RSS_TOLERANCE if key == "rss" else COUNT_TOLERANCE
        allowed = max(rel * before, absolute)
        out[key] = {"q2_mean": round(before, 1), "q4_mean": round(after, 1), "growth": round(after - before, 1),
                    "allowed": round(allowed, 1)}
        if after - before > allowed:
            out["bounded"] = False
            out["why"].append(f"{key} grew by {after - before:.1f} (allowed {allowed:.1f})")
    out["why"] = "; ".join(out["why"]) or "no growth beyond tolerance"
    return out


def run_soak(ops: int = 1_000_000, mode: str = "dual", sample_every: int | None = None, *, seed: int = 0,
             max_live: int = 2000, note: Step | None = None) -> dict[str, Any]:
    """Run the soak in this process and return the report (see the module docstring);
    ``note`` is shown each sample (a progress line)."""
    every = sample_every or max(1, ops // 200)
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    wrong: list[str] = []
    wx: list[str] = []
    samples: list[dict[str, int]] = []
    touched: set[tuple[int, int]] = set()
    before = execmem_vmas([], _procmaps.read_maps())
    a = Allocator(backend=NativeBackend(mode))
    patchable = mode == "dual"
    live: list[tuple[JitText, JitFunction, list[int]]] = []
    serial = 0
    started = time.perf_counter()

    def fresh(n: int) -> list[tuple[JitText, int]]:
        nonlocal serial
        out = []
        for _ in range(n):
            serial += 1
            size = _size(rng)
            t = a.jit_text_alloc(size)
            t.write(0, const_fn(serial, size))
            out.append((t, serial))
        return out

    def adopt(made: list[tuple[JitText, int]]) -> None:
        live.extend((t, t.function(ctypes.c_int), [v]) for t, v in made)

    with idle_thread():  # a second thread: every remote_cse really runs membarrier
        for op in range(ops):
            if op % every == 0:
                row, seen = sample(a, op, len(live), touched)
                samples.append(row)
                wx += seen
                if note is not None:
                    note(f"soak {mode}: op {op:,}/{ops:,}, rss {row['rss'] / 2**20:.1f} MiB, vmas {row['vmas']}, "
                         f"execmem vmas {row['execmem_vmas']}, fds {row['fds']}, live {row['live']}, "
                         f"{op / max(time.perf_counter() - started, 1e-9):,.0f} ops/s")
            r = rng.random()
            if r < 0.45 and live:
                t, fn, values = live[rng.randrange(len(live))]
                got = fn()
                counts["calls_checked"] += 1
                if got != values[-1]:
                    wrong.append(f"op {op}: {t!r} returned {got}, expected {values[-1]}")
            elif r < 0.50 and live and patchable:
                t, fn, values = live[rng.randrange(len(live))]
                serial += 1
                t.update(0, const_fn(serial)[:5])  # mov eax, imm32 only
                values.append(serial)
                counts["updates"] += 1
            elif r < 0.52:
                fresh(1)[0][0].free()  # never published: no quarantine
                counts["unpublished_frees"] += 1
            elif rng.random() < 1 - len(live) / max_live:
                kind = rng.random()
                n = 1 if kind < 0.6 else min(rng.randint(2, 8), max_live - len(live))
                made = fresh(n)
                if kind < 0.45:
                    made[0][0].map()
                    counts["maps"] += 1
                elif kind < 0.6:
                    t = made[0][0]
                    try:
                        t.map_rw_inplace()
                    except UnsupportedError:  # mprotect: it shares a page with another text
                        t.map()
                        counts["inplace_refused"] += 1
                    else:
                        t.write(0, t.read())
                        t.finalize()
                        counts["inplace"] += 1
                elif kind < 0.8:
                    a.publish([t for t, _ in made])
                    counts["publish_batches"] += 1
                else:
                    with a.batch():
                        for t, _ in made:
                            t.map()
                    counts["batch_blocks"] += 1
                counts["published"] += len(made)
                adopt(made)
            elif live:
                k = rng.randrange(len(live))
                live[k], live[-1] = live[-1], live[k]
                live.pop()[0].free()
                counts["frees"] += 1
        row, seen = sample(a, ops, len(live), touched)
        samples.append(row)
        wx += seen
    elapsed = time.perf_counter() - started
    stats = a.stats()
    a.close()
    # Anonymous read+write memory over a released range may be Python's own by now;
    # the process's call gates (one allocator, never closed) are not this allocator's.
    gates = _gates.allocator_of_gates()
    kept = [] if gates is None else gates.backend.owned_ranges()  # type: ignore[attr-defined]
    after = execmem_vmas(sorted(touched), _procmaps.read_maps())
    leftover = [str(v) for v in after if v not in before and (v.perms, v.path) != ("rw-p", "")
                and not any(v.overlaps(s, n) for s, n in kept)]
    judged = verdict(samples)
    ok = judged["bounded"] and not wrong and not wx and not leftover
    return {
        "config": {"ops": ops, "mode": mode, "sample_every": every, "seed": seed, "max_live": max_live},
        "elapsed_s": round(elapsed, 2), "ops_per_s": round(ops / elapsed) if elapsed else None,
        "counts": dict(counts), "wrong": wrong, "wx": wx, "left_mapped_after_close": leftover,
        "events": stats["events"], "epochs": stats["epochs"], "samples": samples, "verdict": judged, "ok": ok,
    }


def table(report: dict[str, Any]) -> str:
    """Samples first / middle / last / max, then the verdict."""
    s = report["samples"]
    rows = {"first": s[0], "middle": s[len(s) // 2], "last": s[-1], "max": {k: max(x[k] for x in s) for k in KEYS}}
    lines = [f"{'sample':<8}{'op':>10}{'rss MiB':>10}{'vmas':>7}{'execmem':>9}{'fds':>5}{'live':>6}{'packs':>7}"]
    for name, x in rows.items():
        op = f"{x['op']:,}" if "op" in x else "-"
        lines.append(f"{name:<8}{op:>10}{x['rss'] / 2**20:>10.1f}{x['vmas']:>7}{x['execmem_vmas']:>9}"
                     f"{x['fds']:>5}{x['live']:>6}{x['packs']:>7}")
    c, v, cfg = report["counts"], report["verdict"], report["config"]
    lines.append(f"ops {cfg['ops']:,} ({cfg['mode']}, seed {cfg['seed']}) in {report['elapsed_s']} s "
                 f"({report['ops_per_s']:,} ops/s); {len(s)} samples every {cfg['sample_every']:,} ops")
    lines.append(f"published {c.get('published', 0):,}, calls checked {c.get('calls_checked', 0):,}, "
                 f"updates {c.get('updates', 0):,}, frees {c.get('frees', 0) + c.get('unpublished_frees', 0):,}, "
                 f"epochs {report['epochs']['completed']:,}")
    if "rss" in v:
        mib = {k: (v["rss"][k] / 2**20) for k in ("q2_mean", "q4_mean", "allowed")}
        lines.append(f"mean of 2nd -> last quarter: rss {mib['q2_mean']:.1f} -> {mib['q4_mean']:.1f} MiB "
                     f"(allowed +{mib['allowed']:.1f}), " + ", ".join(
                         f"{k} {v[k]['q2_mean']:g} -> {v[k]['q4_mean']:g}" for k in ("vmas", "execmem_vmas", "fds")))
    lines.append(f"wrong results {len(report['wrong'])}, W+X seen {len(report['wx'])}, "
                 f"left mapped after close {len(report['left_mapped_after_close'])}")
    lines.append(f"verdict: {'bounded' if v['bounded'] else 'UNBOUNDED'} ({v['why']}); "
                 f"{'PASS' if report['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m execmem.bench.soak", description=__doc__.split("\n\n")[1])
    p.add_argument("--ops", type=int, default=1_000_000, help="operations to run (default: 1,000,000)")
    p.add_argument("--mode", choices=("dual", "mprotect"), default="dual", help="native mode (default: dual)")
    p.add_argument("--sample-every", type=int, metavar="K", help="sample every K ops (default: ops/200)")
    p.add_argument("--max-live", type=int, default=2000, help="bound on live texts (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    args = p.parse_args(argv)
    if args.ops < 1 or (args.sample_every is not None and args.sample_every < 1) or args.max_live < 8:
        p.error("--ops and --sample-every must be positive, --max-live at least 8")
    if args.quiet:
        set_quiet(True)
    with Progress(0) as progress:
        report = run_soak(args.ops, args.mode, args.sample_every, seed=args.seed, max_live=args.max_live,
                          note=progress.note)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
