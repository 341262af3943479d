"""Targets, the printed table, the Markdown page and the plot of ``execmem bench``."""

from __future__ import annotations

import textwrap
from typing import Any

from execmem._errors import ExecmemError
from execmem._plot import pyplot
from execmem.bench import _debuginfo
from execmem.bench._measure import describe_machine

BASELINE_NOTE = (
    "Both baselines are UNSAFE for other threads: they make no thread that may run the code "
    "take a serializing / context-synchronization event, and on arm64 they do no cache "
    "maintenance for anonymous memory; rwx-bump also gives up W^X. execmem does all three (syncs/fn)."
)


def _rows(report: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in report["publish"] if r["mode"] == mode]


def _row(report: dict[str, Any], n: int, mode: str) -> dict[str, Any]:
    return next(r for r in report["publish"] if r["n"] == n and r["mode"] == mode)


def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The brief's targets, evaluated at the largest N of the run (10,000 in a full run)."""
    n = max(r["n"] for r in report["publish"])
    batched, base = _row(report, n, "execmem-batched"), _row(report, n, "baseline")
    speed = base["seconds_per_function"] / batched["seconds_per_function"]
    va = base["address_space_per_function"] / batched["address_space_per_function"]
    exec_va = base["executable_address_space_per_function"] / batched["executable_address_space_per_function"]
    out: dict[str, dict[str, Any]] = {
        "batched_publish_10x_faster": {
            "pass": speed >= 10,
            "value": speed,
            "threshold": 10,
            "n": n,
            "detail": f"baseline {base['seconds_per_function'] * 1e6:.1f} us/fn, "
            f"batched {batched['seconds_per_function'] * 1e6:.1f} us/fn",
        },
        "address_space_50x_less": {
            "pass": va >= 50,
            "value": va,
            "threshold": 50,
            "n": n,
            "detail": f"all of the mode's mappings: {batched['address_space_per_function']:.0f} vs "
            f"{base['address_space_per_function']:.0f} B/fn; executable VA alone {exec_va:.1f}x; "
            f"chunks allocated {batched['footprint_per_function']:.0f} B/fn "
            f"({base['address_space_per_function'] / batched['footprint_per_function']:.1f}x)",
        },
    }
    syncs = {str(r["n"]): r["syncs"] for r in _rows(report, "execmem-batched")}
    out["one_sync_per_batch"] = {
        "pass": all(v == 1 for v in syncs.values()),
        "value": syncs,
        "threshold": 1,
        "detail": "remote_cse runs (membarrier) per published batch, idle second thread alive",
    }
    vmas = {f"{r['mode']} {r['n']}": r["vmas_own"] for r in report["publish"] if r["mode"].startswith("execmem")}
    out["vmas_flat_in_n"] = {
        "pass": len(set(vmas.values())) == 1,
        "value": vmas,
        "detail": "VMAs of execmem's own mappings after publishing N functions",
    }
    bad = [f"{r['mode']} {r['n']}" for r in report["publish"] if r["calls_ok"] != r["calls"]]
    out["every_function_returns_its_value"] = {"pass": not bad, "value": bad or "all", "detail": "one call each"}
    out.update(_hot_path_targets(report, n))
    return out


def _at_least(value: float, threshold: float, detail: str, n: int | None = None) -> dict[str, Any]:
    return {"pass": value >= threshold, "value": value, "threshold": threshold, "detail": detail, **({"n": n} if n else {})}


def _at_most(value: float, threshold: float, detail: str, n: int | None = None) -> dict[str, Any]:
    return {"pass": value <= threshold, "value": value, "threshold": threshold, "at_most": True, "detail": detail,
            **({"n": n} if n else {})}


