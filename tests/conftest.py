"""Shared fixtures and hypothesis profiles.

``EXECMEM_FULL=1`` makes the "execmem" hypothesis profile thorough (more examples,
longer state-machine runs); the default is quick, seeded (derandomized) and part of
every ``make test``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import execmem
from execmem._memory_backend import MemoryBackend
from execmem.bench._measure import idle_thread

# Not loaded globally (other test files keep hypothesis' defaults): execmem's own
# property tests use ``settings(parent=settings.get_profile("execmem"))``.
_QUICK = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
_FULL = settings(max_examples=600, stateful_step_count=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("execmem", _FULL if os.environ.get("EXECMEM_FULL") else _QUICK)

MakeAllocator = Callable[..., tuple[MemoryBackend, execmem.Allocator]]


@pytest.fixture
def make_allocator() -> Iterator[MakeAllocator]:
    """``make_allocator(arch=None, write_unit=1, cache_features=(), **allocator_kw)``
    (``arch`` a name or an ``ArchSpec``, e.g. a mutation built with ``with_recipes``)
    -> (MemoryBackend, Allocator); everything is closed at teardown."""
    made: list[tuple[MemoryBackend, execmem.Allocator]] = []

    def make(arch: str | execmem.arch.ArchSpec | None = "x86_64", *, write_unit: int = 1, cache_features: tuple[str, ...] = (),
             **kw: Any) -> tuple[MemoryBackend, execmem.Allocator]:
        backend = MemoryBackend(arch, write_unit=write_unit, cache_features=cache_features)
        allocator = execmem.Allocator(backend=backend, **kw)
        made.append((backend, allocator))
        return backend, allocator

    yield make
    for backend, allocator in made:
        allocator.close()
        backend.close()


@pytest.fixture
def other_thread() -> Iterator[None]:
    """A second, idle thread: membarrier then has another thread to serialize, as in
    a real JIT (a single-threaded process returns from it at once)."""
    with idle_thread():
        yield
