"""What releases an allocator that becomes unreachable without ``close()``.

``weakref.finalize`` calls :func:`finalize` with an :class:`Owned` that the allocator
shares (never the allocator itself, which would keep it alive): its pack pool,
its debug sinks and, if the allocator made it, its backend.  It releases them and
says so with a ``ResourceWarning``; ``close()`` marks it done first.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

from execmem import _forks
from execmem._backend import Backend
from execmem._errors import ExecmemError
from execmem._packs import PackPool
from execmem.debuginfo import DebugInfo


@dataclass
class Owned:
    """What the finalizer of an unreachable allocator releases (never the allocator)."""

    pool: PackPool
    backend: Backend | None  # owned by the allocator: closed with it
    debug: DebugInfo | None  # closed first: GDB forgets the texts before their memory goes
    closed: bool = False


def finalize(owned: Owned, generation: int) -> None:
    """An allocator was collected: release its memory, and say it was never closed."""
    if owned.closed or generation != _forks.generation:
        return
    live = sum(p.chunks.used.bit_count() for p in owned.pool.packs) * owned.pool.granularity
    warnings.warn(
        f"execmem.Allocator was never closed ({len(owned.pool.packs)} packs, {live} bytes of texts still "
        "allocated); its memory is released now: call close() or use it as a context manager",
        ResourceWarning,
        stacklevel=2,
    )
    owned.closed = True
    if owned.debug is not None:
        owned.debug.close()
    with contextlib.suppress(ExecmemError):
        owned.pool.close()
        if owned.backend is not None:
            owned.backend.close()


__all__ = ["Owned", "finalize"]