def _hot_path_targets(report: dict[str, Any], n: int) -> dict[str, dict[str, Any]]:
    """Issue 12's targets: one-by-one publish, batched against both baselines, calls,
    churn and free (each where the report has what it needs)."""
    out: dict[str, dict[str, Any]] = {}
    rows = {r["mode"]: r for r in report["publish"] if r["n"] == n}
    base, one, batched, floor = (rows.get(m) for m in ("baseline", "execmem", "execmem-batched", "rwx-bump"))

    def us(row: dict[str, Any]) -> str:
        return f"{row['seconds_per_function'] * 1e6:.2f} us/fn"

    if base and one:
        out["one_by_one_publish_2x_faster"] = _at_least(
            base["seconds_per_function"] / one["seconds_per_function"], 2, f"baseline {us(base)}, execmem one by one {us(one)}", n
        )
    if base and batched:
        out["batched_publish_15x_faster"] = _at_least(
            base["seconds_per_function"] / batched["seconds_per_function"], 15, f"baseline {us(base)}, batched {us(batched)}", n
        )
    if floor and batched:
        out["batched_within_3x_of_rwx_floor"] = _at_most(
            batched["seconds_per_function"] / floor["seconds_per_function"], 3,
            f"time of batched / time of rwx-bump: batched {us(batched)}, rwx-bump {us(floor)}", n,
        )
    call = report.get("call")
    if call:
        out["call_within_1_5x_of_ctypes"] = _at_most(
            call["ratio"], 1.5, f"function() {call['function_ns_per_call']:.0f} ns, ctypes pointer {call['ctypes_ns_per_call']:.0f} ns"
        )
    churn = report.get("churn")
    if churn:
        out["churn_at_least_naive"] = _at_least(
            churn["ratio"], 1, f"execmem {churn['execmem_ops_per_second']:,.0f} ops/s, baseline {churn['baseline_ops_per_second']:,.0f} ops/s"
        )
    if base and one and one.get("free_seconds_per_function") and base.get("free_seconds_per_function"):
        free, munmap = one["free_seconds_per_function"], base["free_seconds_per_function"]
        out["free_at_most_munmap"] = _at_most(
            free / munmap, 1, f"time of free() / time of munmap: execmem {free * 1e6:.2f} us/fn, munmap {munmap * 1e6:.2f} us/fn", n
        )
    return out


# -- text --------------------------------------------------------------------------------------


def _size(value: float) -> str:
    return f"{value:,.0f}"


