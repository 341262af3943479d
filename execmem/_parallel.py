"""Independent jobs of the modeled machine (litmus tests, verification variants) run
in worker processes, on a Dask cluster, or in this process.

Workers start fresh interpreters ("spawn"): Unicorn instances must not cross a fork.
Results come back in the order of the items, whatever order they finish in;
``done`` is told each one as it arrives (a progress line).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from execmem._errors import ExecmemError

Item = TypeVar("Item", bound=Hashable)
Result = TypeVar("Result")


def run_jobs(
    job: Callable[[Item], Result],
    items: Sequence[Item],
    *,
    jobs: int = 0,
    scheduler: str | None = None,
    done: Callable[[Item, Result], None] | None = None,
) -> list[Result]:
    """``job(item)`` for every item: on the Dask cluster at ``scheduler``, else in
    ``jobs`` worker processes (0: one per CPU; 1, or a single item: this process).
    ``job`` must be picklable (a module-level function or a ``functools.partial``)."""
    workers = jobs or os.cpu_count() or 1
    results: dict[Item, Result] = {}

    def arrived(item: Item, result: Result) -> None:
        results[item] = result
        if done is not None:
            done(item, result)

    if scheduler:
        try:
            from distributed import Client, as_completed
        except ImportError:
            raise ExecmemError("--scheduler needs Dask: pip install 'execmem[dask]'") from None
        with Client(scheduler) as client:
            futures = {client.submit(job, item, pure=False): item for item in items}
            for future in as_completed(futures):
                arrived(futures[future], future.result())
    elif workers == 1 or len(items) == 1:
        for item in items:
            arrived(item, job(item))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending = {pool.submit(job, item): item for item in items}
            for future in concurrent.futures.as_completed(pending):
                arrived(pending[future], future.result())
    return [results[item] for item in items]


__all__ = ["run_jobs"]
