"""Asynchronous exceptions: every verb completes or leaves no trace.

A ``KeyboardInterrupt``, or any exception a Python signal handler raises, can surface
between two bytecodes of whatever the main thread is running, including the middle
of an allocator verb.  Three mechanisms were weighed:

* **deferring signals** across critical sections, as trio does for
  ``KeyboardInterrupt``: it needs execmem to own the handlers (trio replaces the
  default SIGINT handler only; a user's handler that raises is not deferred), and
  ``signal.pthread_sigmask`` in the main thread does not stop the handler from
  running there when another thread receives the signal.  Swapping every installed
  handler around each verb costs two ``sigaction`` calls per handler (3 us each here).
* **no bytecode boundary**: Python runs signal handlers only in the main thread, so
  code running on any *other* thread cannot be interrupted at all.  Handing each
  verb to a helper thread costs a round trip (12 us here), five times the cost of a
  whole publish on the hot path.
* **commit points**: each verb changes state in an order in which an exception at
  any point can be undone exactly, and commits in one step.  It costs nothing on the
  hot path but discipline.

execmem uses commit points, and the helper thread only where undoing is impossible:

1. Locks are taken and released by C code (``_locks``): no exception can leave one
   held.
2. Each verb checks everything first (no effect), then makes its effects, each
   either atomic (one statement, e.g. a chunk map's state is replaced in one
   assignment) or undone idempotently by an undo action registered *before* it,
   and commits with one store, just before it returns.  The undo runs when anything
   before the commit raises; until it has run to its end it stays registered on
   the allocator (``Allocator._undo``), and the next verb to take the lock (in any
   thread) runs it again first, so even an exception that interrupts the undo
   itself leaves nothing behind once the allocator is used again.
3. Housekeeping that the allocator may do at any time (reserving, growing, mapping,
   unmapping or releasing a pack, starting or ending in-place writing, a live
   patch's store) cannot be undone from outside the backend: a system call that
   created a mapping may return into a frame that is interrupted before it records
   the result.  :func:`uninterrupted` runs such a step, with the bookkeeping that
   records it, on a helper thread when it is called from the main thread, and defers
   any exception raised in the main thread meanwhile until the step is complete.
   Elsewhere it simply calls it: no signal handler runs on other threads.
4. What a verb does after its commit (trimming empty packs) is housekeeping of the
   same kind; an exception there is as if it arrived just after the verb returned.
5. A ``with`` block's ``__exit__`` written in Python can be stopped before its first
   line; ``batch()`` therefore keeps nothing on the texts until its end, and notices a
   block that was left without it (``_batch``, :func:`with_body`).

An exception that arrives as a verb returns can cost the caller its result (the verb
itself completed), as with any Python call: between the allocator's commit and the
return there is the lock's release, a call into C after which CPython checks.  A
``jit_text_alloc`` whose handle is lost there stays allocated until ``close()``.

``tests/reliability/fork_and_signals/test_interrupts_enumerated.py`` raises an exception at every point where
CPython can deliver one in every verb (allocator, backend, recipes, all the code a
verb runs on the main thread), in every native mode and on the modeled machine, and
audits the allocator after each (docs/reliability.md).

Not covered: ``PyThreadState_SetAsyncExc`` (an exception injected into *another*
thread by C code), which no Python code can defend against.
"""

from __future__ import annotations

import ctypes
import dis
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import lru_cache, partial
from itertools import chain
from types import CodeType, FrameType
from typing import Any, TypeVar

R = TypeVar("R")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sem_init.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint)
_libc.sem_wait.argtypes = (ctypes.c_void_p,)
_libc.sem_post.argtypes = (ctypes.c_void_p,)
#: Room for a POSIX ``sem_t`` (32 bytes with glibc on 64-bit Linux, 16 with musl).
_SEM_BYTES = 64


class _Job:
    __slots__ = ("args", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None


class _Helper:
    """One daemon thread that runs :func:`uninterrupted` steps for the main thread.

    The main thread hands a step over and waits for it in one C call (see
    :meth:`run`): no bytecode of the main thread runs between the hand-over and the
    end of the wait, so no signal handler can run there either.  Only the main
    thread submits, one step at a time (its handlers cannot run while it waits), so
    one semaphore says "done".
    """

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._sem = ctypes.create_string_buffer(_SEM_BYTES)
        if _libc.sem_init(self._sem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
        sem = ctypes.addressof(self._sem)
        self._post = partial(_libc.sem_post, sem)
        self._wait = partial(_libc.sem_wait, sem)
        self.thread = threading.Thread(target=self._serve, name="execmem-uninterrupted", daemon=True)

    def start(self) -> None:
        """Start the thread unless it was (even by a ``start()`` an exception cut short)."""
        if self.thread.ident is None:
            self.thread.start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the waiting thread
                job.error = exc
            self._post()

    def run(self, job: _Job) -> None:
        """Hand ``job`` over and wait for it, in one C call: ``deque`` drains an
        iterator that first puts the job (``SimpleQueue.put``, C) and then calls
        ``sem_wait`` (through ctypes, C) until it returns 0 (``iter(f, 0)``): a signal
        makes it return -1 (EINTR) and it is called again; the signal's Python handler
        runs after the wait.  No bytecode runs between the two or inside the wait, so
        no signal handler either."""
        deque(chain(map(self.jobs.put, (job,)), iter(self._wait, 0)), maxlen=0)


_helper: _Helper | None = None
_helper_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _helper, _helper_lock
    _helper = None  # the parent's helper thread does not exist here
    _helper_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def uninterrupted(fn: Callable[..., R], *args: Any) -> R:
    """``fn(*args)``, never interrupted by an asynchronous exception (see the module
    docstring).  A signal handler that raises in the main thread while ``fn`` runs
    does so after ``fn`` has finished, as if just after this call; ``fn`` must
    therefore record its effects itself rather than through its return value."""
    global _helper
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    helper = _helper
    if helper is None:
        with _helper_lock:
            helper = _helper = _helper or _Helper()
    helper.start()
    job = _Job(fn, args)
    helper.run(job)
    if job.error is not None:
        raise job.error
    return job.result  # type: ignore[no-any-return]




def with_body(frame: FrameType) -> tuple[int, int] | None:
    """The offsets ``[start, end)`` of the body of the ``with`` statement that ``frame``
    is entering (it is executing BEFORE_WITH, or SETUP_WITH before 3.11), or None.

    3.11 and later: the exception-table entries that lead to the statement's handler
    (the one that covers the instruction after BEFORE_WITH) span the body.  3.10:
    SETUP_WITH jumps to the handler, and the body ends at the block's POP_BLOCK."""
    return _with_body(frame.f_code, frame.f_lasti)


@lru_cache(maxsize=256)
def _with_body(code: CodeType, at: int) -> tuple[int, int] | None:
    instructions = list(dis.get_instructions(code))
    here = next((i for i in instructions if i.offset == at), None)
    if here is None:
        return None
    if here.opname == "BEFORE_WITH":
        entries = dis.Bytecode(code).exception_entries  # type: ignore[attr-defined]
        first = min((e for e in entries if e.start > at), key=lambda e: e.start, default=None)
        if first is None:
            return None
        mine = [e for e in entries if e.target == first.target]
        return min(e.start for e in mine), max(e.end for e in mine)
    if here.opname == "SETUP_WITH":
        end = max((i.offset for i in instructions if at < i.offset < here.argval and i.opname == "POP_BLOCK"), default=None)
        return None if end is None else (at + 2, end)
    return None


__all__ = ["uninterrupted", "with_body"]
