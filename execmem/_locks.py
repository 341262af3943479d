"""execmem's locks (allocator and native backend): safe against signal handlers and fork.

Two hazards a plain :class:`threading.Lock` has here:

* **re-entry from the owning thread.**  A Python signal handler runs in the main
  thread between two bytecodes of whatever the main thread was doing.  If the main
  thread is inside execmem (holding one of its locks) and the handler calls
  execmem again, a plain lock deadlocks the process for good.
* **fork.**  A fork made while *another* thread holds a lock copies the lock held,
  and the thread that would release it does not exist in the child: the child's
  first use deadlocks.

Two kinds of lock answer them, chosen case by case (each use says why):

* :class:`OwnedLock` - for state that an operation changes in several steps (the
  backend's region table, the choice of a synchronization mechanism, a region's page
  protections): re-entry from the thread that holds it cannot safely proceed, so it
  raises :class:`~execmem.BadStateError` at once ("execmem re-entered from the
  thread that is inside it, e.g. from a signal handler") instead of deadlocking.
  Other threads wait as usual.
* :class:`SetupLock` - an :class:`threading.RLock` for idempotent one-time setup
  and for plain accounting, where the nested call may simply run to completion
  inside the interrupted one (the handler's call finishes before the interrupted
  one resumes).

Both register themselves (weakly) and are reinitialized in a forked child by
``os.register_at_fork(after_in_child=...)``, so a child never inherits one held by a
thread that no longer exists.  The state such a lock guarded may be half-updated in
the child; the backend refuses every operation there but ``close``/``release``/
``stats`` (``ForkedProcessError``), which only drop what the parent made.

A signal handler that *raises* (``KeyboardInterrupt``) can never leave one of these
locks held: ``with lock:`` takes and releases it in C.  ``__enter__`` and ``__exit__``
are properties that return the underlying ``RLock``'s own (C) methods, after the
re-entry check: CPython looks both up before it calls ``__enter__``, and no bytecode
runs between the acquisition and the start of the block that would release it, so
there is no point at which an asynchronous exception finds the lock taken and its
release not yet arranged.  (A Python ``__enter__`` that called ``acquire()`` had such
a point: right after the call, where CPython runs pending signal handlers.)  Waiting
for the lock is interruptible and then leaves it untaken.  What the operations
*inside* the block do about asynchronous exceptions is ``_interrupts``'s subject.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable

from execmem._errors import BadStateError

REENTERED = "execmem re-entered from the thread that is inside it, e.g. from a signal handler"

_registry: weakref.WeakSet[OwnedLock | SetupLock] = weakref.WeakSet()


class OwnedLock:
    """A mutex that refuses re-entry from its owner with :class:`BadStateError`.

    Built on an ``RLock`` only for its owner bookkeeping, which CPython updates
    atomically inside ``acquire``/``release``: a signal handler that runs right after
    ``acquire`` returned already sees the lock owned by its thread, so there is no
    window in which re-entry would block instead of being refused.
    """

    __slots__ = ("__weakref__", "_lock", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.RLock()
        _registry.add(self)

    @property
    def __enter__(self) -> Callable[[], bool]:
        """The ``RLock``'s own ``__enter__`` (C), once re-entry is ruled out (see the
        module docstring: the lock is taken by C code only)."""
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            raise BadStateError(f"{REENTERED} ({self.what} is held by this thread)")
        return lock.__enter__

    @property
    def __exit__(self) -> Callable[..., None]:
        return self._lock.__exit__

    def held_here(self) -> bool:
        """True when the calling thread holds this lock."""
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def _reinit(self) -> None:
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"OwnedLock({self.what!r})"


class SetupLock:
    """A re-entrant lock (``RLock``) for idempotent one-time setup and accounting."""

    __slots__ = ("__weakref__", "_lock", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.RLock()
        _registry.add(self)

    @property
    def __enter__(self) -> Callable[[], bool]:
        """The ``RLock``'s own methods (C), as for :class:`OwnedLock`."""
        return self._lock.__enter__

    @property
    def __exit__(self) -> Callable[..., None]:
        return self._lock.__exit__

    def _reinit(self) -> None:
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"SetupLock({self.what!r})"


def _after_fork_in_child() -> None:
    # Only this thread exists now; whoever held a lock in the parent is gone.
    for lock in list(_registry):
        lock._reinit()


os.register_at_fork(after_in_child=_after_fork_in_child)

__all__ = ["REENTERED", "OwnedLock", "SetupLock"]
