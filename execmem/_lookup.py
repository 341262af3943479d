"""Which text holds an address: ``execmem.text_at`` and ``Allocator.text_at``.

A crash handler, a sampling profiler or a debugger helper has an address and wants
the text: ``text_at`` answers for every allocator of the process, from any thread.

It costs nothing on the allocation paths.  Each allocator gets a sorted index of its
texts (start addresses and weak references, so a freed text is never kept alive),
built on demand and never updated in place.  A lookup bisects the index and trusts
what it finds only if that text is still unfreed and its chunks cover the address:
chunks belong to one text at a time, so the answer is then exact.  Otherwise the
address's chunk is looked up in its pack's chunk map, and the index is rebuilt only
when that chunk is in use (a text allocated since the index was built).  Addresses in
no pack, in free chunks or in padding never rebuild anything.
"""

from __future__ import annotations

import bisect
import weakref
from typing import TYPE_CHECKING, TypeGuard

from execmem import _checks
from execmem._locks import SetupLock
from execmem._text import JitText, TextState

if TYPE_CHECKING:
    from execmem._allocator import Allocator
    from execmem._packs import Pack

_FREED = TextState.FREED

#: Every allocator of the process, weakly (an allocator registers itself when made).
_allocators: weakref.WeakSet[Allocator] = weakref.WeakSet()
#: A re-entrant lock: adding or copying the set is one statement, safe to nest.
_allocators_lock = SetupLock("the allocator registry")


class _Index:
    """Texts of one allocator sorted by address, held weakly."""

    __slots__ = ("refs", "starts")

    def __init__(self, texts: list[JitText]) -> None:
        self.starts = [t._address for t in texts]
        self.refs = [weakref.ref(t) for t in texts]

    def candidate(self, address: int) -> JitText | None:
        """The text starting at or before ``address`` when the index was built."""
        i = bisect.bisect_right(self.starts, address) - 1
        return self.refs[i]() if i >= 0 else None


#: One index per allocator; dropped with the allocator.
_indexes: weakref.WeakKeyDictionary[Allocator, _Index] = weakref.WeakKeyDictionary()


def register(allocator: Allocator) -> None:
    """Make ``allocator`` visible to :func:`text_at`."""
    with _allocators_lock:
        _allocators.add(allocator)


def _sorted(allocator: Allocator) -> list[JitText]:
    return sorted((t for t in allocator._texts if t._state is not _FREED), key=lambda t: t._address)


def texts_of(allocator: Allocator) -> list[JitText]:
    """``allocator``'s texts in any state but FREED, in address order."""
    with allocator._lock:
        return _sorted(allocator)


def _covers(text: JitText | None, allocator: Allocator, address: int) -> TypeGuard[JitText]:
    """Whether the unfreed ``text`` of ``allocator`` owns the chunk holding ``address``."""
    if text is None or text._state is _FREED or text._allocator is not allocator:
        return False
    base = text._pack.address
    gran = allocator.granularity
    return base + text._chunk * gran <= address < base + (text._chunk + text._nchunks) * gran


def _answer(text: JitText, address: int) -> JitText | None:
    return text if text._address <= address < text._address + text._size else None


def _pack_at(allocator: Allocator, address: int) -> Pack | None:
    gran = allocator.granularity
    for pack in allocator._pool.packs:
        if pack.address <= address < pack.address + pack.chunks.n * gran:
            return pack
    return None


def find(allocator: Allocator, address: int) -> JitText | None:
    """The unfreed text of ``allocator`` whose bytes hold ``address`` (under its lock)."""
    index = _indexes.get(allocator)
    if index is not None:
        text = index.candidate(address)
        if _covers(text, allocator, address):
            return _answer(text, address)
    pack = _pack_at(allocator, address)
    if pack is None:
        return None
    chunk = (address - pack.address) // allocator.granularity
    if not pack.chunks.used >> chunk & 1:
        return None
    index = _indexes[allocator] = _Index(_sorted(allocator))
    text = index.candidate(address)
    # A used chunk no unfreed text covers belongs to a text whose free waits for its
    # last call to return (``_freeing``'s pinned texts): it holds nothing any more.
    return _answer(text, address) if _covers(text, allocator, address) else None


def text_at(address: int) -> JitText | None:
    """The text (in any state but FREED) whose bytes hold ``address`` in this process,
    in any of its allocators, or ``None``.  Allocators that are closed, belong to the
    parent of a forked process, or whose addresses are not this process's (the
    modeled machine's) hold nothing here: ask them with ``Allocator.text_at``."""
    address = _checks.integer("address", address)
    with _allocators_lock:
        allocators = [a for a in _allocators if a.backend.callable_in_process]
    for allocator in allocators:
        found = allocator._text_at(address)
        if found is not None:
            return found
    return None


__all__ = ["find", "register", "text_at", "texts_of"]
