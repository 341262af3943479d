"""What releases an allocator that becomes unreachable without ``close()``.

``weakref.finalize`` calls :func:`finalize` with an :class:`Owned` that the allocator
shares (never the allocator itself, which would keep it alive): its pack pool and,
if the allocator made it, its backend.  It releases them and says so with a
``ResourceWarning``; ``close()`` marks it done first.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

from execmem._backend import Backend
from execmem._errors import ExecmemError
from execmem._packs import PackPool


@dataclass
class Owned:
    """What the finalizer of an unreachable allocator releases (never the allocator)."""

    pool: PackPool
    backend: Backend | None  # owned by the allocator: closed with it
    closed: bool = False


def finalize(owned: Owned, pid: int) -> None:
    """An allocator was collected: release its memory, and say it was never closed."""
    if owned.closed or pid != os.getpid():
        return
    live = sum(p.chunks.used.bit_count() for p in owned.pool.packs) * owned.pool.granularity
    warnings.warn(
        f"execmem.Allocator was never closed ({len(owned.pool.packs)} packs, {live} bytes of texts still "
        "allocated); its memory is released now: call close() or use it as a context manager",
        ResourceWarning,
        stacklevel=2,
    )
    owned.closed = True
    with contextlib.suppress(ExecmemError):
        owned.pool.close()
        if owned.backend is not None:
            owned.backend.close()


__all__ = ["Owned", "finalize"]
