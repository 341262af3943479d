"""Measuring helpers for the benchmark: memory of given ranges, VMA counts, the
machine description and medians."""

from __future__ import annotations

import os
import platform
import statistics
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

from execmem._ranges import Range, coalesce
from execmem.native import _procmaps


def memory_of(ranges: Sequence[Range]) -> dict[str, int]:
    """Address space, VMAs, Rss and Pss of the mappings covering ``ranges``
    (from ``/proc/self/smaps``).  Pss counts a page mapped twice (dual mapping's two
    views) once; Rss counts it per mapping, as the kernel's RSS counter does."""
    merged = coalesce(ranges)
    totals = _procmaps.smaps_totals(merged) if merged else {"vmas": 0}
    return {
        "address_space": sum(size for _, size in merged),
        "vmas": totals.get("vmas", 0),
        "rss": totals.get("Rss", 0),
        "pss": totals.get("Pss", 0),
    }


def process_rss() -> int:
    """Resident bytes of the whole process (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def count_vmas() -> int:
    return _procmaps.count_vmas()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@contextmanager
def idle_thread() -> Iterator[threading.Thread]:
    """A second Python thread that only waits, alive for the ``with`` block.

    execmem skips membarrier while the process has one thread (nothing else can hold
    stale instructions); with this thread alive every ``remote_cse`` really runs.
    """
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="execmem-bench-idle", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpuinfo = _read("/proc/cpuinfo")
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.lower().startswith(("model name", "cpu model"))),
        platform.processor() or "unknown",
    )
    flags = next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")
    meminfo = _read("/proc/meminfo").split()
    mem = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024 if "MemTotal:" in meminfo else 0
    thp = _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled").strip()
    return {
        "arch": platform.machine(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "virtualized": "hypervisor" in flags.split(),
        "memory_bytes": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "thp_shmem": thp or None,
    }


def revision() -> str | None:
    """``git describe`` of the checkout holding this package (``+changes`` when its
    ``execmem/`` differs from the commit), or None outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "execmem"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+changes" if dirty else head


def describe_machine(info: dict[str, object]) -> str:
    mem = cast(int, info.get("memory_bytes") or 0) / 2**30
    vm = ", virtual machine" if info.get("virtualized") else ""
    return (
        f"{info['arch']}, {info['cpu']}, {info['cpus']} CPUs{vm}, {mem:.1f} GiB, "
        f"{info['kernel']}, {info['python']}"
    )


__all__ = [
    "count_vmas",
    "describe_machine",
    "idle_thread",
    "machine",
    "median",
    "memory_of",
    "process_rss",
    "revision",
]
