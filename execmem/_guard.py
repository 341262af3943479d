"""Locks for code that a Python signal handler or a fork may interrupt.

A Python signal handler runs in the main thread between two bytecodes of whatever
that thread was doing.  If it was inside the allocator, a plain lock deadlocks the
handler and a re-entrant one lets it in halfway through an update (chunk maps,
handle states).  :class:`GuardedLock` refuses instead: the thread that holds it gets
a ``BadStateError`` when it tries to take it again.

A fork while another thread holds a lock leaves it held forever in the child, which
has no such thread.  Every ``GuardedLock`` is replaced by a free one in a forked child
(``os.register_at_fork``); the child then gets ``ForkedProcessError`` from the
parent's allocator rather than a deadlock.
"""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType

from execmem._errors import BadStateError


class GuardedLock:
    """A lock that refuses re-entry by its owner (see the module docstring).

    Built on ``threading.RLock``, whose C code records the owner in the same step as
    it acquires: a signal delivered right after the acquisition already finds the
    lock owned (with a plain lock and an owner field set afterwards, a handler run in
    between would deadlock).  ``_is_owned`` is the RLock method ``threading.Condition``
    relies on.
    """

    __slots__ = ("__weakref__", "_lock", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.RLock()
        _ALL.add(self)

    def __enter__(self) -> GuardedLock:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            raise BadStateError(
                f"{self.what} was entered again by the thread that is inside it (from a signal "
                "handler?); execmem is not async-signal-safe: call it after the handler returns"
            )
        self._lock.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._lock.release()

    def _reset(self) -> None:
        self._lock = threading.RLock()


_ALL: weakref.WeakSet[GuardedLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_ALL):
        lock._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["GuardedLock"]