def table(report: dict[str, Any]) -> str:
    cfg, lines = report["config"], []
    lines.append(
        f"execmem bench: {cfg['arch']}, {cfg['mode']} ({cfg['backing']}), medians of {cfg['repeats']} repeats"
        f"{' (quick)' if cfg['quick'] else ''}"
    )
    lines.append(f"machine: {describe_machine(report['machine'])}")
    lines.append(
        f"execmem {cfg.get('execmem')} (git {cfg.get('revision') or 'unknown'}), remote_cse: {cfg.get('sync_mechanism')}, "
        f"huge pages obtained: {(cfg.get('huge_pages_obtained_bytes') or 0) >> 10} KiB"
    )
    lines.append("")
    lines.append("Publishing N functions of 16-64 bytes, with a second, idle Python thread alive (every")
    lines.append("measurement here has one), so that execmem's membarrier has another thread to serialize.")
    head = ("N", "mode", "us/fn", "vs base", "x floor", "VA B/fn", "exec VA", "chunks", "RSS B/fn", "PSS B/fn", "VMAs own", "VMAs proc", "syscalls/fn", "syncs/fn", "calls ok")
    rows = []
    for r in report["publish"]:
        rows.append(
            (
                f"{r['n']:,}",
                r["mode"],
                f"{r['seconds_per_function'] * 1e6:.2f}",
                f"{r['speedup_vs_baseline']:.2f}x",
                f"{r['times_rwx_floor']:.2f}",
                _size(r["address_space_per_function"]),
                _size(r["executable_address_space_per_function"]),
                _size(r["footprint_per_function"]),
                _size(r["rss_per_function"]),
                _size(r["pss_per_function"]),
                str(r["vmas_own"]),
                f"{r['vmas']} ({r['vmas_delta']:+d})",
                f"{r['syscalls_per_function']:.4f}",
                f"{r['syncs_per_function']:.4f}",
                f"{r['calls_ok']}/{r['calls']}",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    left = {1}
    for row in (head, *rows):
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  " + "  ".join(cells))
    lines.append("  us/fn: alloc + write + publish, per function (warm allocator: first pack mapped, membarrier registered).")
    lines.append("  vs base: speed-up over the baseline (mmap + write + mprotect each); x floor: time over rwx-bump's")
    lines.append("  (one RWX mapping, a bump pointer, a memmove each: the floor, with no W^X and no synchronization).")
    lines.append("  VA: bytes of all the mode's mappings (execmem: its packs, as mapped so far); exec VA: executable part;")
    lines.append("  chunks: bytes of pack chunks the functions took (the baseline: its pages), what more N would cost.")
    lines.append("  RSS, PSS: resident bytes of those mappings (PSS splits shared pages); VMAs own: VMAs of them;")
    lines.append("  VMAs proc: whole process after publishing (delta from before). syncs: remote_cse (membarrier) runs.")
    lines.extend(textwrap.wrap(BASELINE_NOTE, 104, initial_indent="  ", subsequent_indent="  "))
    largest = max(x["n"] for x in report["publish"])
    free = ", ".join(
        f"{r['mode']} {r['free_seconds_per_function'] * 1e6:.2f}" if r["free_seconds_per_function"] is not None
        else f"{r['mode']} - (never frees)"
        for r in report["publish"] if r["n"] == largest
    )
    lines.append(f"  free one by one, us/fn at N={largest:,} (baseline: munmap): {free}")
    c = report["churn"]
    lines.append("")
    lines.append(
        f"Alloc/free churn: {c['operations']:,} operations ({c['allocations']:,} allocations of 16..4096 bytes, "
        f"each written and published; frees of random live ones; seed {c['seed']}; an idle second thread alive)"
    )
    lines.append(
        f"  execmem {c['execmem_ops_per_second']:,.0f} ops/s, baseline {c['baseline_ops_per_second']:,.0f} ops/s "
        f"({c['ratio']:.2f}x), rwx-bump {c['rwx_ops_per_second']:,.0f} ops/s ({c['ratio_vs_rwx']:.2f}x); "
        f"syscalls/op {c['execmem_syscalls_per_op']:.4f} vs {c['baseline_syscalls_per_op']:.4f}"
    )
    lines.append(
        f"  peak executable VA: execmem {c['execmem_peak_executable_bytes'] >> 10:,} KiB, baseline "
        f"{c['baseline_peak_executable_bytes'] >> 10:,} KiB, rwx-bump {c['rwx_peak_executable_bytes'] >> 10:,} KiB (never reused)"
    )
    k = report["call"]
    lines.append("")
    lines.append(
        f"Call overhead ({k['calls']:,} calls of a published `return 42`, an idle second thread alive): "
        f"JitText.function {k['function_ns_per_call']:.0f} ns/call; plain ctypes pointer to the same text "
        f"{k['ctypes_ns_per_call']:.0f}, to the baseline's copy {k['baseline_ns_per_call']:.0f}, to rwx-bump's "
        f"{k['rwx_ns_per_call']:.0f} ns/call: function() is {k['ratio']:.2f}x a ctypes pointer "
        f"(+{k['function_ns_per_call'] - k['ctypes_ns_per_call']:.0f} ns for counting calls in flight)"
    )
    fork = report.get("fork")
    if fork:
        lines.append("")
        lines.append(
            f"os.fork() with N packs of 2 MiB mapped ({fork['mode']}; the parent copies the views for the child), "
            f"CPU time of the forking thread, medians of {fork['repeats']}:"
        )
        for row in fork["rows"]:
            extra = (
                f"; {row['extra_cpu_seconds_per_mib'] * 1e6:+.0f} us per MiB of views" if row["packs"] else ""
            )
            lines.append(
                f"  {row['packs']:>3} packs ({row['view_bytes'] >> 20:>3} MiB): {row['fork_cpu_seconds'] * 1e3:6.2f} ms "
                f"(the same packs unmapped: {row['fork_cpu_seconds_without_views'] * 1e3:.2f} ms{extra}); "
                f"fork + exit + wait {row['fork_wall_seconds'] * 1e3:.1f} ms wall"
            )
    if "debuginfo" in report:
        lines += ["", *_debuginfo.table_lines(report["debuginfo"])]
    emu, lit = report["emu"], report["litmus"]
    lines.append("")
    by = ", ".join(
        f"{a} {v['ratio']:.2f} ({v['model_mips']:.0f} vs {v['raw_mips']:.0f} M insn/s)" for a, v in emu["by_arch"].items()
    )
    lines.append(f"Modeled machine: non-racing guest throughput / raw Unicorn on the same code: {by}")
    lines.append(f"  emu_ratio_vs_raw = {report['emu_ratio_vs_raw']:.2f} (the minimum)")
    two = lit["two_thread"]
    lines.append(
        f"  exhaustive exploration, two-thread message passing with cache maintenance: "
        f"{two['seconds'] * 1000:.1f} ms ({two['final_states']} final states)"
    )
    cat = lit["catalog"]
    if cat.get("skipped"):
        lines.append(f"  litmus catalog: skipped ({cat['skipped']})")
    else:
        lines.append(
            f"  litmus catalog ({cat['tests']} of {cat['of']} tests): {cat['seconds']:.1f} s wall with "
            f"{cat['workers']} worker(s), {cat['cpu_seconds']:.1f} s of exploration, agree with herd7 "
            f"{cat['agree']}/{cat['compared']}, slowest {cat['slowest']}"
        )
    lines.append("")
    lines.append("Targets")
    for name, t in report["targets"].items():
        value = t["value"]
        shown = f"{value:.2f}x" if isinstance(value, float) else str(value)
        at = f" at N={t['n']:,}" if "n" in t else ""
        need = f" (need {'<=' if t.get('at_most') else '>='} {t['threshold']}x)" if isinstance(value, float) else ""
        lines.append(f"  {'PASS' if t['pass'] else 'FAIL'} {name}{at}: {shown}{need}; {t['detail']}")
    return "\n".join(lines)


def markdown(report: dict[str, Any], command: str, text: str, plot: str | None) -> str:
    out = [
        "# execmem benchmark",
        "",
        "Generated by the command below; the table is its output, unedited.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {describe_machine(report['machine'])}.",
        "",
        "```",
        text,
        "```",
    ]
    if plot:
        out += ["", f"![time and address space per function vs N]({plot})"]
    out += [
        "",
        "How to read it:",
        "",
        "- *VA B/fn* divides everything mapped by N. A pack is a 2 MiB slot of which execmem maps",
        "  only what its texts need, in 64 KiB steps, growing the same mapping in place, and dual",
        "  mode writes with pwrite, so there is no writable alias to count: past the first step,",
        "  each function costs about its 64-byte chunk (64x less than a page). *chunks* is that",
        "  cost without the rounding; the baseline pays a 4 KiB page per function whatever N is.",
        "- *us/fn* is wall time of allocate + write + publish. *execmem-batched* is one",
        "  `jit_text_alloc_many` and one `publish(texts, codes)`: one placement, one store per run of",
        "  adjacent texts, one synchronization. What it still spends per function is CPython's: the",
        "  handle object and its share of garbage collection, checking the text, and joining its code",
        "  into the run's one store. The baseline spends its time in two system calls. One by one,",
        "  execmem also runs a membarrier per function, which the baseline skips - and needs, to be",
        "  safe with other threads running.",
        "- *rwx-bump* is the floor: a memmove into one read+write+execute mapping. *x floor* is how",
        "  many times its time a mode takes.",
        "- *free one by one* is `free()` per text (trap refill, quarantine) against the baseline's",
        "  `munmap`; the floor never frees (its churn keeps every byte it ever handed out).",
        "- *os.fork()* is the forking thread's CPU time: in dual mode the parent copies every mapped",
        "  view for the child, which keeps the code as it was at fork (docs/reliability.md).",
        "- Targets are checked at the largest N and printed; none is asserted by the test suite.",
    ]
    return "\n".join(out) + "\n"


# -- plot --------------------------------------------------------------------------------------

_STYLE = {
    "execmem": ("tab:blue", "o"),
    "execmem-batched": ("tab:green", "s"),
    "baseline": ("tab:red", "^"),
    "rwx-bump": ("tab:gray", "v"),
}
_LABEL = {
    "execmem": "execmem, one by one",
    "execmem-batched": "execmem, one batch",
    "baseline": "baseline: mmap+mprotect each",
    "rwx-bump": "floor: one RWX mapping, bump pointer (no W^X)",
}


def plot(report: dict[str, Any], path: str) -> None:
    """Time and address space per function against N, as a PNG (needs matplotlib)."""
    plt = pyplot("--plot")
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for mode, (color, marker) in _STYLE.items():
        rows = sorted(_rows(report, mode), key=lambda r: r["n"])
        ns = [r["n"] for r in rows]
        style = {"marker": marker, "color": color, "label": _LABEL[mode], "linestyle": "--" if mode == "execmem" else "-"}
        left.plot(ns, [r["seconds_per_function"] * 1e6 for r in rows], **style)
        right.plot(ns, [r["address_space_per_function"] for r in rows], markersize=9 if mode == "execmem" else 6, **style)
    left.set_title("time to publish, per function")
    left.set_ylabel("microseconds")
    right.set_title("address space mapped, per function (one by one = batch)")
    right.set_ylabel("bytes (all mappings)")
    plain = FuncFormatter(lambda value, _pos: f"{value:,.0f}" if value >= 1 else f"{value:g}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            axis.set_minor_formatter(plain)
        ax.set_xlabel("N functions published")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"execmem {cfg['mode']} vs mmap+mprotect per function and an RWX bump pointer ({cfg['arch']}, medians of {cfg['repeats']})", fontsize=10)
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ExecmemError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


__all__ = ["BASELINE_NOTE", "markdown", "plot", "table", "targets"]
