"""Synchronization for code that execmem did not write: ``sync_code`` and
``serialize_all_threads``.

A JIT built on another library (llvmlite, numba, a plain ``mmap``) writes its code
itself but still needs the host's publish recipe over it, as wasmtime's
``jit-icache-coherence`` offers to Rust JITs.  The recipe is the architecture's own
``publish`` (the one the allocator runs for its texts: one recipe per architecture)
minus its ``write`` and ``map`` steps, which belong to memory execmem manages:

* arm64: ``DC CVAU`` over the lines (skipped when CTR_EL0.IDC=1), ``DSB ISH``,
  ``IC IVAU`` (skipped when DIC=1), ``DSB ISH``, ``ISB``, then every other thread
  takes a context-synchronization event (membarrier SYNC_CORE; Arm ARM B2.2.5);
* x86-64: a serializing instruction here and on every other thread (SDM Vol. 3
  8.1.3, cross-modifying code);
* riscv64: ``fence rw,rw``, ``fence.i`` and the remote ``fence.i``.

Cache maintenance by address faults on a page that is not mapped readable (the
kernel would deliver SIGSEGV), so the range is checked first with
``Backend.readable`` (``/proc/self/maps`` natively).  The remote step is one
synchronization epoch of the allocator: it also matures its quarantined space.
Neither verb changes any allocator state but the epoch counters, whose interrupted
update the next epoch completes (``_packs``): there is nothing to undo.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from execmem import _checks, _recipes
from execmem._errors import OutOfBoundsError
from execmem.arch import Recipe

if TYPE_CHECKING:
    from execmem._allocator import Allocator

#: Steps of a publish recipe that act on execmem's own memory, not on foreign code.
_OWN_STEPS = frozenset({"write", "map"})


def sync_recipe(publish: Recipe) -> Recipe:
    """The architecture's ``publish`` recipe without the steps that write or map."""
    return Recipe("sync_code", tuple(s for s in publish.steps if s.name not in _OWN_STEPS))


def sync_code(allocator: Allocator, address: object, length: object) -> None:
    """See :meth:`execmem.Allocator.sync_code`."""
    start = _checks.integer("address", address)
    size = _checks.positive_size(length, "length")
    if start < 0 or start + size > 1 << 64:
        raise OutOfBoundsError(f"[{start:#x}, {start + size:#x}) is not a range of addresses")
    with allocator._lock:
        allocator._begin()
        backend = allocator.backend
        if not backend.readable(start, size):
            raise OutOfBoundsError(
                f"sync_code: [{start:#x}, {start + size:#x}) is not entirely mapped readable "
                "in this address space; cache maintenance there would fault"
            )
        pool = allocator._pool
        group = _recipes.Group(sync_recipe(allocator.arch.publish), [(start, size)])
        _recipes.run(
            backend,
            [group],
            remote_cse=pool.remote_cse,
            steps=allocator._steps,
            recipes=allocator._recipe_runs,
        )


def serialize_all_threads(allocator: Allocator) -> None:
    """See :meth:`execmem.Allocator.serialize_all_threads`."""
    with allocator._lock:
        allocator._begin()
        allocator._pool.remote_cse([])
        allocator._steps["remote_cse"] += 1
