"""Freeing: a text's chunks given back, at once or once its calls have returned.

:class:`Freeing` holds what freeing reads and changes (the backend, the pack pool,
the allocator's texts, pinned texts and counters) and does the work of ``free()`` and
of the end of a ``batch()`` that frees; the allocator keeps the verbs (lock, checks,
commit).  A free registers its undo first (``_interrupts``); then the text is FREED
and its call gates retired (``_gates``): with no call in flight its chunks go back to
the pack at once, quarantined if the pack was mapped, and are refilled with traps
at the next epoch (``_packs``); with calls in flight the text is *pinned* and
reclaimed by the first verb that finds its count at zero (:meth:`Freeing.poll`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial

from execmem import _gates, debuginfo
from execmem._backend import Backend
from execmem._interrupts import uninterrupted
from execmem._packs import Pack, PackPool
from execmem._publishing import begin_inplace, end_inplace
from execmem._text import JitText, TextState

_RESERVED, _WRITING, _FREED = TextState.RESERVED, TextState.WRITING, TextState.FREED


@dataclass
class Freeing:
    """See the module docstring."""

    backend: Backend
    pool: PackPool
    #: The allocator's texts not freed, and its freed texts with calls in flight.
    texts: set[JitText]
    pinned: list[JitText]
    events: Counter[str]
    #: Told of a pinned text's free once its last call has returned (the allocator
    #: tells it of the others when their free commits).
    debug: debuginfo.DebugInfo | None

    def now(self, text: JitText, undo: list[Callable[[], None]]) -> None:
        """``text`` FREED, its undo appended to ``undo`` first; its chunks given back
        now, or once the calls in flight have returned."""
        previous = text._state
        writable = [text] if previous is _WRITING else []
        events = self.events
        undo.append(partial(self._undo, text, previous, text._pack.chunks.snapshot(), events["freed"], writable))
        running = _gates.retire(text)
        text._state, text._freed_from = _FREED, previous
        self.texts.discard(text)
        events["freed"] += 1
        if running:
            self.pinned.append(text)
            events["frees_deferred"] += 1
            return
        self._reclaim(text, previous, writable)

    def after(self, packs: Collection[Pack], *, refill: bool = False) -> None:
        """Housekeeping once frees committed: ``refill``, the trap refill their verb's
        epoch left to this point (otherwise it comes with the next epoch, ``_packs``);
        retiring a pack they emptied."""
        if refill:
            for pack in packs:
                if pack.chunks.dirty:
                    uninterrupted(self.pool.refill_quietly, pack)
        for pack in packs:
            if not pack.chunks.used:  # only an empty pack can be one too many
                self.pool.trim_quietly()
                return

    def poll(self) -> None:
        """Reclaim the pinned texts whose calls have all returned."""
        for text in [t for t in self.pinned if not _gates.in_flight(t)]:
            uninterrupted(self._reclaim_pinned, text)

    def _reclaim(self, text: JitText, previous: TextState, writable: list[JitText]) -> None:
        """Give a freed text's chunks back, marked for a refill if code was written."""
        if writable:
            uninterrupted(end_inplace, self.backend, text, writable)
        self.pool.free(text._pack, text._chunk, text._nchunks, dirty=previous is not _RESERVED)
        text._gates = None  # drop the cached gates: the callables keep theirs

    def _reclaim_pinned(self, text: JitText) -> None:
        """The last call of a pinned text returned (run uninterrupted: all or nothing)."""
        if text in self.pinned:
            previous = text._freed_from
            self._reclaim(text, previous, [text] if previous is _WRITING else [])
            self.pinned.remove(text)
            if self.debug is not None:
                self.debug.freed(text)  # only now: the code ran until the last call returned
            self.after((text._pack,))

    def _undo(self, text: JitText, previous: TextState, snapshot: tuple[object, ...], freed: int, writable: list[JitText]) -> None:
        """Undo of a free: the text as it was (idempotent)."""
        if previous is _WRITING and not writable:
            uninterrupted(begin_inplace, self.backend, text, writable)
        text._pack.chunks.restore(snapshot)
        if text in self.pinned:
            self.pinned.remove(text)
        self.events["freed"] = freed
        text._state = previous
        self.texts.add(text)
        _gates.revive(text)


__all__ = ["Freeing"]
